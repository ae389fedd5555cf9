# Images of the triage service (see docs/integration.md):
#   api (default target)  the inference service: ONNX Runtime, FastAPI, no torch. Build arg RUNTIME=cpu|gpu
#                         installs onnxruntime or onnxruntime-gpu (CUDA 12; a GPU host needs the NVIDIA driver
#                         and the NVIDIA Container Toolkit, and the container started with the GPU, e.g.
#                         `docker run --gpus all` or the compose `gpu` profile).
#   trainer               the training package with torch (CPU), to build model bundles.
# The model bundle is not in the image: mount it (or bake it in a derived image) at $TRIAGE_BUNDLE.
# Packages come from requirements/*.txt (`make lock`): every version pinned and every file checked against its
# sha256 (--require-hashes), so an image built later holds the same packages. torch (trainer) is pinned by exact
# version and installed from the PyTorch CPU index.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ARG RUNTIME=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements/api-cpu.txt requirements/api-gpu.txt requirements/
RUN case "$RUNTIME" in cpu|gpu) ;; *) echo "RUNTIME must be cpu or gpu, not '$RUNTIME'" >&2; exit 1 ;; esac \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --require-hashes -r "requirements/api-$RUNTIME.txt"
COPY pyproject.toml README.md ./
COPY app/ app/
COPY training/ training/
# The project's wheel, without dependencies: the locked runtime extra above is the service's dependencies, no
# training stack.
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/venv/bin/pip install --no-deps /wheels/dsgkd_triage-*.whl \
 && /opt/venv/bin/pip check

FROM ${PYTHON_IMAGE} AS api
ARG RUNTIME=cpu
COPY --from=builder /opt/venv /opt/venv
# The GPU build's CUDA and cuDNN libraries come as pip wheels (onnxruntime-gpu[cuda,cudnn]); the dynamic
# loader is told where they are, so that only the driver is needed from the host.
RUN if [ "$RUNTIME" = gpu ]; then \
      ls -d /opt/venv/lib/python3*/site-packages/nvidia/*/lib > /etc/ld.so.conf.d/nvidia-wheels.conf && ldconfig; \
    fi \
 && groupadd --gid 10001 triage \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin triage
# ORT_DISABLE_TELEMETRY: ONNX Runtime (1.29 and later) on Linux otherwise starts its telemetry uploader and, with
# no writable home, logs "Failed to persist telemetry device ID" at every start; set before ONNX Runtime loads,
# it creates no uploader, device ID or upload.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ORT_DISABLE_TELEMETRY=1 \
    TRIAGE_HOST=0.0.0.0 \
    TRIAGE_PORT=8000 \
    TRIAGE_BUNDLE=/models/default
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['TRIAGE_PORT'] + '/readyz', timeout=4)"]
CMD ["python", "-m", "app", "serve"]

FROM ${PYTHON_IMAGE} AS trainer
# The CPU build of torch; installing the project first would pull the multi-GB CUDA build.
ARG TORCH_VERSION=2.13.0+cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    ORT_DISABLE_TELEMETRY=1 \
    TRIAGE_MODELS_DIR=/models
WORKDIR /src
COPY requirements/trainer-cpu.txt requirements/
# torch alone from the PyTorch index, then the locked rest (its dependencies included) from PyPI.
RUN python -m pip install --no-deps --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}" \
 && python -m pip install --require-hashes -r requirements/trainer-cpu.txt
COPY . .
# Editable: the bundled KTAS data is found next to the source tree.
RUN python -m pip install --no-deps -e . \
 && python -m pip check
CMD ["scripts/build_default_model.sh", "/models/default"]
