#!/usr/bin/env bash
# COVID-19 or another pneumonia (docs/model-quality.md): the binary default against the
# three-class model under leave-one-source-out on cxr-dev + cxr-ieee-extra, three seeds each.
# The two copies of the ieee8023 collection are one source and share patients, so holding
# out ieee holds out every ieee8023 patient.
#
#   bash bench/arms24.sh ../shared/data /work/cv24
#
# SEEDS (default "0 1 2") and ARMS_RUN ("binary three") choose the runs; CROSSVAL_ARGS is
# added to each (e.g. --no-random-split: the held-out folds alone, all the table needs).
set -euo pipefail
data=$1; out=$2
declare -A ARMS=(
  [binary]=""
  [three]="--classes covid pneumonia normal"
)
for seed in ${SEEDS:-0 1 2}; do
  for name in ${ARMS_RUN:-binary three}; do
    started=$(date +%s)
    covidxray crossval "$data/cxr-dev" "$data/cxr-ieee-extra" --by source --source-from-prefix \
      --same-patients ieeefull=ieee --same-sources ieeefull=ieee --out "$out/$name-s$seed" \
      --seed "$seed" --backbone efficientnet-lite0 --weights imagenet --bootstrap 500 \
      --feature-cache "$out/cache" --resume --quiet ${ARMS[$name]} ${CROSSVAL_ARGS:-} \
      > "$out/$name-s$seed.log" 2>&1
    echo "$name seed $seed: $(( $(date +%s) - started )) s" >> "$out/minutes.log"
  done
done
