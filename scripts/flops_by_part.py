"""Where a model's compute goes: the FLOPs of one forward pass per image, split by Hi-MAR's top-level parts.

    python scripts/flops_by_part.py                                   # the cifar10 preset
    python scripts/flops_by_part.py --preset imagenet64 --set dense_head=mlp

Counted by PyTorch's FLOP counter (matrix products, attention included) on a CPU batch of 4 with no pivots
dropped. The backward pass costs about twice the forward in every part, so the shares are about those of
training too.
"""

import argparse
import os
import sys

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import himar  # noqa: E402
import train  # noqa: E402


def flops_by_part(model, batch=4):
    """{part: forward FLOPs per image} for the model's direct children (a ModuleList counts as one part),
    largest first, and the total of the whole forward pass."""
    cfg = model.cfg
    images = torch.zeros(batch, cfg.channels, cfg.image_size, cfg.image_size)
    labels = torch.zeros(batch, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    # the math attention kernel is made of matrix products that the counter sees, on any device
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(images, labels, pivot_dropout=0.0)
    counts = {name: sum(c.values()) for name, c in counter.get_flop_counts().items()}  # module path -> FLOPs
    root = type(model).__name__
    parts = {}
    for name, child in model.named_children():
        paths = [f"{root}.{name}.{i}" for i in range(len(child))] if isinstance(child, nn.ModuleList) else [f"{root}.{name}"]
        parts[name] = sum(counts.get(path, 0) for path in paths) / batch
    parts = {k: v for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v > 0}
    return parts, counter.get_total_flops() / batch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cifar10", choices=list(himar.PRESETS))
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="as in train.py")
    args = p.parse_args(argv)
    model = himar.HiMAR(train.config_from_args(args))
    parts, total = flops_by_part(model)
    print(f"{args.preset}: {total / 1e9:.2f} GFLOP per image in one forward pass")
    for name, flops in parts.items():
        print(f"  {name:<16} {flops / 1e9:7.2f} GFLOP  {100 * flops / total:5.1f}%")
    return parts, total


if __name__ == "__main__":
    main()
