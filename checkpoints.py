"""Checkpoint files: written whole or not at all, read with a clear error for every way a file can be wrong.

himar.py says what a checkpoint holds (`himar.to_checkpoint`, `himar.from_checkpoint`: the config travels with the
weights); this module is the file around it, for train.py, sample.py and the scripts:

    save_checkpoint(path, checkpoint)    torch.save through `written`, optionally keeping the file it replaces
    load_checkpoint(path)                tensors and plain data only (nothing in the file can run code), checked
    load_model(path)                     the model a file holds, its EMA weights by default, checked to be finite
    written(path)                        any file written whole: a crash leaves the old one, a link is never followed
"""

import contextlib
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import asdict, fields

import torch

import himar


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, or made for another model."""


TMP_PREFIX = ".tmp-"  # the private folders that `written` writes in: .tmp-<pid>-<random>


@contextlib.contextmanager
def written(path):
    """Write `path` whole or not at all. Yields a temporary path with the same file name, in a private folder (only
    this user can write there, so nothing at that path can be a planted link) made next to `path`; once the caller
    has written it, the file is flushed to disk, given the user's usual permissions (the umask's, not 0600) and
    renamed over `path`. A crash at any point leaves the old file whole, and a link at `path` is replaced, never
    written through. The private folders of writers that were killed are removed first."""
    folder, name = os.path.split(os.path.abspath(path))
    remove_stale_temporaries(folder)
    private = tempfile.mkdtemp(dir=folder, prefix=f"{TMP_PREFIX}{os.getpid()}-")
    tmp = os.path.join(private, name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(private, ignore_errors=True)


def remove_stale_temporaries(folder):
    """Remove the private folders of `written` that a killed writer left in `folder`: those named after a process
    that is no longer running."""
    for name in os.listdir(folder):
        found = re.fullmatch(rf"{re.escape(TMP_PREFIX)}(\d+)-\w+", name)
        path = os.path.join(folder, name)
        if found and os.path.isdir(path) and not os.path.islink(path) and not process_running(int(found[1])):
            shutil.rmtree(path, ignore_errors=True)


def process_running(pid):
    """Whether process `pid` runs on this machine (where that cannot be asked, as on Windows, assume it does)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):  # none; a number too large to be a pid
        return False
    except PermissionError:  # another user's
        return True
    return True


def save_checkpoint(path, checkpoint, previous=None):
    """torch.save through `written`: a crash at any point leaves the old file whole. With `previous`, the file that
    was at `path` is kept under that name (a second name for it, or a copy where the file system has no links),
    so a save of weights that had already gone bad can be rolled back."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with written(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
        if previous is not None and os.path.isfile(path):
            with written(previous) as old:
                try:
                    os.link(path, old, follow_symlinks=False)
                except OSError:  # no hard links on this file system
                    shutil.copyfile(path, old)


def load_checkpoint(path, device="cpu"):
    """Read a checkpoint written by save_checkpoint; a clear CheckpointError if it is not one. Only tensors and
    plain data are read: nothing in the file can run code."""
    check = "check the path (train.py writes <out-dir>/checkpoint.pt)"
    if os.path.isdir(path):
        inside = os.path.join(path, "checkpoint.pt")
        raise CheckpointError(f"{path} is a folder: give the checkpoint file in it ({inside}, say)")
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}: {check}")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch.save writes a zip archive
            raise CheckpointError(f"{path} is not a checkpoint (PyTorch writes checkpoints as zip archives; this file "
                                  f"is not one): {check}")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} holds objects other than tensors and plain data, so it was not read (loading "
                              "them could run code): it was not written by himar") from None
    except Exception as e:
        raise CheckpointError(f"{path} could not be read as a checkpoint (corrupt or truncated file?): "
                              f"{type(e).__name__}") from None
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or not {"model", "ema"} & set(checkpoint):
        raise CheckpointError(f"{path} is not a Hi-MAR checkpoint (it has no config and model weights)")
    if "sampling" not in checkpoint["config"]:  # the first layout: sampling fields loose in the config, `heads`, ...
        raise CheckpointError(f"{path} was written by the first version of himar, whose layout this one no longer "
                              "reads: sample it with that version (git checkout f5f94d6), or train anew")
    return checkpoint


def config_from_checkpoint(checkpoint):
    """The Config a checkpoint was trained with (its sampling defaults included), or a clear CheckpointError."""
    known = {f.name for f in fields(himar.Config)}
    unknown = set(checkpoint["config"]) - known
    if unknown:
        raise CheckpointError(f"the checkpoint's config has fields this version does not know: {sorted(unknown)}")
    try:
        return himar.Config(**checkpoint["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint's config is not valid: {e}") from None


def load_weights(model, checkpoint, key="model"):
    """Load checkpoint[key] into model, after checking that the checkpoint was made for this config (the
    sampling settings aside: they change how the model is used, not its weights)."""
    saved = {k: v for k, v in checkpoint["config"].items() if k != "sampling"}
    wanted = {k: v for k, v in asdict(model.cfg).items() if k != "sampling"}
    differ = [f"{k}: checkpoint {saved.get(k)!r}, model {wanted[k]!r}" for k in wanted if saved.get(k) != wanted[k]]
    if differ:
        raise CheckpointError("the checkpoint was made for another config:\n  " + "\n  ".join(differ))
    if key not in checkpoint:
        raise CheckpointError(f"the checkpoint has no {key!r} weights (it has: {', '.join(checkpoint)})")
    model.load_state_dict(checkpoint[key])


def is_out_of_memory(error):
    """Whether `error` says that memory could not be allocated (torch raises a plain RuntimeError on the CPU)."""
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(error)


def load_model(path, device="cpu", key="ema"):
    """The model a checkpoint file holds (himar.from_checkpoint), its EMA weights by default (the training weights
    where it has none), with a clear CheckpointError if the file, its config or its weights are wrong."""
    checkpoint = load_checkpoint(path, device)
    cfg = config_from_checkpoint(checkpoint)
    key = key if key in checkpoint else "model"
    if key not in checkpoint:
        raise CheckpointError(f"the checkpoint has no {key!r} weights (it has: {', '.join(checkpoint)})")
    try:
        model = himar.from_checkpoint(checkpoint, key).to(device)
    except (RuntimeError, MemoryError) as e:
        if is_out_of_memory(e):
            raise CheckpointError(f"the model that {path}'s config describes (width {cfg.width}, depth {cfg.depth}) "
                                  f"does not fit in the memory of {device}: is it the right file?") from None
        raise CheckpointError(f"{path}'s {key!r} weights do not fit its own config: {str(e).splitlines()[0]}") from None
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise CheckpointError(f"{path} holds weights that are NaN or inf: it cannot generate images. Use an earlier "
                              "checkpoint of the run (train.py never saves such weights; this file was not written "
                              "by it)")
    return model
