#!/usr/bin/env bash
# Train one CIFAR-10 run, keep its EMA weights in bf16, sample 10,000 images with the default settings and score them.
#   bash scripts/train_and_score.sh OUT_DIR PATH/TO/score_cifar10.py [train.py flags ...]
# Writes OUT_DIR/{checkpoint.pt, ema_bf16.pt, metrics.jsonl, loss.png, grid.png, trajectory.png, samples.npz, score.json}.
set -euo pipefail
out=${1:?usage: bash scripts/train_and_score.sh OUT_DIR SCORER [train.py flags ...]}
scorer=${2:?usage: bash scripts/train_and_score.sh OUT_DIR SCORER [train.py flags ...]}
shift 2
python train.py --out-dir "$out" "$@"
python scripts/export_checkpoint.py "$out/checkpoint.pt" "$out/ema_bf16.pt"
python sample.py --ckpt "$out/ema_bf16.pt" --grid "$out/grid.png" --trajectory "$out/trajectory.png" \
    --num-images 10000 --npz "$out/samples.npz" --batch-size 1000
python "$scorer" "$out/samples.npz" | tee "$out/score.json"
