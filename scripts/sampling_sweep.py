"""Speed / quality of sampling settings for one checkpoint: sample N images per setting, time it, score it.

    python scripts/sampling_sweep.py --ckpt runs/cifar10/checkpoint.pt --scorer PATH/score_cifar10.py \
        --num-images 10000 --out sweep.jsonl --settings "{}" '{"dense_diffusion_steps": 25}'

Each setting is a JSON dict of HiMAR.sample arguments (missing ones keep the checkpoint's defaults), e.g.
'{"drop_pivots": true}'; with '{"pivots_only": true}' the images scored are phase 1's pivot images (16x16 on
CIFAR-10), enlarged 2x (bilinear): where phase 1 stands on its own.
One JSON line per setting: the setting, seconds, images/s, and the scorer's output (fd, acc, ...).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import himar  # noqa: E402


def generate(model, labels, seed, setting):
    """model.sample(labels, seed=seed, **setting), or with setting["pivots_only"] the pivot images, enlarged 2x."""
    setting = dict(setting)
    if not setting.pop("pivots_only", False):
        return model.sample(labels, seed=seed, **setting)
    _, frames = model.sample(labels, seed=seed, trajectory=True, **setting)
    pivots = [f["image"] for f in frames if f["phase"] == "pivot"][-1]  # phase 1's last frame: every pivot revealed
    return F.interpolate(pivots, scale_factor=2, mode="bilinear", align_corners=False).clamp(-1, 1)


def sample_and_score(model, num_images, setting, scorer=None, batch_size=1000, keep=None):
    """Sample num_images images (classes in turn) with model.sample(**setting), timed after a warm-up, and score
    them with the scorer script if one is given. Returns {"setting", "n", "seconds", "images_per_s", scores...}.
    keep: also save the samples there (an npz in the ADM layout)."""
    device = next(model.parameters()).device
    labels = torch.arange(num_images) % model.cfg.num_classes
    generate(model, labels[:8].to(device), 123, setting)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.time()
    chunks = [himar.to_uint8(generate(model, labels[i:i + batch_size].to(device), i, setting))
              for i in range(0, num_images, batch_size)]
    seconds = time.time() - start
    row = {"setting": setting, "n": num_images, "seconds": round(seconds, 1), "images_per_s": round(num_images / seconds, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        path = keep or os.path.join(tmp, "samples.npz")
        np.savez(path, arr_0=np.concatenate(chunks), arr_1=labels.numpy())
        if scorer:
            out = subprocess.run([sys.executable, scorer, path, "--device", device.type],
                                 capture_output=True, text=True, check=True).stdout
            row.update(json.loads(out.strip().splitlines()[-1]))
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--scorer", help="path of score_cifar10.py (skip scoring if not given)")
    p.add_argument("--num-images", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--out", default="sweep.jsonl")
    p.add_argument("--settings", nargs="+", default=["{}"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    model = himar.model_from_checkpoint(args.ckpt, args.device)
    for text in args.settings:
        row = sample_and_score(model, args.num_images, json.loads(text), args.scorer, args.batch_size)
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
