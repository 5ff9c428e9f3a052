"""Generate images with a trained Hi-MAR checkpoint.

    python sample.py                                    # the shipped CIFAR-10 model: a class grid and a trajectory
    python sample.py --ckpt runs/cifar10/checkpoint.pt --grid grid.png
    python sample.py --ckpt CKPT --num-images 10000 --npz samples.npz   # for evaluation (ADM layout)
    python sample.py --ckpt CKPT --trajectory unmasking.gif             # the two-phase unmasking, animated
    python sample.py --edit cat.png --keep left --labels 3 5            # zero-shot editing: cat.png's left half
                                                                        # kept, the rest generated as class 3 and as 5
"""

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from dataclasses import fields

import numpy as np
import torch

import checkpoints
import pictures
import himar
from data import DataError

SHIPPED_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "himar_cifar10.pt")


# ----- what to sample, and what to keep of a picture to edit -----


def compile_heads(model):
    """torch.compile the two diffusion heads, where sampling spends its time (the MLP head's denoising steps at every
    pivot step, the DiT head's over the whole map). The first batch compiles them. 10,000 images with the default
    settings: 23.6 s on an H100 after the compilation (REPORT.md, "The recipe at 17,200 steps"); compiled heads gave
    the eager heads' scores in half the time (REPORT.md, "Faithful class dropout and DiT loss")."""
    for module in model.modules():
        if isinstance(module, himar.DiffusionHead):
            module.compile()


def class_grid(model, labels, per_class, seed, device, **settings):
    """Sample `per_class` images for each label: [len(labels) * per_class, C, H, W], one row per label (and the
    frames too, with trajectory=True)."""
    rows = torch.tensor(labels).repeat_interleave(per_class)
    return model.sample(rows.to(device), seed=seed, **settings)


KEEP_REGIONS = ("left", "right", "top", "bottom", "center", "border")


def keep_mask(region, image_size, patch_size):
    """Bool [H, W], True where --keep keeps the pixels: a half of the image (left, right, top, bottom), the central
    half-size square (center), or all but that square (border). Whole dense tokens, as HiMAR.sample needs."""
    side = image_size // patch_size  # tokens per row
    half, middle = side // 2, slice(side // 4, side - side // 4)
    everything = slice(None)
    rows, cols = {"left": (everything, slice(None, half)), "right": (everything, slice(half, None)),
                  "top": (slice(None, half), everything), "bottom": (slice(half, None), everything),
                  "center": (middle, middle), "border": (middle, middle)}[region]
    tokens = torch.zeros(side, side, dtype=torch.bool)
    tokens[rows, cols] = True
    if region == "border":
        tokens = ~tokens
    return tokens.repeat_interleave(patch_size, 0).repeat_interleave(patch_size, 1)


@contextlib.contextmanager
def opened_picture(path):
    """The --edit picture, opened (PIL reads only its header until the pixels are asked for); a clear error if it is
    missing, a folder or not an image."""
    from PIL import Image, UnidentifiedImageError

    if os.path.isdir(path):
        sys.exit(f"error: --edit {path} is a folder: give a picture file")
    if not os.path.isfile(path):
        sys.exit(f"error: --edit {path}: no such file")
    try:
        with Image.open(path) as picture:
            yield picture
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        sys.exit(f"error: --edit {path} could not be read as an image ({type(e).__name__}): give a PNG")


def read_image(path, size):
    """The --edit picture as pixels in [-1, 1] (scaled as train.py scales its data), [1, 3, H, W]; a clear error if it
    is not size x size pixels (said before its pixels are decoded, however large it is)."""
    with opened_picture(path) as picture:
        if picture.size != (size, size):
            sys.exit(f"error: --edit {path} is {picture.width}x{picture.height} pixels; this checkpoint's model "
                     f"edits {size}x{size} images (resize or crop it first)")
        pixels = np.array(picture.convert("RGB"))  # uint8 [H, W, 3]
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].float().mul_(1 / 127.5).sub_(1.0)


def edit_grid(model, image, keep, labels, seed, device, **settings):
    """Zero-shot editing: `image` [1, C, H, W] completed around the pixels that keep [H, W] keeps, once as each of
    `labels`, in one batch. Returns the grid's pictures [3 * len(labels), C, H, W], one row of three per edit (the
    input, the kept region with the generated pixels magenta, the edit), and the sampling frames."""
    batch = len(labels)
    edits, frames = model.sample(torch.tensor(labels, device=device), seed=seed, trajectory=True,
                                 known_images=image.to(device).expand(batch, -1, -1, -1),
                                 known_mask=keep.to(device).expand(batch, -1, -1), **settings)
    kept = torch.where(keep, image, pictures.MAGENTA)
    rows = torch.stack([image.expand(batch, -1, -1, -1), kept.expand(batch, -1, -1, -1), edits.cpu()], dim=1)
    return rows.flatten(0, 1), frames  # [batch, 3, C, H, W] -> [3 * batch, C, H, W]


