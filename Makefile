# One entry point. `make serve` and `make test` each set everything up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

# The torch build: cpu (default) or a CUDA build of the PyTorch index (e.g. cu126, cu128, cu130: the ones
# https://download.pytorch.org/whl/torch/ lists for $(TORCH_VERSION)). It is installed from the PyTorch index
# as the exact version torch==$(TORCH_VERSION)+$(TORCH): from PyPI, Linux would get the CUDA 13 build.
# Both choices are remembered in $(VENV)/.installed: later runs without them keep what was installed.
_installed := $(shell cat $(VENV)/.installed 2>/dev/null)
_installed_as = $(patsubst $(1)=%,%,$(filter $(1)=%,$(_installed)))
TORCH ?= $(or $(call _installed_as,TORCH),cpu)
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/$(TORCH)
# The ONNX Runtime build: cpu (onnxruntime, default) or gpu (onnxruntime-gpu, CUDA 12). Only one may be installed.
RUNTIME ?= $(or $(call _installed_as,RUNTIME),cpu)
EXTRAS := train,$(RUNTIME),dev
OTHER_RUNTIME := $(if $(filter gpu,$(RUNTIME)),onnxruntime,onnxruntime-gpu)

ifeq ($(filter $(RUNTIME),cpu gpu),)
$(error RUNTIME must be cpu or gpu, not '$(RUNTIME)')
endif
# Installed with other choices than these: install again.
INSTALLED_AS := TORCH=$(TORCH) RUNTIME=$(RUNTIME) TORCH_VERSION=$(TORCH_VERSION)
ifneq ($(_installed),$(INSTALLED_AS))
$(VENV)/.installed: FORCE
endif

.PHONY: install fhir-validator test lint lock serve model models clean FORCE

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch alone from the PyTorch index; its dependencies come with the project, from the default index.
	$(PIP) install -q --no-deps --index-url $(TORCH_INDEX_URL) "torch==$(TORCH_VERSION)+$(TORCH)"
	$(PIP) uninstall -q -y $(OTHER_RUNTIME)
	$(PIP) install -q -e ".[$(EXTRAS)]" "torch==$(TORCH_VERSION)+$(TORCH)"
	echo "$(INSTALLED_AS)" > $@
FORCE:

install: $(VENV)/.installed

# The independent FHIR R4 validator (npm `fhir`) that tests/app/test_fhir_conformance.py runs: needs Node.js and npm.
FHIR_VALIDATOR := tools/fhir-validator
$(FHIR_VALIDATOR)/node_modules/.package-lock.json: $(FHIR_VALIDATOR)/package-lock.json
	cd $(FHIR_VALIDATOR) && npm ci --no-audit --no-fund
fhir-validator: $(FHIR_VALIDATOR)/node_modules/.package-lock.json

test: install fhir-validator
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy --strict app
	$(VENV)/bin/mypy training

# requirements/*.txt: the container images' packages, pinned with hashes, resolved from PyPI alone (pip and
# uv settings of this machine ignored) for Linux x86_64, Python 3.11. torch is not in the trainer's file: the
# image installs torch==$(TORCH_VERSION)+cpu from the PyTorch CPU index; its dependencies are resolved from
# the wheel found at LOCK_TORCH_FIND_LINKS.
LOCK_TORCH_FIND_LINKS ?= https://download.pytorch.org/whl/torch/
LOCK := env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT -u UV_INDEX_URL \
	-u UV_EXTRA_INDEX_URL -u UV_INDEX -u UV_DEFAULT_INDEX -u UV_FIND_LINKS -u UV_CONSTRAINT -u UV_OVERRIDE \
	$(VENV)/bin/uv pip compile --no-config --quiet --generate-hashes --index-url https://pypi.org/simple \
	--python-version 3.11 --python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock"
lock: install
	mkdir -p requirements
	$(LOCK) pyproject.toml --extra cpu --extra tracing --extra score -o requirements/api-cpu.txt
	$(LOCK) pyproject.toml --extra gpu --extra tracing --extra score -o requirements/api-gpu.txt
	echo "torch==$(TORCH_VERSION)+cpu" > requirements/.torch-cpu.in
	$(LOCK) pyproject.toml requirements/.torch-cpu.in --extra train --extra cpu --find-links $(LOCK_TORCH_FIND_LINKS) \
		--no-emit-package torch -o requirements/trainer-cpu.txt
	rm requirements/.torch-cpu.in

models: install
	$(PY) -m training prepare-models

# The default bundle, built from what ships with the project unless models/default already holds one.
model: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" scripts/build_default_model.sh models/default

serve: model
	$(PY) -m app serve --bundle models/default --host 0.0.0.0 --port 8000

clean:
	rm -rf $(VENV) runs .pytest_cache $(FHIR_VALIDATOR)/node_modules
