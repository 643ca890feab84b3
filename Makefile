# One command installs everything into a virtual environment and runs the tests: `make test`.
# TORCH_SPEC pins the CPU build that CI uses; on a GPU machine pass your own, e.g. `make test TORCH_SPEC=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -n 2

.PHONY: install test test-fast lint demo clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,demo]"
	touch $@

install: $(VENV)/.installed

test: install lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS) tests

# Without the multi-process, subprocess and end-to-end tests (marked slow): under a minute.
test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS) -m "not slow" tests

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The offline training default: a tiny tokenizer on scikit-image's sample photos, on CPU (examples/configs/tiny.yaml);
# writes the model, reconstruction.png and report.md into outputs/tiny.
demo: install
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		examples/train.py

clean:
	rm -rf $(VENV) outputs
