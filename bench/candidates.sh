#!/usr/bin/env bash
# Train every candidate of bench/candidates.txt over seeds 0, 1 and 2, for the people who hold
# the outside sets to score (issue 32): OUT/<name>-s<seed>, each a run folder any covidxray
# command takes (an ensemble candidate is built from its members' runs of the same seed).
#
#   bash bench/candidates.sh ../shared/data/cxr-dev /work/candidates [NAME ...]
#   SEEDS="0" bash bench/candidates.sh DATA OUT clahe lungs-only
#
# Resumable: a finished run is kept, an interrupted one resumed. Minutes per run go to
# OUT/minutes.log. Every run: covidxray train DATA --source-from-prefix --backbone
# efficientnet-lite0 --seed S, then the candidate's own options.
set -euo pipefail
data=$1; out=$2; shift 2
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
declare -A OPTIONS
names=()
while IFS='|' read -r name options _reason; do
  name=$(echo "$name" | xargs)
  [[ -z "$name" || "$name" == \#* ]] && continue
  OPTIONS[$name]=$(echo "$options" | xargs)
  names+=("$name")
done < "$here/candidates.txt"
[ $# -gt 0 ] && names=("$@")
for seed in ${SEEDS:-0 1 2}; do
  for name in "${names[@]}"; do
    [ -n "${OPTIONS[$name]+set}" ] || { echo "unknown candidate: $name" >&2; exit 2; }
    run="$out/$name-s$seed"
    if [ -f "$run/metadata.json" ]; then continue; fi
    started=$(date +%s)
    options=${OPTIONS[$name]}
    if [[ "$options" == ensemble:* ]]; then
      members=()
      for member in ${options#ensemble:}; do members+=("$out/$member-s$seed"); done
      covidxray ensemble "${members[@]}" --out "$run" --quiet > "$run.log" 2>&1
    elif [ -f "$run/config.json" ]; then
      covidxray train --resume --out "$run" --quiet > "$run.log" 2>&1
    else
      # shellcheck disable=SC2086  # the options are words
      covidxray train "$data" --source-from-prefix --backbone efficientnet-lite0 --seed "$seed" \
        --out "$run" --quiet $options > "$run.log" 2>&1
    fi
    echo "$name seed $seed: $(( $(date +%s) - started )) s" >> "$out/minutes.log"
  done
done
