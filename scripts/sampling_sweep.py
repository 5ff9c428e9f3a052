"""Speed / quality of sampling settings for one checkpoint: sample N images per setting, time it, score it.

    python scripts/sampling_sweep.py --ckpt runs/cifar10/checkpoint.pt --scorer PATH/score_cifar10.py \
        --num-images 10000 --out sweep.jsonl --settings "{}" '{"dense_diffusion_steps": 25}'

Each setting is a JSON dict of HiMAR.sample arguments (missing ones keep the checkpoint's defaults), e.g.
'{"drop_pivots": true}'; with '{"pivots_only": true}' the images scored are phase 1's pivot images (16x16 on
CIFAR-10), enlarged 2x (bilinear): where phase 1 stands on its own.
One JSON line per setting: the setting, seconds, images/s, and the scorer's output (fd, acc, ...).

    python scripts/sampling_sweep.py --real-pivots DATA --scorer PATH/score_cifar10.py --num-images 10000

scores real CIFAR-10 test images (from DATA/cifar-10-batches-py) as '{"pivots_only": true}' shows pivots:
downsampled 2x, then enlarged 2x. That is the best a perfect phase 1 could score.

    python scripts/sampling_sweep.py --ckpt CKPT --scorer PATH/score_cifar10.py --test-pivots DATA --settings '{}'

gives phase 1 the real test images' pivots (downsampled 2x) and their labels instead of sampling them
(HiMAR.sample's pivots=). Phase 2 reads no pivot values, only the conditional tokens made from z_s, the
transformer's output at each pivot's position at the step it was revealed, before its value was known: so this
is not "phase 2 behind a perfect phase 1" but how phase 2 follows real layouts. On the 20-minute model it scored
worse than around the model's own pivots (REPORT.md, "Pivot dropout 0, and phase 2 around real pivots").
"""

import argparse
import dataclasses
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoints  # noqa: E402
import pictures  # noqa: E402
import himar  # noqa: E402
from data import CifarUnpickler  # noqa: E402
from sample import check_writable, compile_heads, errors_for_people, pick_device, positive_int  # noqa: E402


def test_images(data_dir, n):
    """The first n CIFAR-10 test images, uint8 [n, 32, 32, 3], and their labels [n]."""
    path = os.path.join(data_dir, "cifar-10-batches-py", "test_batch")
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} not found: give the folder that train.py reads CIFAR-10 from")
    try:
        with open(path, "rb") as f:
            batch = CifarUnpickler(f, path, "Give a folder with the official CIFAR-10 files.").load()
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = np.asarray(batch[b"labels"])
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {path} is not the official CIFAR-10 test batch ({type(e).__name__}): give the "
                         "folder that train.py reads CIFAR-10 from") from None
    if n > len(images):
        raise SystemExit(f"error: {path} has {len(images):,} test images; give --num-images {len(images):,} or fewer")
    return images[:n], labels[:n]


def test_pivots_of(data_dir, n):
    """The pivot images of the first n CIFAR-10 test images (their 2x downsample), [n, C, 16, 16] in [-1, 1], and
    their labels [n]."""
    images, labels = test_images(data_dir, n)
    return himar.downsample(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1), labels


def enlarge(images):
    """Low-resolution images [B, C, h, w] in [-1, 1] -> [B, C, 2h, 2w], bilinear."""
    return F.interpolate(images, scale_factor=2, mode="bilinear", align_corners=False).clamp(-1, 1)


