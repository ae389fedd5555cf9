#!/usr/bin/env bash
# The GPU checks of the service (issue #17), in one run on a GPU host that has this repository copied. No GPU
# figure of this project was measured without it. Each step's output goes under $OUT:
#   environment.txt  nvidia-smi, Python packages, ONNX Runtime's providers
#   export.log       the bundle, exported here: fp16 checked on CUDA (validation AUROC within the tolerance of
#                    PyTorch's, batch shift), every variant's tolerance on the probe notes
#   service.log      the service on CUDA (fp16, TRIAGE_REQUIRE_ACCELERATOR): probe notes, warm-up, /readyz
#   io_binding.md    IOBinding against session.run on CUDA (identical logits), batch 1 against batch 32
#   serve_load.md    closed-loop load: the service, the service without batching, a threadpool server, LitServe
#   summary.txt      what each step found
#
#   benchmarks/gpu_check.sh
#
# Environment (all optional):
#   OUT           results directory (default runs/gpu-check-<UTC time>)
#   RUN           training run to export (default: the source run of models/default; if there is none, the
#                 default recipe is trained here, under $OUT/build, by scripts/build_default_model.sh)
#   TORCH         torch build for `make install` (default cu128)
#   THREADS       ONNX Runtime intra-op threads of every server (default 4)
#   LOAD_SECONDS  duration of each load-benchmark cell (default 24)
#   PORT          port of the service started for the readiness check (default 8765)
# Python: .venv as it is when its ONNX Runtime offers the CUDA provider (made by `make install RUNTIME=gpu` and
# carried with the copy), else `make install RUNTIME=gpu TORCH=$TORCH`, which needs PyPI and the PyTorch index
# (or a wheel directory: PIP_NO_INDEX=1 PIP_FIND_LINKS=/path/to/wheels). The script stops at the first step that
# fails, saying which and where its log is.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-runs/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}
TORCH=${TORCH:-cu128}
THREADS=${THREADS:-4}
LOAD_SECONDS=${LOAD_SECONDS:-24}
PORT=${PORT:-8765}
PY=.venv/bin/python
BUNDLE=$OUT/bundle
CUDA=CUDAExecutionProvider
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"

note() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$SUMMARY"; }

