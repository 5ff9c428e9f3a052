"""Keep only what sampling needs from a training checkpoint: the config and the EMA weights in bf16, optionally with
other default sampling settings (fields of himar.Sampling, written as train.py's --set).

    python scripts/export_checkpoint.py runs/cifar10/checkpoint.pt checkpoints/himar_cifar10.pt
    python scripts/export_checkpoint.py runs/cifar10/checkpoint.pt out.pt --set pivot_cfg=12 --set dense_cfg=2.5

The target may replace an exported file, never a training checkpoint (one that holds the optimizer's state: the
only copy of a run's progress).
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
from sample import check_writable, errors_for_people  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a checkpoint that train.py wrote")
    p.add_argument("target", help="the file to write (.pt)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a default sampling setting")
    args = p.parse_args(argv)
    check_writable("target", args.target, (".pt",))
    if os.path.exists(args.target) and "optimizer" in checkpoints.load_checkpoint(args.target):
        p.error(f"{args.target} is a training checkpoint (it holds the optimizer's state, which an export drops): "
                "write the export to another file")
    model = checkpoints.load_model(args.source)  # the EMA weights, checked against their config and for NaN / inf
    changes = train.config_overrides(args.set)
    if not set(changes) <= {f.name for f in fields(himar.Sampling)}:
        p.error("--set changes only sampling settings here (the weights fix the model's sizes)")
    try:
        cfg = replace(model.cfg, sampling=replace(model.cfg.sampling, **changes))
    except ValueError as e:
        p.error(f"--set: {e}")
    ema = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    step = checkpoints.load_checkpoint(args.source).get("step")
    checkpoints.save_checkpoint(args.target, himar.to_checkpoint(cfg, ema=ema, step=step))
    print(f"wrote {args.target}: {os.path.getsize(args.target) / 2**20:.1f} MiB, sampling {cfg.sampling}")


if __name__ == "__main__":
    with errors_for_people():
        main()
