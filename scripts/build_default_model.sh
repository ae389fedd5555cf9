#!/usr/bin/env bash
# Build the default model bundle at OUT (default $TRIAGE_BUNDLE, else models/default) unless one is there,
# from what ships with the project: the bundled KTAS records rendered `mixed` (shorthand, narrative English and
# Korean-English notes drawn per record and per epoch; docs/results/renderings.md), student e5-small, and, for
# a distillation METHOD, the domain teacher minilm-l6 MLM-pretrained on ICD-10-CM. METHOD defaults to the
# method that did best in docs/results/ktas_dsgkd.md. The evaluation calibrates the model on the validation
# split and ships the target-sensitivity threshold (the defaults of `fit`). With LAYERS below 12 (default
# 6), that model is then distilled into a LAYERS-layer student made of its own layers (`fit --method
# layer-kd --student-layers`), fine-tuned quantization-aware for a short final run, and that student is exported
# (docs/results/compression.md). Seeded: the same machine builds the same bundle.
#
# Each stage is kept once finished (encoders and teacher under $TRIAGE_MODELS_DIR/pretrained/, default
# models/pretrained/; the runs under BUILD, default models/.build/NAME; `docker compose` puts both in its
# `model-work` volume, so that ./models holds only the bundle), so a stopped build resumes at the stage it
# was in, and a training stopped part-way resumes from its last epoch (`fit --resume`); the bundle is written
# next to OUT and moved into place once complete, so the service never sees a half-written one.
set -euo pipefail

out="${1:-${TRIAGE_BUNDLE:-models/default}}"
method="${METHOD:-base}"
layers="${LAYERS:-6}"

# First, before anything slow: a present bundle is kept whatever METHOD says (remove it to rebuild).
if [ -f "$out/manifest.json" ]; then
    echo "a bundle is already at $out; nothing to build (METHOD=$method not used; remove $out to rebuild)"
    exit 0
fi
start=$(date +%s)
name="$(basename "$out")"
build="${BUILD:-$(dirname "$out")/.build/$name}"
teacher="${TEACHER:-$(python -c 'from training.pretrained import models_dir; print(models_dir())')/pretrained/minilm-l6-icd10cm}"
echo "building the default bundle at $out: METHOD=$method LAYERS=$layers, intermediates under $build"

python -m training prepare-models e5-small minilm-l6

distill=()
if [ "$method" != base ]; then
    if [ ! -f "$teacher/pretrain.json" ]; then  # rerunning pretrain on its --out resumes it
        python -m training pretrain --model minilm-l6 --corpus icd10cm --out "$teacher" \
            --max-steps 1000 --learning-rate 2e-4 --batch-size 32 --save-steps 250 --seed 0
    fi
    distill=(--teacher "$teacher" --no-teacher-cache)  # the notes change every epoch: no cache of them
fi

# fit_once OUT ARGS..: `fit --out OUT ARGS..` unless OUT is a finished run; a stopped one is resumed.
fit_once() {
    local run="$1"
    shift
    local args=(--data ktas --render mixed --batch-size 16 --freeze-embeddings --max-length 256 --seed 0 "$@")
    if [ -f "$run/eval/metrics.json" ]; then
        return
    elif [ -f "$run/checkpoints/resume.pt" ]; then
        python -m training fit "${args[@]}" --out "$run" --resume
    else
        rm -rf "$run"  # stopped before its first epoch ended: nothing to resume
        python -m training fit "${args[@]}" --out "$run"
    fi
}

run="$build/run-$method-mixed"
fit_once "$run" --student e5-small --method "$method" "${distill[@]}" --epochs 10 --patience 3 \
    --encoder-lr 1e-4 --head-lr 1e-3

if [ "$layers" != 12 ]; then
    full="$run/checkpoints/best-auroc"
    small="$build/run-layer-kd-$layers"
    fit_once "$small" --student "$full" --student-layers "$layers" --method layer-kd --teacher "$full" \
        --epochs 10 --patience 3 --encoder-lr 1e-4 --head-lr 1e-3
    run="$small-qat"
    fit_once "$run" --student "$small/checkpoints/best-auroc" --method layer-kd --teacher "$full" \
        --quantization-aware --epochs 3 --patience 3 --encoder-lr 2e-5 --head-lr 1e-4
fi

partial="$out.partial"
rm -rf "$partial"
python -m training export --run "$run" --out "$partial" --name "$name"
mv "$partial" "$out"
echo "default bundle written to $out in $(( $(date +%s) - start )) s"
