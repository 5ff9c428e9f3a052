"""Zero-shot editing measured: keep the right half of real CIFAR-10 test images, generate the left half as the true
class, and count how often a CIFAR-10 classifier still sees that class in the edit, against the unedited images.

    python scripts/cifar10_editing.py --scorer PATH/score_cifar10.py --data-dir ./data --num-images 1000 \
        --grid figures/cifar10_editing.png

The classifier is the scorer's (a development yardstick: the product does not need it). Prints one JSON line:
the number of images, the seconds spent editing, and the scorer's accuracy on the edits and on the originals.
--grid also writes a picture of the first 8 edits, one row each, named by its class: the original, the kept half
(the generated pixels magenta), the edit.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoints  # noqa: E402
import pictures  # noqa: E402
import sample  # noqa: E402
from sampling_sweep import check_scorer, score, test_images  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=sample.SHIPPED_CHECKPOINT)
    p.add_argument("--scorer", required=True, help="path of score_cifar10.py")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--num-images", type=sample.positive_int, default=1000)
    p.add_argument("--keep", default="right", choices=sample.KEEP_REGIONS)
    p.add_argument("--batch-size", type=sample.positive_int, default=100)
    p.add_argument("--grid", help="PNG of the first 8 edits")
    p.add_argument("--device", default="auto", help="cuda, cpu, ... (default: cuda if available)")
    args = p.parse_args()
    check_scorer(args.scorer)
    if args.grid:
        sample.check_writable("grid", args.grid, sample.OUTPUTS["grid"])
    device = torch.device(sample.pick_device(args.device))
    model = checkpoints.load_model(args.ckpt, device)
    cfg = model.cfg
    originals, labels = test_images(args.data_dir, args.num_images)
    keep = sample.keep_mask(args.keep, cfg.image_size, cfg.patch_size)  # [H, W]
    pixels = torch.from_numpy(originals).permute(0, 3, 1, 2).float() / 127.5 - 1  # [N, 3, H, W]

    start, edits = time.time(), []
    for i in range(0, len(pixels), args.batch_size):
        x = pixels[i:i + args.batch_size].to(device)
        edited = model.sample(torch.from_numpy(labels[i:i + args.batch_size]).to(device), seed=i,
                              known_images=x, known_mask=keep.to(device).expand(len(x), -1, -1))
        edits.append(pictures.to_uint8(edited))
        print(f"edited {i + len(x)} / {len(pixels)} in {time.time() - start:.0f} s", file=sys.stderr)
    seconds = time.time() - start
    edits = np.concatenate(edits)

    if args.grid:
        n = min(8, len(edits))
        kept = torch.where(keep, pixels[:n], pictures.MAGENTA)
        edited = torch.from_numpy(edits[:n]).permute(0, 3, 1, 2).float() / 127.5 - 1
        rows = torch.stack([pixels[:n], kept, edited], dim=1)  # [n, 3, C, H, W]: original, kept, edit
        names = pictures.class_names(labels[:n], cfg.num_classes)
        pictures.save_grid(rows.flatten(0, 1), 3, args.grid, row_names=names)
    print(json.dumps({"n": len(edits), "keep": args.keep, "seconds": round(seconds, 1), "device": str(device),
                      "acc_edits": score(args.scorer, edits, labels, device.type)["acc"],
                      "acc_originals": score(args.scorer, originals, labels, device.type)["acc"]}))


if __name__ == "__main__":
    with sample.errors_for_people():
        main()
