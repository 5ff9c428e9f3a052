#!/usr/bin/env bash
# The CIFAR-10 reference run end to end on one GPU: train with the defaults, sample 10,000 images with the
# default settings, score them, and keep the EMA weights as the shipped checkpoint.
#   bash scripts/cifar10_reference.sh PATH/TO/score_cifar10.py
set -euo pipefail
scorer=${1:?usage: bash scripts/cifar10_reference.sh PATH/TO/score_cifar10.py}
bash scripts/train_and_score.sh runs/cifar10 "$scorer"
cp runs/cifar10/ema_bf16.pt checkpoints/himar_cifar10.pt
