#!/usr/bin/env bash
# The CIFAR-10 reference run end to end on one GPU: train with the defaults, export the shipped checkpoint,
# sample 10,000 images with the default settings and score them.
#   bash scripts/cifar10_reference.sh PATH/TO/score_cifar10.py
set -euo pipefail
scorer=${1:?usage: bash scripts/cifar10_reference.sh PATH/TO/score_cifar10.py}
python train.py --out-dir runs/cifar10
python scripts/export_checkpoint.py runs/cifar10/checkpoint.pt checkpoints/himar_cifar10.pt
python sample.py --ckpt checkpoints/himar_cifar10.pt --grid runs/cifar10/grid.png --trajectory runs/cifar10/trajectory.png \
    --num-images 10000 --npz runs/cifar10/samples.npz
python "$scorer" runs/cifar10/samples.npz
