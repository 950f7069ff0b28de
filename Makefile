# The README's quickstart: `make demo` and `make test`. Each installs what it needs first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: setup setup-test demo test bench

# Keep an installed torch; otherwise install the pinned 2.13.0 (never an unpinned torch, which would
# pull several GB of CUDA wheels). eqprop builds against whatever torch is installed.
setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install "scikit-build-core>=0.10" numpy tqdm matplotlib
	$(PIP) install --no-build-isolation .

setup-test: setup
	$(PIP) install pytest hypothesis scipy nbclient nbformat ipykernel

demo: setup
	$(PYTHON) -m eqprop markov train --overwrite

test: setup-test
	$(PYTHON) -m pytest -q

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
