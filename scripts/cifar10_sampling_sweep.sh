#!/usr/bin/env bash
# Speed against quality of the sampling settings for one CIFAR-10 checkpoint (5,000 samples per setting): what
# the cifar10 preset's sampling defaults were chosen from. Each setting changes one thing (or, the last, several)
# from the settings the checkpoint was trained with: K1 = 16, K2 = 4, CFG 2 / 2, temperature 1, 50 / 50
# diffusion steps. Appends one JSON line per setting to OUT.
#   bash scripts/cifar10_sampling_sweep.sh CKPT PATH/TO/score_cifar10.py OUT.jsonl
set -euo pipefail
ckpt=${1:?usage: bash scripts/cifar10_sampling_sweep.sh CKPT SCORER OUT.jsonl}
scorer=${2:?}
out=${3:?}
base='"pivot_steps": 16, "dense_steps": 4, "pivot_cfg": 2.0, "dense_cfg": 2.0, "temperature": 1.0, "pivot_diffusion_steps": 50, "dense_diffusion_steps": 50'
python scripts/sampling_sweep.py --ckpt "$ckpt" --scorer "$scorer" --num-images 5000 --out "$out" --settings \
    "{$base}" \
    "{$base, \"dense_steps\": 1}" \
    "{$base, \"dense_steps\": 2}" \
    "{$base, \"pivot_steps\": 32}" \
    "{$base, \"pivot_cfg\": 3.0, \"dense_cfg\": 3.0}" \
    "{$base, \"pivot_cfg\": 4.0}" \
    "{$base, \"temperature\": 0.9}" \
    "{$base, \"dense_diffusion_steps\": [50, 10]}" \
    "{$base, \"pivot_diffusion_steps\": 25, \"dense_diffusion_steps\": 25}" \
    "{$base, \"dense_steps\": 1, \"pivot_steps\": 32, \"pivot_cfg\": 3.0, \"dense_cfg\": 3.0}"
