#!/usr/bin/env bash
# Build the default model bundle at OUT (default $TRIAGE_BUNDLE, else models/default) unless one is there,
# from what ships with the project: the bundled KTAS records rendered `mixed` (shorthand, narrative English and
# Korean-English notes drawn per record and per epoch; docs/results/renderings.md), student e5-small, and, for
# a distillation METHOD, the domain teacher minilm-l6 MLM-pretrained on ICD-10-CM. METHOD defaults to the
# method that did best in docs/results/ktas_dsgkd.md. The evaluation calibrates the model on the validation
# split and ships the target-sensitivity threshold (the defaults of `fit`). Seeded: the same machine builds the
# same bundle.
#
# Each stage is kept once finished (encoders and teacher under $TRIAGE_MODELS_DIR/pretrained/, default
# models/pretrained/; the run under BUILD, default models/.build/NAME; `docker compose` puts both in its
# `model-work` volume, so that ./models holds only the bundle), so a stopped build resumes at the stage it
# was in; the bundle is written next to OUT and moved into place once complete, so the service never sees
# a half-written one.
set -euo pipefail

out="${1:-${TRIAGE_BUNDLE:-models/default}}"
method="${METHOD:-base}"

# First, before anything slow: a present bundle is kept whatever METHOD says (remove it to rebuild).
if [ -f "$out/manifest.json" ]; then
    echo "a bundle is already at $out; nothing to build (METHOD=$method not used; remove $out to rebuild)"
    exit 0
fi
start=$(date +%s)
name="$(basename "$out")"
build="${BUILD:-$(dirname "$out")/.build/$name}"
teacher="${TEACHER:-$(python -c 'from training.pretrained import models_dir; print(models_dir())')/pretrained/minilm-l6-icd10cm}"
echo "building the default bundle at $out: METHOD=$method, intermediates under $build"

python -m training prepare-models e5-small minilm-l6

distill=()
if [ "$method" != base ]; then
    if [ ! -f "$teacher/pretrain.json" ]; then  # rerunning pretrain on its --out resumes it
        python -m training pretrain --model minilm-l6 --corpus icd10cm --out "$teacher" \
            --max-steps 1000 --learning-rate 2e-4 --batch-size 32 --save-steps 250 --seed 0
    fi
    distill=(--teacher "$teacher" --no-teacher-cache)  # the notes change every epoch: no cache of them
fi

run="$build/run-$method-mixed"
if [ ! -f "$run/eval/metrics.json" ]; then
    rm -rf "$run"  # a fit stopped half-way starts over
    python -m training fit --data ktas --render mixed --student e5-small --method "$method" "${distill[@]}" \
        --epochs 10 --patience 3 --batch-size 16 --encoder-lr 1e-4 --head-lr 1e-3 --freeze-embeddings \
        --max-length 256 --seed 0 --out "$run"
fi

partial="$out.partial"
rm -rf "$partial"
python -m training export --run "$run" --out "$partial" --name "$name"
mv "$partial" "$out"
echo "default bundle written to $out in $(( $(date +%s) - start )) s"