# fail MESSAGE [LOG]: say what failed, show the end of its log, stop.
fail() {
    note "FAILED: $1"
    if [[ $# -gt 1 && -f $2 ]]; then
        note "  last lines of $2:"
        tail -n 20 "$2" | tee -a "$SUMMARY"
    fi
    exit 1
}

has_cuda_provider() {
    [[ -x $PY ]] && "$PY" -c \
        'import onnxruntime, sys; sys.exit("CUDAExecutionProvider" not in onnxruntime.get_available_providers())' \
        2>/dev/null
}

# 1. A GPU, and Python with onnxruntime-gpu.
note "results in $OUT"
command -v nvidia-smi >/dev/null || fail "no nvidia-smi: not a GPU host with the NVIDIA driver"
nvidia-smi >"$OUT/environment.txt" 2>&1 || fail "nvidia-smi reaches no GPU" "$OUT/environment.txt"
if has_cuda_provider; then
    note "python: .venv as found (its ONNX Runtime offers CUDA)"
else
    note "python: make install RUNTIME=gpu TORCH=$TORCH"
    make install RUNTIME=gpu TORCH="$TORCH" >"$OUT/install.log" 2>&1 ||
        fail "make install RUNTIME=gpu TORCH=$TORCH: without PyPI and the PyTorch index, carry a .venv made that \
way with the repository, or give pip a wheel directory (PIP_NO_INDEX=1 PIP_FIND_LINKS=/path)" "$OUT/install.log"
    has_cuda_provider || fail "the installed ONNX Runtime offers no CUDA provider (onnxruntime and onnxruntime-gpu \
both installed?)"
fi
if ! "$PY" -c 'import litserve' 2>/dev/null; then
    note "python: the bench extra (litserve)"
    "$PY" -m pip install -q -e '.[bench]' >>"$OUT/install.log" 2>&1 ||
        fail "pip install -e '.[bench]' (litserve, for the load benchmark)" "$OUT/install.log"
fi
"$PY" - >>"$OUT/environment.txt" 2>&1 <<'EOF'
import platform
from importlib import metadata

import onnxruntime

print("python", platform.python_version(), "on", platform.platform())
for package in ("onnxruntime-gpu", "onnxruntime", "torch", "numpy", "tokenizers", "litserve"):
    try:
        print(package, metadata.version(package))
    except metadata.PackageNotFoundError:
        print(package, "not installed")
print("ONNX Runtime providers:", onnxruntime.get_available_providers())
EOF

# 2. The bundle, exported on this host: fp16 is checked on CUDA.
if [[ -z ${RUN:-} && -f models/default/manifest.json ]]; then
    RUN=$("$PY" -c 'from app.bundle import read_manifest; from pathlib import Path; print(read_manifest(Path("models/default")).source_run)')
    [[ -d $RUN ]] || RUN=
fi
if [[ -n ${RUN:-} ]]; then
    note "export of $RUN"
    "$PY" -m training export --run "$RUN" --out "$BUNDLE" >"$OUT/export.log" 2>&1 || fail "the export" "$OUT/export.log"
else
    note "no run to export: training the default recipe (scripts/build_default_model.sh, under $OUT/build)"
    PATH="$PWD/.venv/bin:$PATH" BUILD="$OUT/build" scripts/build_default_model.sh "$BUNDLE" >"$OUT/export.log" 2>&1 ||
        fail "the default build" "$OUT/export.log"
fi
"$PY" - "$BUNDLE" <<'EOF' | tee -a "$SUMMARY" || fail "fp16 was not kept after its checks on CUDA" "$OUT/export.log"
import sys
from pathlib import Path

from app.bundle import read_manifest

manifest = read_manifest(Path(sys.argv[1]))
for name, variant in manifest.variants.items():
    print(
        f"  {name} on {variant.checked_on}: kept {variant.kept}, validation AUROC drop {variant.auroc_drop}, "
        f"batch shift {variant.batch_shift}, max |dP| against PyTorch {variant.max_abs_diff}, "
        f"probe_atol {variant.probe_atol}" + (f" ({variant.note})" if variant.note else "")
    )
fp16 = manifest.variants["fp16"]
sys.exit(0 if fp16.kept and fp16.checked_on == "CUDAExecutionProvider" else 1)
EOF

# 3. The service on CUDA, told to require it: the probe notes and the warm-up run there before /readyz says ready.
note "the service: fp16, TRIAGE_REQUIRE_ACCELERATOR=true, port $PORT"
TRIAGE_REQUIRE_ACCELERATOR=true "$PY" -m app serve --bundle "$BUNDLE" --variant fp16 --port "$PORT" \
    >"$OUT/service.log" 2>&1 &
service_pid=$!
trap 'kill "$service_pid" 2>/dev/null || true' EXIT
readiness=$("$PY" - "$PORT" <<'EOF'
import json
import sys
import time
import urllib.error
import urllib.request

base = f"http://127.0.0.1:{sys.argv[1]}"
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(f"{base}/readyz", timeout=5) as response:
            ready = response.read().decode()
        with urllib.request.urlopen(f"{base}/v1/model", timeout=5) as response:
            providers = json.load(response)["providers"]
        print(f"/readyz {ready}; providers {providers}")
        sys.exit(0 if providers[0] == "CUDAExecutionProvider" else 1)
    except urllib.error.HTTPError as error:
        detail = error.read().decode()
        if "not ready:" in detail:  # for good: a start-up check failed
            print(f"/readyz {error.code} {detail}")
            sys.exit(1)
    except OSError:
        pass  # not listening yet
    time.sleep(1)
print("/readyz: no answer within 300 s")
sys.exit(1)
EOF
) || fail "the service on CUDA is not ready: $readiness" "$OUT/service.log"
note "  $readiness"
grep -E '"(probe notes agree with the fp32 reference|warm-up done|model ready)"' "$OUT/service.log" | tee -a "$SUMMARY"
kill "$service_pid"
wait "$service_pid" || true
trap - EXIT

# 4. The model alone: IOBinding against session.run, batch 1 against batch 32.
note "IOBinding against session.run, batch 1 and 32"
"$PY" -m benchmarks.io_binding --bundle "$BUNDLE" --variant fp16 --threads "$THREADS" >"$OUT/io_binding.md" 2>&1 ||
    fail "benchmarks.io_binding" "$OUT/io_binding.md"
tee -a "$SUMMARY" <"$OUT/io_binding.md"
head -n 1 "$OUT/io_binding.md" | grep -q "$CUDA" || fail "benchmarks.io_binding did not run on CUDA"
if grep -q '| NO |' "$OUT/io_binding.md"; then
    fail "the IOBinding changed the logits"
fi

# 5. Closed-loop HTTP load: the service against itself without batching, a threadpool server and LitServe.
note "load benchmark, $LOAD_SECONDS s per cell"
TRIAGE_REQUIRE_ACCELERATOR=true "$PY" -m benchmarks.serve_load --bundle "$BUNDLE" --variant fp16 \
    --threads "$THREADS" --seconds "$LOAD_SECONDS" --log-dir "$OUT/serve_load_logs" \
    --servers service-fp16 service-fp16-batch1 onnx-threadpool-fp16 litserve-fp16 >"$OUT/serve_load.md" 2>&1 ||
    fail "benchmarks.serve_load" "$OUT/serve_load.md"
grep -E '^(model alone|- )' "$OUT/serve_load.md" | tee -a "$SUMMARY"
note "done: $OUT"
