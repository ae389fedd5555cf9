#!/usr/bin/env bash
# Issue #3's real run: student e5-small, domain teacher minilm-l6 MLM-pretrained on ICD-10-CM,
# base vs mlkd vs ensemble on the same KTAS split. Usage: scripts/ktas_methods.sh [RUNS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUNS=${1:-runs}
TEACHER=${TEACHER:-models/pretrained/minilm-l6-icd10cm}
COMMON=(--student e5-small --data ktas --epochs "${EPOCHS:-2}" --patience 2 --batch-size 16 --encoder-lr 5e-5 --head-lr 1e-3
        --freeze-embeddings --max-length 128 --seed 42)
for method in ${METHODS:-base mlkd ensemble}; do
  split=()
  [ "$method" = base ] || split=(--split-file "$RUNS/e5-base/split.json")
  teacher=()
  [ "$method" = base ] || teacher=(--teacher "$TEACHER")
  start=$(date +%s)
  "$PY" -m training fit --method "$method" "${COMMON[@]}" "${split[@]}" "${teacher[@]}" --out "$RUNS/e5-$method"
  echo "e5-$method wall seconds: $(( $(date +%s) - start ))" | tee -a "$RUNS/wall_times.txt"
done