# ----- command line -----


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample images from a Hi-MAR checkpoint.")
    p.add_argument("--ckpt", default=SHIPPED_CHECKPOINT, help="checkpoint file (default: the shipped CIFAR-10 model)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema",
                   help="the checkpoint's EMA weights (default), or its raw training weights: for a short run, whose "
                        "EMA still holds much of its first steps' weights")
    p.add_argument("--grid", help="PNG grid to write ('' for none; default samples.png, or edits.png with --edit)")
    p.add_argument("--labels", type=int, nargs="+",
                   help="classes of the grid rows, or of the edits with --edit (default: the first 10 classes)")
    p.add_argument("--per-class", type=int, help="grid images per class (default: 10 on a GPU, 2 on a CPU)")
    p.add_argument("--num-images", type=int, default=0, help="with --npz: how many samples, spread evenly over classes")
    p.add_argument("--npz", help="write --num-images samples here (arr_0 uint8 [N,H,W,3], arr_1 labels)")
    p.add_argument("--trajectory", help="figure (.png) or animation (.gif) of the unmasking ('' for none; default "
                                        "trajectory.png, or edit_trajectory.png with --edit)")
    p.add_argument("--edit", metavar="IMAGE.png",
                   help="zero-shot editing: keep the --keep region of this picture (the model's size, e.g. 32x32 RGB) "
                        "and generate the rest once as each --labels class; the grid has one row per edit, named by "
                        "its class: the input, the kept region (generated pixels magenta), the edit; the trajectory "
                        "shows the first 4 edits")
    p.add_argument("--keep", choices=KEEP_REGIONS,
                   help="with --edit, the pixels kept: a half (left, right, top, bottom), the central half-size square "
                        "(center: outpainting) or all but it (border: inpainting)")
    p.add_argument("--pivot-steps", type=int, help="phase-1 steps K1")
    p.add_argument("--dense-steps", type=int, help="phase-2 steps K2")
    p.add_argument("--pivot-cfg", type=float, help="classifier-free guidance scale of phase 1")
    p.add_argument("--dense-cfg", type=float, help="classifier-free guidance scale of phase 2")
    p.add_argument("--temperature", type=float, help="temperature of the DDPM sampler's noise")
    p.add_argument("--pivot-diffusion-steps", type=int, nargs="+", metavar="N",
                   help="denoising steps of the MLP head: N, or FIRST LAST to anneal them over phase 1")
    p.add_argument("--dense-diffusion-steps", type=int, nargs="+", metavar="N",
                   help="denoising steps of the DiT head: N, or FIRST LAST to anneal them over phase 2")
    p.add_argument("--pivot-sampler", choices=himar.SAMPLERS, help="reverse diffusion of the MLP head")
    p.add_argument("--dense-sampler", choices=himar.SAMPLERS, help="reverse diffusion of the DiT head")
    p.add_argument("--pivot-spacing", choices=himar.SPACINGS, help="where the MLP head's denoising steps fall in t")
    p.add_argument("--dense-spacing", choices=himar.SPACINGS, help="where the DiT head's denoising steps fall in t")
    p.add_argument("--batch-size", type=int,
                   help="images per sampling batch for --npz (default: 2500 on a GPU, 500 on a CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the diffusion heads for --npz (default: on a GPU; the first batch compiles)")
    p.add_argument("--device", default="auto", help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.grid is None:
        args.grid = "edits.png" if args.edit else "samples.png"
    if args.trajectory is None:  # an edit does not overwrite the trajectory of a plain run
        args.trajectory = "edit_trajectory.png" if args.edit else "trajectory.png"
    return args


def sampling_settings(args, cfg):
    """The checkpoint's Sampling settings with the flags that were given, checked for sense (himar.Sampling)."""
    given = {f.name: getattr(args, f.name) for f in fields(himar.Sampling) if getattr(args, f.name) is not None}
    for name in ("pivot_diffusion_steps", "dense_diffusion_steps"):
        if name in given:
            if len(given[name]) > 2:
                sys.exit(f"error: --{name.replace('_', '-')} takes one or two numbers (N, or FIRST LAST)")
            given[name] = tuple(given[name]) if len(given[name]) == 2 else given[name][0]
    try:
        settings = cfg.sampling_with(**given)
    except ValueError as e:
        sys.exit(f"error: {e}")
    return settings


def pick_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        sys.exit(f"error: --device {name}: not a device; use cuda, cuda:N, cpu or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"error: --device {name} asked for, but no CUDA GPU is available (use --device cpu)")
    count = {"cpu": 1, "cuda": torch.cuda.device_count()}.get(device.type)
    if count is not None and device.index is not None and device.index >= count:
        sys.exit(f"error: --device {name}: there is no such device (this machine has {count} {device.type} "
                 f"device(s), numbered from 0)")
    return name


OUTPUTS = {"grid": (".png", ".jpg", ".jpeg"), "trajectory": (".png", ".gif"), "npz": (".npz",)}


def positive_int(text):
    """argparse type: a whole number above 0 (a count of images, a batch)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {value}")
    return value


def check_writable(flag, path, extensions=None):
    """Stop with a message now if `path` (given as --flag) cannot be written later: a folder, a missing or read-only
    folder above it, or (with `extensions`) a name not ending in one of them."""
    if extensions and not path.lower().endswith(extensions):
        sys.exit(f"error: --{flag} {path}: the file name must end in {' or '.join(extensions)}")
    if os.path.isdir(path):
        sys.exit(f"error: --{flag} {path} is a folder: give a file name (in that folder, say)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        sys.exit(f"error: cannot write {path}: the folder {folder} does not exist or is not writable")


@contextlib.contextmanager
def errors_for_people():
    """For the scripts: a checkpoint or a data set that cannot be used, or a file that cannot be written, stops the
    script with its message instead of a traceback."""
    try:
        yield
    except (checkpoints.CheckpointError, DataError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: {e.filename}: {e.strerror}" if e.filename and e.strerror else f"error: {e}")


def check_args(args):
    """Every flag checked before the model is loaded, so that nothing fails after minutes of sampling."""
    for name in ("per_class", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            sys.exit(f"error: --{name.replace('_', '-')} must be a positive whole number, got {getattr(args, name)}")
    if not 0 <= args.seed < 2**63:
        sys.exit(f"error: --seed must be a whole number from 0 to 2**63 - 1, got {args.seed}")
    if args.npz and args.num_images <= 0:
        sys.exit("error: --npz needs --num-images N (N > 0)")
    if not (args.grid or args.trajectory or args.npz):
        sys.exit("error: nothing to write: --grid '' and --trajectory '' leave out both pictures; give --npz FILE.npz "
                 "(with --num-images) to keep the samples, or a --grid file name")
    if args.num_images and not args.npz:
        sys.exit("error: --num-images needs --npz FILE.npz to write them to")
    if args.edit and not args.keep:
        sys.exit(f"error: --edit needs --keep REGION, one of {', '.join(KEEP_REGIONS)}")
    if args.keep and not args.edit:
        sys.exit("error: --keep needs --edit IMAGE.png, the picture to edit")
    if args.edit and (args.npz or args.per_class):
        sys.exit("error: --edit makes one edit per --labels class (repeat a class for more), in one grid: "
                 "it does not go with --npz or --per-class")
    if args.edit:
        with opened_picture(args.edit):  # its header only: is it a picture at all
            pass
    for name, extensions in OUTPUTS.items():
        if getattr(args, name):
            check_writable(name, getattr(args, name), extensions)


def write_trajectory(frames, which, path, row_names=None):
    """The trajectory figure (or animation) of the samples `which` (their indices in the batch), written whole."""
    frames = [{**f, "image": f["image"][which], "mask": f["mask"][which]} for f in frames]
    verb = wrote(path)
    with checkpoints.written(path) as tmp:
        pictures.trajectory_figure(frames, tmp, len(which), row_names)
    print(f"{verb} {path}: {len(frames)} steps")


def wrote(path):
    """How to report writing `path`, said before writing it: "replaced" if it existed, else "wrote"."""
    return "replaced" if os.path.exists(path) else "wrote"


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    try:
        with stopped_like_ctrl_c():
            run(args)
    except torch.cuda.OutOfMemoryError:
        sys.exit(f"error: the GPU ran out of memory while sampling. Sample fewer images at once: a smaller "
                 f"--batch-size for --npz (now {args.batch_size}), a smaller --per-class for the grid, fewer --labels "
                 "for edits.")
    except pictures.NonFiniteImages as e:
        sys.exit(f"error: {e}, so they were not written. Lower --pivot-cfg, --dense-cfg or --temperature; or, if the "
                 "checkpoint's weights had diverged, sample the run's checkpoint.prev.pt (the save before the last).")


@contextlib.contextmanager
def stopped_like_ctrl_c():
    """SIGTERM and SIGHUP stop sampling as Ctrl-C does (KeyboardInterrupt), through the clean-ups of
    `checkpoints.written`: no temporary file is left behind."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    names = [name for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]  # (Windows has no SIGHUP)
    in_main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers live
    previous = {name: signal.signal(getattr(signal, name), interrupt) for name in names} if in_main_thread else {}
    try:
        yield
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


def run(args):
    """Load the checkpoint, then write what the flags ask for: the grid and trajectory, the edits, the npz."""
    device = pick_device(args.device)
    try:
        model = checkpoints.load_model(args.ckpt, device, key=args.weights)
    except checkpoints.CheckpointError as e:
        shipped = args.ckpt == SHIPPED_CHECKPOINT
        hint = "\n(the shipped model is checkpoints/himar_cifar10.pt in the repository)" if shipped else ""
        sys.exit(f"error: {e}{hint}")
    cfg = model.cfg
    sampling = sampling_settings(args, cfg)
    on_gpu = str(device).startswith("cuda")
    args.batch_size = args.batch_size or (2500 if on_gpu else 500)  # images per --npz batch
    labels = args.labels if args.labels else list(range(min(10, cfg.num_classes)))
    if min(labels) < 0 or max(labels) >= cfg.num_classes:
        sys.exit(f"error: --labels must be class indices in [0, {cfg.num_classes})")
    print(f"{args.ckpt} ({args.weights} weights): {model.num_params() / 1e6:.1f}M parameters, "
          f"{cfg.image_size}x{cfg.image_size}, on {device}")
    print(f"sampling: K1 = {sampling.pivot_steps} pivot steps, K2 = {sampling.dense_steps} dense steps, CFG "
          f"{sampling.pivot_cfg:g} / {sampling.dense_cfg:g}, denoising steps {sampling.pivot_sampler} "
          f"{sampling.pivot_spacing} {sampling.pivot_diffusion_steps} / {sampling.dense_sampler} "
          f"{sampling.dense_spacing} {sampling.dense_diffusion_steps}")

    if args.edit and (args.grid or args.trajectory):
        S = cfg.image_size
        image = read_image(args.edit, S)  # [1, 3, S, S]
        start = time.time()
        grid, frames = edit_grid(model, image, keep_mask(args.keep, S, cfg.patch_size), labels, args.seed, device,
                                 sampling=sampling)
        names = [f"as {name}" for name in pictures.class_names(labels, cfg.num_classes)]  # a row name per edit
        if args.grid:
            verb = wrote(args.grid)
            pictures.save_grid(grid, 3, args.grid, row_names=names)
            print(f"{verb} {args.grid}: one row per edit ({args.edit}, its kept {args.keep} region, the edit) as "
                  f"each of classes {' '.join(map(str, labels))}, in {time.time() - start:.1f} s")
        if args.trajectory:
            write_trajectory(frames, list(range(min(4, len(labels)))), args.trajectory, names[:4])
    elif args.grid or args.trajectory:  # one sampling run gives the grid and, for its first rows, the trajectory
        per_class = args.per_class or (10 if on_gpu else 2)
        rows = labels if args.grid else labels[:4]
        start = time.time()
        images, frames = class_grid(model, rows, per_class, args.seed, device, sampling=sampling, trajectory=True)
        if args.grid:
            verb = wrote(args.grid)
            pictures.save_grid(images, per_class, args.grid, row_names=pictures.class_names(rows, cfg.num_classes))
            print(f"{verb} {args.grid}: {len(rows)} classes x {per_class}, in {time.time() - start:.1f} s")
        if args.trajectory:
            first_of_each = list(range(0, min(4, len(rows)) * per_class, per_class))  # one sample of each of 4 classes
            write_trajectory(frames, first_of_each, args.trajectory, pictures.class_names(rows[:4], cfg.num_classes))

    if args.npz:
        from tqdm import tqdm

        if args.compile if args.compile is not None else on_gpu:
            compile_heads(model)
        all_labels = torch.arange(args.num_images) % cfg.num_classes  # spread evenly over the classes
        chunks, batch_seconds = [], []
        for i in tqdm(range(0, args.num_images, args.batch_size), desc="sampling", unit="batch"):
            start = time.time()
            batch = all_labels[i:i + args.batch_size].to(device)
            chunks.append(pictures.to_uint8(model.sample(batch, sampling, seed=args.seed + i)))  # (waits for the GPU)
            batch_seconds.append(time.time() - start)
        seconds = sum(batch_seconds)
        verb = wrote(args.npz)
        with checkpoints.written(args.npz) as tmp:
            np.savez(tmp, arr_0=np.concatenate(chunks), arr_1=all_labels.numpy())
        print(f"{verb} {args.npz}: {args.num_images} images in {seconds:.1f} s "
              f"({args.num_images / seconds:.1f} images/s; the first batch {batch_seconds[0]:.1f} s)")


if __name__ == "__main__":
    main()
