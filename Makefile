# The README's quickstart: `make demo` and `make test`. Each installs what it needs first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: setup setup-test demo test fast-test lint bench

# What the installed eqprop was built from: a hash of the sources (tracked and untracked, not ignored;
# every file when this is not a git checkout), the location of the eqprop this Python imports and the
# time its extension was written (an install from elsewhere changes it).
# `setup` rebuilds only when it differs from the stamp of the last install, or eqprop does not import.
SOURCES := csrc python CMakeLists.txt pyproject.toml
STAMP := build/install.stamp
INSTALL_STATE = { { git ls-files -co --exclude-standard -- $(SOURCES) 2>/dev/null || find $(SOURCES) -type f; } \
	| LC_ALL=C sort | xargs sha256sum 2>/dev/null; \
	$(PYTHON) -c "import eqprop, os, sys; print(eqprop.__file__, sys.prefix, os.stat(eqprop._C.__file__).st_mtime_ns)" \
	  2>/dev/null || echo not-importable; } \
	| sha256sum

# Keep an installed torch; otherwise install the pinned 2.13.0 (never an unpinned torch, which would
# pull several GB of CUDA wheels). eqprop builds against whatever torch is installed.
setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	@if [ "$$($(INSTALL_STATE))" = "$$(cat $(STAMP) 2>/dev/null)" ]; then \
	  echo "eqprop is installed from these sources: not rebuilding (rm $(STAMP) to force)"; \
	else \
	  $(PIP) install "scikit-build-core>=0.10" numpy tqdm matplotlib tokenizers && \
	  $(PIP) install --no-build-isolation . && \
	  mkdir -p build && $(INSTALL_STATE) > $(STAMP); \
	fi

setup-test: setup
	@$(PYTHON) -c "import pytest, hypothesis, scipy, nbclient, nbformat, ipykernel" 2>/dev/null || \
	  $(PIP) install pytest hypothesis scipy nbclient nbformat ipykernel

demo: setup
	$(PYTHON) -m eqprop markov train --overwrite

test: setup-test
	$(PYTHON) -m pytest -q

# Everything but the tests marked slow (> ~10 s each): the loop while developing.
fast-test: setup-test
	$(PYTHON) -m pytest -q -m "not slow"

# ruff (pyproject.toml [tool.ruff]) and clang-format (.clang-format) at pinned versions, so every machine
# agrees; the pip wheel's clang-format, not whichever one is on PATH.
CXX_SOURCES = $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' | LC_ALL=C sort)
lint:
	$(PIP) install -q "ruff==0.17.6" "clang-format==19.1.7"
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -c "import clang_format; clang_format.clang_format()" --dry-run -Werror $(CXX_SOURCES)

# TorchDEQ is a comparison point in bench_relax.py; --no-deps so it cannot pull another torch.
bench: setup
	$(PIP) install --no-deps torchdeq
	cd benchmarks && $(PYTHON) bench_markov.py && $(PYTHON) bench_relax.py && $(PYTHON) bench_markov_train.py

# --- CUDA build check (developer target, not part of CI) -------------------------------------------
# Compiles and links every translation unit with CUDA against the GPU machine's torch (2.11.0+cu130,
# downloaded once into ~/.cache/eqprop, never installed) with nvcc from /usr/local/cuda; no GPU needed.
.PHONY: cuda-build-check
cuda-build-check:
	bash tools/cuda_build_check.sh
