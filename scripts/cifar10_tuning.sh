#!/usr/bin/env bash
# Short runs that chose the cifar10 preset's heads, side by side on one GPU (run on an H100):
#   1. throughput of the config with a 320-wide DiT head, eager and with --compile;
#   2. three head variants, 3000 steps each, trained at the same time, each sampled (10,000) and scored;
#   3. sampling settings of the best variant (speed against quality, 5,000 samples each).
#   bash scripts/cifar10_tuning.sh PATH/TO/score_cifar10.py DATA_DIR OUT_DIR
set -uo pipefail
scorer=${1:?usage: bash scripts/cifar10_tuning.sh SCORER DATA_DIR OUT_DIR}
data=${2:?}
out=${3:?}
mkdir -p "$out"
wide="--set dit_head_width=320 --set dit_head_heads=5"  # the config benchmarked then
python train.py --data-dir "$data" --out-dir "$out/bench" --benchmark $wide 2>&1 | grep -E "GFLOP|throughput"
python train.py --data-dir "$data" --out-dir "$out/bench" --benchmark --compile $wide 2>&1 | grep -E "GFLOP|throughput"

# scored with the sampling settings of that time (K1 16, K2 4, CFG 2 / 2), which the checkpoints keep as defaults
old_sampling="--set pivot_steps=16 --set dense_steps=4 --set pivot_cfg=2.0 --set dense_cfg=2.0"
declare -A variants=(
  [dit256_r1]="--set dit_head_width=256 --set dit_head_heads=4 --set dit_head_repeats=1 $old_sampling"
  [dit320_r2]="--set dit_head_width=320 --set dit_head_heads=5 --set dit_head_repeats=2 $old_sampling"
  [dit320_r2_mlp512]="--set dit_head_width=320 --set dit_head_heads=5 --set dit_head_repeats=2 --set mlp_head_width=512 $old_sampling"
)
for name in "${!variants[@]}"; do
  # shellcheck disable=SC2086
  bash scripts/train_and_score.sh "$out/$name" "$scorer" --data-dir "$data" --max-steps 3000 --compile \
      --sample-every 3000 --ckpt-every 3000 ${variants[$name]} > "$out/$name.log" 2>&1 &
done
wait
for name in "${!variants[@]}"; do echo "$name $(tail -n 1 "$out/$name/score.json" 2>/dev/null)"; done

best=$(python - "$out" "${!variants[@]}" <<'PY'
import json, sys
out, names = sys.argv[1], sys.argv[2:]
scores = {}
for n in names:
    try:
        scores[n] = json.loads(open(f"{out}/{n}/score.json").read().strip().splitlines()[-1])["fd"]
    except Exception:
        pass
print(min(scores, key=scores.get))
PY
)
echo "sweep on $best"
python scripts/sampling_sweep.py --ckpt "$out/$best/ema_bf16.pt" --scorer "$scorer" --num-images 5000 \
    --out "$out/sweep.jsonl" --settings '{}' '{"pivot_cfg": 3.0}' '{"pivot_cfg": 4.0, "dense_cfg": 3.0}' \
    '{"temperature": 0.9}' '{"dense_diffusion_steps": [50, 10]}' '{"pivot_diffusion_steps": 25, "dense_diffusion_steps": 25}'
