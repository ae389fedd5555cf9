#!/usr/bin/env bash
# Build the default model bundle at OUT (default $TRIAGE_BUNDLE, else models/default) unless one is there.
# Fine-tunes STUDENT (default minilm-l6) on the bundled KTAS data for EPOCHS (default 3) on the CPU, then
# exports the ONNX bundle. The bundle is written next to OUT and moved into place once complete, so that a
# stopped build never leaves a half-written bundle for the service to load.
set -euo pipefail

out="${1:-${TRIAGE_BUNDLE:-models/default}}"
student="${STUDENT:-minilm-l6}"
epochs="${EPOCHS:-3}"

if [ -f "$out/manifest.json" ]; then
    echo "a bundle is already at $out; nothing to build"
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
partial="$out.partial"
rm -rf "$partial"

python -m training prepare-models "$student"
python -m training fit --student "$student" --data ktas --epochs "$epochs" --out "$work/run"
python -m training export --run "$work/run" --out "$partial" --name "$(basename "$out")"
mv "$partial" "$out"
echo "default bundle written to $out"
