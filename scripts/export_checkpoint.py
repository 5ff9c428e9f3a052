"""Keep only what sampling needs from a training checkpoint: the config and the EMA weights in bf16.

    python scripts/export_checkpoint.py runs/cifar10/checkpoint.pt checkpoints/himar_cifar10.pt
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import himar  # noqa: E402

source, target = sys.argv[1], sys.argv[2]
checkpoint = himar.load_checkpoint(source)
ema = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in checkpoint["ema"].items()}
himar.save_checkpoint(target, {"config": checkpoint["config"], "ema": ema, "step": checkpoint["step"]})
print(f"wrote {target}: {os.path.getsize(target) / 2**20:.1f} MiB")
