#!/usr/bin/env bash
# The leave-one-source-out arms of docs/model-quality.md (the default that carries to a new
# hospital), three seeds each, resumable: run again and finished folds are reused.
#
#   bash bench/arms.sh ../shared/data/cxr-dev /work/cv [ARM ...]
#   SEEDS="1 2" bash bench/arms.sh ../shared/data/cxr-dev /work/cv ho-eq-lungs-p4
#
# Every arm: EfficientNet-Lite0 ImageNet at 224 px, the sources --exclude-confounded keeps
# (on cxr-dev: raddb), the head alone on the frozen backbone (no fine-tuning); they differ in
# the grey levels, the crop and the stages the head pools.
set -euo pipefail
data=$1; out=$2; shift 2
declare -A ARMS=(
  [ho-none]="--intensity none --crop 0 --pooled-stages 1"
  [ho-eq-crop]="--intensity equalize --crop 0.08 --pooled-stages 1"
  [ho-clahe-crop]="--intensity clahe --crop 0.08 --pooled-stages 1"
  [ho-eq-crop-p4]="--intensity equalize --crop 0.08 --pooled-stages 4"
  [ho-eq-lungs]="--intensity equalize --crop lungs --pooled-stages 1"
  [ho-eq-lungs-p4]="--intensity equalize --crop lungs --pooled-stages 4"
  [ho-clahe-lungs-p4]="--intensity clahe --crop lungs --pooled-stages 4"
)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(ho-eq-lungs-p4 ho-eq-crop-p4 ho-eq-crop ho-eq-lungs ho-none ho-clahe-crop ho-clahe-lungs-p4)
for seed in ${SEEDS:-0 1 2}; do
  for name in "${names[@]}"; do
    started=$(date +%s)
    covidxray crossval "$data" --by source --source-from-prefix --out "$out/$name-s$seed" \
      --seed "$seed" --backbone efficientnet-lite0 --weights imagenet --image-size 224 \
      --head-epochs 10 --finetune-epochs 0 --bootstrap 500 --feature-cache "$out/cache" \
      --resume --quiet ${ARMS[$name]} > "$out/$name-s$seed.log" 2>&1
    echo "$name seed $seed: $(( $(date +%s) - started )) s" >> "$out/minutes.log"
  done
done