def score(scorer, images, labels, device_type):
    """The scorer's output (fd, acc, ...) for uint8 images [N, H, W, 3] with their labels."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "samples.npz")
        np.savez(path, arr_0=images, arr_1=labels)
        out = subprocess.run([sys.executable, scorer, path, "--device", device_type], capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    try:
        if out.returncode == 0 and lines:
            return json.loads(lines[-1])
    except json.JSONDecodeError:
        pass
    said = (out.stderr.strip() or out.stdout.strip() or "nothing").splitlines()[-1]
    raise SystemExit(f"error: the scorer {scorer} did not print its JSON line (exit status {out.returncode}; its last "
                     f"words: {said})")


def check_scorer(scorer):
    """Stop now, before any sampling, if --scorer is not a file."""
    if scorer and not os.path.isfile(scorer):
        raise SystemExit(f"error: --scorer {scorer}: no such file (give the path of score_cifar10.py)")


def generate(model, labels, pivots=None, *, seed, setting):
    """model.sample(labels, seed=seed, **setting), or with setting["pivots_only"] the pivot images, enlarged 2x.
    pivots: given pivot images, which phase 1 takes instead of sampling (HiMAR.sample's pivots)."""
    setting = dict(setting) if pivots is None else dict(setting, pivots=pivots)  # (models without pivots take none)
    if not setting.pop("pivots_only", False):
        return model.sample(labels, seed=seed, **setting)
    _, frames = model.sample(labels, seed=seed, trajectory=True, **setting)
    return enlarge([f["image"] for f in frames if f["phase"] == "pivot"][-1])  # phase 1's last frame: every pivot


def warmup_images(batch_size, compiled):
    """How many images to sample untimed before timing: a whole batch once the heads are compiled (compile_heads),
    so that compiling for the batch's shapes is not timed; else a few."""
    return batch_size if compiled else 8


def sample_and_score(model, num_images, setting, scorer=None, batch_size=2500, keep=None, warmup=8, test_pivots=None):
    """Sample num_images images (classes in turn) with model.sample(**setting), timed after `warmup` untimed ones
    (a whole batch after compile_heads, so that compiling is not timed: its time is the row's warmup_seconds), and
    score them with the scorer script if one is given. Returns {"setting", "n", "seconds", "images_per_s",
    "warmup_seconds", scores...}. keep: also save the samples there (an npz in the ADM layout). test_pivots: a
    CIFAR-10 folder; phase 1 then takes the pivots of its first num_images test images, with their labels, instead
    of sampling them."""
    device = next(model.parameters()).device
    labels, pivots = torch.arange(num_images) % model.cfg.num_classes, None
    if test_pivots:
        pivots, test_labels = test_pivots_of(test_pivots, num_images)  # [N, C, H/2, W/2], [N]
        labels = torch.from_numpy(test_labels).long()

    def batch(i, n):  # the labels and the given pivots (None: phase 1 samples them) of images i to i + n - 1
        return labels[i:i + n].to(device), None if pivots is None else pivots[i:i + n].to(device)

    start = time.time()
    if warmup:  # (0: none, e.g. when an earlier setting already compiled for these shapes)
        generate(model, *batch(0, warmup), seed=123, setting=setting)
    if device.type == "cuda":
        torch.cuda.synchronize()
    warmup_seconds = time.time() - start
    start = time.time()
    chunks = [pictures.to_uint8(generate(model, *batch(i, batch_size), seed=i, setting=setting))
              for i in range(0, num_images, batch_size)]
    seconds = time.time() - start
    row = {"setting": setting, "n": num_images, "seconds": round(seconds, 1),
           "images_per_s": round(num_images / seconds, 1), "warmup_seconds": round(warmup_seconds, 3)}
    if test_pivots:
        row["given_pivots"] = "test images"
    images = np.concatenate(chunks)
    if keep:
        np.savez(keep, arr_0=images, arr_1=labels.numpy())
    if scorer:
        row.update(score(scorer, images, labels.numpy(), device.type))
    return row


SAMPLE_OPTIONS = ("drop_pivots", "pivots_only")  # a setting's keys beside the fields of himar.Sampling


def parse_setting(text, cfg, error):
    """A --settings entry as a dict, checked against the model's config: JSON, Sampling fields with values in range,
    or the options above; error(message) otherwise."""
    try:
        setting = json.loads(text)
    except json.JSONDecodeError as e:
        error(f"--settings {text}: not JSON ({e.msg}); write e.g. '{{\"pivot_cfg\": 25}}'")
    fields = {f.name for f in dataclasses.fields(himar.Sampling)}
    if not isinstance(setting, dict) or set(setting) - fields - set(SAMPLE_OPTIONS):
        error(f"--settings {text}: give a JSON object whose keys are fields of himar.Sampling "
              f"({', '.join(sorted(fields))}) or {' / '.join(SAMPLE_OPTIONS)}")
    if not all(isinstance(setting[k], bool) for k in SAMPLE_OPTIONS if k in setting):
        error(f"--settings {text}: {' / '.join(SAMPLE_OPTIONS)} take true or false")
    try:
        cfg.sampling_with(**{k: v for k, v in setting.items() if k in fields})
    except (TypeError, ValueError) as e:
        error(f"--settings {text}: {e}")
    return setting


def emit(row, out):
    """Print a result row and add it to the JSON-lines file `out`."""
    print(json.dumps(row), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt")
    p.add_argument("--real-pivots", metavar="DATA", help="score real test images as pivots instead (see above)")
    p.add_argument("--test-pivots", metavar="DATA", help="phase 1 given the real test images' pivots (see above)")
    p.add_argument("--scorer", help="path of score_cifar10.py (skip scoring if not given)")
    p.add_argument("--num-images", type=positive_int, default=10000)
    p.add_argument("--batch-size", type=positive_int, default=2500)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the heads (default: on a GPU; the warm-up batch compiles them, untimed)")
    p.add_argument("--out", default="sweep.jsonl")
    p.add_argument("--settings", nargs="+", default=["{}"])
    p.add_argument("--device", default="auto", help="cuda, cpu, ... (default: cuda if available)")
    args = p.parse_args()
    check_scorer(args.scorer)
    check_writable("out", args.out)
    if args.real_pivots and not args.scorer:
        p.error("--real-pivots scores images: give --scorer PATH/score_cifar10.py")
    if args.real_pivots:
        pivots, labels = test_pivots_of(args.real_pivots, args.num_images)
        emit({"setting": "real test images, downsampled 2x and enlarged 2x", "n": len(pivots),
              **score(args.scorer, pictures.to_uint8(enlarge(pivots)), labels, "cpu")}, args.out)
        return
    if not args.ckpt:
        p.error("give --ckpt CHECKPOINT (or --real-pivots DATA)")
    model = checkpoints.load_model(args.ckpt, pick_device(args.device))
    if args.test_pivots and model.cfg.pivots == "none":
        p.error(f"--test-pivots: {args.ckpt} has no pivot phase (a MAR model, pivots='none')")
    settings = [parse_setting(text, model.cfg, p.error) for text in args.settings]
    compiled = args.compile or (args.compile is None and model.mask_token.is_cuda)
    if compiled:
        compile_heads(model)
    for setting in settings:
        row = sample_and_score(model, args.num_images, setting, args.scorer, args.batch_size,
                               warmup=warmup_images(args.batch_size, compiled), test_pivots=args.test_pivots)
        emit(row, args.out)


if __name__ == "__main__":
    with errors_for_people():
        main()
