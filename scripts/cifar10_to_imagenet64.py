"""CIFAR-10 as a stand-in for ImageNet 64x64: the training images enlarged to 64x64 (bilinear) and written in the
downsampled-ImageNet npz format that `train.py --dataset imagenet64` reads, so the 64-pixel path can be trained and
checked end to end without ImageNet.

    python scripts/cifar10_to_imagenet64.py --data-dir ./data --out ./data/cifar10_64
    python train.py --dataset imagenet64 --data-dir ./data/cifar10_64 --set num_classes=10 --max-minutes 10

Writes OUT/train_data_batch_1.npz ... train_data_batch_5.npz (10,000 images each): `data` uint8 [N, 12288], channel
planar (all red values of an image, then green, then blue, each plane row by row), and `labels`, counted from 1 as
in the ImageNet files (the train_data_batch files of an earlier conversion in OUT are replaced). To score samples
of such a model with a CIFAR-10 scorer, shrink them back to 32x32 (2x2 mean).
"""

import argparse
import glob
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import DataError, load_dataset  # noqa: E402
from sample import positive_int  # noqa: E402


def enlarge_to_64(images):
    """uint8 images [N, 32, 32, 3] -> uint8 [N, 64, 64, 3], bilinear."""
    x = images.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="./data", help="the folder that holds cifar-10-batches-py/ (as train.py)")
    p.add_argument("--out", required=True, help="folder for the train_data_batch_N.npz files")
    p.add_argument("--per-file", type=positive_int, default=10000, help="images per npz file")
    args = p.parse_args(argv)
    try:
        cifar = load_dataset("cifar10", args.data_dir, 32)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise SystemExit(f"error: --out {args.out} is a file: give a folder for the npz files")
    os.makedirs(args.out, exist_ok=True)
    earlier = glob.glob(os.path.join(args.out, "train_data_batch_*.npz"))
    for path in earlier:  # (left there, they would be read along with the new files: images twice)
        os.remove(path)
    if earlier:
        print(f"removed the {len(earlier)} train_data_batch files of an earlier conversion in {args.out}")
    n = len(cifar.labels)
    for k, first in enumerate(tqdm(range(0, n, args.per_file), desc="writing", unit="file")):
        rows = slice(first, min(n, first + args.per_file))
        planar = enlarge_to_64(cifar.images[rows]).permute(0, 3, 1, 2).reshape(-1, 3 * 64 * 64)  # [N, 12288]
        path = os.path.join(args.out, f"train_data_batch_{k + 1}.npz")
        np.savez(path, data=planar.numpy(), labels=cifar.labels[rows].numpy() + 1)
    print(f"wrote {n} images of 64x64 to {args.out} in {k + 1} files")


if __name__ == "__main__":
    main()
