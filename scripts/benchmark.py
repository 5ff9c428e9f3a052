"""Where a config's compute goes and how fast it trains: FLOPs by part, and the throughput of training steps.

    python scripts/benchmark.py                                    # the cifar10 preset, on the best device
    python scripts/benchmark.py --preset imagenet64 --micro-batch 64   # peak memory of a 512 batch in passes of 64
    python scripts/benchmark.py --no-compile                       # eager, to compare
    python scripts/benchmark.py --no-cuda-graphs                   # compiled, without CUDA graphs
    python scripts/benchmark.py --preset tiny --set dense_head=mlp --set pivots=none --device cpu --steps 3
    python scripts/benchmark.py --profile                          # where a GPU step's time goes (torch.profiler)

Prints the forward FLOPs per image of each top-level part of the model (PyTorch's FLOP counter on a CPU batch
of 4, attention counted through the math kernel), the FLOPs of one training step per image, then times
--steps training steps of random images (after --warmup untimed ones) with train.py's training_step: images/s,
TFLOP/s achieved, the peak GPU memory, and how long the first two steps took (compilation). --profile then traces
a few more steps: how much of a step the GPU is busy running kernels, that time by kind of kernel, and the kernels
that take the most.
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import himar  # noqa: E402
import train  # noqa: E402
from sample import pick_device, positive_int  # noqa: E402


def count_flops(model, device, backward, batch=4):
    """(total FLOPs per image, {module path: FLOPs}) of one forward pass, or of forward + backward. On a GPU the
    attention kernel that training uses is counted (its backward recomputes the scores); PyTorch cannot count
    the CPU's fused kernel, so on a CPU attention goes through the math kernel, made of countable products."""
    cfg = model.cfg
    images = torch.zeros(batch, cfg.channels, cfg.image_size, cfg.image_size, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    counter = FlopCounterMode(display=False)
    kernel = contextlib.nullcontext() if device.type == "cuda" else sdpa_kernel(SDPBackend.MATH)
    grad = contextlib.nullcontext() if backward else torch.no_grad()
    with counter, kernel, grad, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        loss, _ = model(images, labels, pivot_dropout=0.0)
        if backward:
            loss.backward()
    model.zero_grad(set_to_none=True)
    counts = {name: sum(c.values()) / batch for name, c in counter.get_flop_counts().items()}
    return counter.get_total_flops() / batch, counts


def flops_by_part(model):
    """{part: forward FLOPs per image} for the model's direct children (a ModuleList counts as one part), largest
    first, and the total of the whole forward pass."""
    total, counts = count_flops(model, torch.device("cpu"), backward=False)
    root = type(model).__name__
    parts = {}
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            paths = [f"{root}.{name}.{i}" for i in range(len(child))]
        else:
            paths = [f"{root}.{name}"]
        parts[name] = sum(counts.get(path, 0) for path in paths)
    return {k: v for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v > 0}, total


def training_steps(model, args, device):
    """A function that runs n of train.py's training steps on one batch of random images (the pivot dropout a
    tensor, as train.py passes it, so that the compiled graph is train.py's) and waits for the GPU."""
    cfg = model.cfg
    optimizer = train.make_optimizer(model, args)
    images = torch.rand(args.batch_size, cfg.channels, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    labels = torch.randint(0, cfg.num_classes, (args.batch_size,), device=device)
    pivot_dropout = torch.full((), 0.5, device=device)

    def run(n):
        for _ in range(n):
            train.training_step(model, optimizer, images, labels, pivot_dropout, args.grad_clip, args.micro_batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return run


def throughput(model, args, device):
    """(images/s of training steps, timed over args.steps after args.warmup steps; the seconds of the first two
    steps: the first compiles the model when it is compiled, longer on a machine whose compilation cache is empty,
    and a second step as slow means that something made it compile again)."""
    run = training_steps(model, args, device)
    first_two = []
    for _ in range(2):
        start = time.time()
        run(1)
        first_two.append(time.time() - start)
    run(max(0, args.warmup - 2))
    start = time.time()
    run(args.steps)
    return args.steps * args.batch_size / (time.time() - start), first_two


def kernel_kind(name):
    """The kind of a GPU kernel, from its name: attention, a matrix product, a fused elementwise kernel written by
    torch.compile (Triton), or other."""
    if any(key in name for key in ("sdpa", "flash", "fmha", "attention", "cudnn")):
        return "attention"
    if name.startswith(("nvjet", "sm90_xmma", "sm80_xmma", "cutlass", "ampere")) or "gemm" in name:
        return "matrix products"
    return "fused elementwise (Triton)" if name.startswith("triton") else "other"


def profile_steps(model, args, device, steps=6):
    """Trace `steps` training steps (after throughput's): wall ms per step, then kernel_time's three answers."""
    from torch.profiler import ProfilerActivity, profile
    run = training_steps(model, args, device)
    run(3)  # this optimizer's first steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
        start = time.time()
        run(steps)
        wall = (time.time() - start) / steps * 1000
    with tempfile.TemporaryDirectory() as tmp:
        trace.export_chrome_trace(os.path.join(tmp, "trace.json"))
        with open(os.path.join(tmp, "trace.json")) as f:
            events = json.load(f)["traceEvents"]
    kernels = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events if e.get("cat") == "kernel"]
    return (wall, *kernel_time(kernels, steps))


def kernel_time(kernels, steps):
    """From a trace's kernels [(start us, end us, name)] over `steps` steps: (GPU-busy ms per step, {kind: ms per
    step}, [(name, ms per step, launches per step)] of the kernels that take the most time, largest first). Busy
    time is the union of the kernels' intervals, so kernels that overlap count once."""
    busy, end, kinds, names = 0.0, float("-inf"), {}, {}
    for start_us, end_us, name in sorted(kernels):
        busy += max(0.0, end_us - max(start_us, end))
        end = max(end, end_us)
        ms, launches = names.get(name, (0.0, 0))
        names[name] = (ms + (end_us - start_us) / 1000 / steps, launches + 1 / steps)
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + (end_us - start_us) / 1000 / steps
    top = sorted(((name, ms, n) for name, (ms, n) in names.items()), key=lambda row: -row[1])
    return busy / 1000 / steps, dict(sorted(kinds.items(), key=lambda kv: -kv[1])), top


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cifar10", choices=list(himar.PRESETS))
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="as in train.py")
    p.add_argument("--batch-size", type=positive_int, help="default: the preset's recipe")
    p.add_argument("--micro-batch", type=positive_int,
                   help="images per forward/backward pass (default: the preset's recipe)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps (0: count FLOPs only)")
    p.add_argument("--warmup", type=int, default=10,
                   help="untimed steps first (kernel selection, compilation); the first two are never timed")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the training forward pass (default: on a GPU, as train.py)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction,
                   help="replay the compiled parts as CUDA graphs (default: as train.py, where it works)")
    p.add_argument("--device", default="auto", help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--profile", action="store_true", help="trace a few steps on the GPU: where a step's time goes")
    args = p.parse_args(argv)
    if args.steps < 0 or args.warmup < 0:
        p.error("--steps and --warmup count steps: give 0 or more")
    args.device = pick_device(args.device) if args.device == "auto" else args.device  # (auto: cuda if there is one)
    if args.profile and (args.steps == 0 or not args.device.startswith("cuda")):
        p.error("--profile traces training steps on a GPU: it needs --steps > 0 and a CUDA --device")
    args.batch_size = args.batch_size or train.RECIPES[args.preset]["batch_size"]
    args.micro_batch = args.micro_batch or train.RECIPES[args.preset]["micro_batch"]
    if problem := train.cuda_graphs_problem(args):
        p.error(problem)
    if args.micro_batch and args.micro_batch > args.batch_size:
        p.error(f"--micro-batch {args.micro_batch} is more than the batch (--batch-size {args.batch_size})")
    pick_device(args.device)  # (a clear message for a device that is not there)
    args.lr, args.weight_decay, args.grad_clip = 1e-4, 0.02, 3.0
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    model = himar.HiMAR(train.config_from_args(args))
    parts, forward = flops_by_part(model)
    print(f"{args.preset}: {model.num_params() / 1e6:.2f}M parameters; {forward / 1e9:.2f} GFLOP per image in one "
          "forward pass")
    for name, flops in parts.items():
        print(f"  {name:<20} {flops / 1e9:7.2f} GFLOP  {100 * flops / forward:5.1f}%")
    model.to(device)
    per_image, _ = count_flops(model, device, backward=True)
    print(f"one training step: {per_image / 1e9:.2f} GFLOP per image (forward + backward, on {device.type})")
    result = {"parts": parts, "forward": forward, "train_flops": per_image}
    if args.steps > 0:
        train.compile_model(model, args, device)
        rate, (first, second) = throughput(model, args, device)
        print(f"the first two training steps took {first:.2f} s and {second:.2f} s (the first compiles the model, "
              "when compiled; a second as slow compiled it again)")
        result["first_steps_s"] = [first, second]
        memory = ""
        if device.type == "cuda":
            memory = f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
        passes = f" in micro-batches of {args.micro_batch}" if args.micro_batch else ""
        print(f"training: batch {args.batch_size}{passes}, {rate:.0f} images/s, "
              f"{rate * per_image / 1e12:.1f} TFLOP/s{memory}")
        result["images_per_s"] = rate
    if args.profile:
        wall, busy, kinds, top = profile_steps(model, args, device)
        print(f"profile: {wall:.1f} ms per step, the GPU busy running kernels {busy:.1f} ms of it "
              f"({100 * busy / wall:.0f}%)")
        for kind, ms in kinds.items():
            print(f"  {kind:<28} {ms:6.1f} ms per step")
        print("the 15 kernels that take the most time (ms per step, launches per step, name):")
        for name, ms, launches in top[:15]:
            print(f"  {ms:6.2f} {launches:5.0f}  {name[:100]}")
        result["profile"] = {"wall_ms": wall, "busy_ms": busy, "kinds_ms": kinds, "top_kernels": top[:15]}
    return result


if __name__ == "__main__":
    main()
