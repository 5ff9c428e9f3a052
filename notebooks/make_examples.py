"""Rebuild cifar10_examples.npz: a few real CIFAR-10 test images for the notebooks.

    python make_examples.py PATH/TO/cifar10/test.tar.gz            # writes cifar10_examples.npz next to this file
    python make_examples.py TARBALL --per-class 2 --out OTHER.npz

The tarball holds test/<class>/<nnnn>.jpg; the class folders sort in CIFAR-10's label order
(airplane = 0 ... truck = 9). The first `--per-class` images of each class (by file name) are kept.
The npz holds images (uint8 [N, 32, 32, 3]), labels (int64 [N]) and class_names.
"""

import argparse
import io
import os
import tarfile

import numpy as np
from PIL import Image


def read_examples(tarball, per_class):
    """{class name: [(file name, uint8 [32, 32, 3]), ...]} with the first `per_class` files of each class."""
    chosen = {}
    with tarfile.open(tarball) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.lower().endswith(".jpg")),
                         key=lambda m: m.name)
        for m in members:
            parts = m.name.split("/")
            if len(parts) < 2:
                continue
            name = parts[-2]
            if len(chosen.setdefault(name, [])) < per_class:
                with Image.open(io.BytesIO(tar.extractfile(m).read())) as img:
                    chosen[name].append((parts[-1], np.asarray(img.convert("RGB"), dtype=np.uint8)))
    return chosen


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tarball", help="the CIFAR-10 test tarball (test/<class>/<nnnn>.jpg)")
    p.add_argument("--per-class", type=int, default=2, help="images per class")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar10_examples.npz"))
    args = p.parse_args(argv)
    if not os.path.isfile(args.tarball):
        raise SystemExit(f"error: no file at {args.tarball}")
    chosen = read_examples(args.tarball, args.per_class)
    class_names = sorted(chosen)
    if len(class_names) != 10:
        raise SystemExit(f"error: expected 10 class folders in {args.tarball}, found {len(class_names)}")
    images, labels = [], []
    for label, name in enumerate(class_names):
        for _, image in chosen[name]:
            if image.shape != (32, 32, 3):
                raise SystemExit(f"error: {name} holds an image of shape {image.shape}, expected 32x32 RGB")
            images.append(image)
            labels.append(label)
    np.savez_compressed(args.out, images=np.stack(images), labels=np.array(labels, dtype=np.int64),
                        class_names=np.array(class_names))
    print(f"wrote {args.out}: {len(images)} images, {os.path.getsize(args.out) / 1024:.1f} KB")


if __name__ == "__main__":
    main()
