"""Keep only what sampling needs from a training checkpoint: the config and the EMA weights in bf16, optionally with
other default sampling settings (fields of himar.Sampling, written as train.py's --set).

    python scripts/export_checkpoint.py runs/cifar10/checkpoint.pt checkpoints/himar_cifar10.pt
    python scripts/export_checkpoint.py runs/cifar10/checkpoint.pt out.pt --set pivot_cfg=12 --set dense_cfg=2.5
"""

import argparse
import os
import sys
from dataclasses import fields, replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoints  # noqa: E402
import himar  # noqa: E402
import train  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("source")
p.add_argument("target")
p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a default sampling setting")
args = p.parse_args()
checkpoint = checkpoints.load_checkpoint(args.source)
cfg = checkpoints.config_from_checkpoint(checkpoint)
changes = train.config_overrides(args.set)
if not set(changes) <= {f.name for f in fields(himar.Sampling)}:
    raise SystemExit("error: --set changes only sampling settings here (the weights fix the model's sizes)")
cfg = replace(cfg, sampling=replace(cfg.sampling, **changes))
ema = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in checkpoint["ema"].items()}
checkpoints.save_checkpoint(args.target, himar.to_checkpoint(cfg, ema=ema, step=checkpoint["step"]))
print(f"wrote {args.target}: {os.path.getsize(args.target) / 2**20:.1f} MiB, sampling {cfg.sampling}")
