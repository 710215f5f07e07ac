# `make demo` and `make test` each set up their own virtual environment on a fresh machine, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Where a CPU build of torch comes from when none is on hand locally (PyPI's default is a multi-GB CUDA build).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
DEMO_OUT ?= runs/demo
DEMO_STEPS ?= 60
DEMO_DISTILL_STEPS ?= 150

# The ecosystem's loaders (tests/test_loaders.py) get an environment of their own: Optimum's ONNX Runtime
# classes (optimum-onnx 0.1.0, the latest) need transformers < 4.58, sentence-transformers' backend="onnx"
# loads through them, and flashlite runs on transformers 5.x. Pinned here, so nothing downgrades $(VENV).
LOADERS_VENV ?= .venv-loaders
LOADERS_PY := $(LOADERS_VENV)/bin/python
LOADERS = "optimum-onnx[onnxruntime]==0.1.0" "optimum==2.1.0" "transformers==4.57.6" "sentence-transformers==5.7.0"

.PHONY: demo test test-slow lint install loaders clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# Prefer a CPU torch wheel already on this machine (pip's find-links); else the CPU index.
	$(PIP) install --quiet --no-deps --no-index "torch>=2.6" || $(PIP) install --quiet "torch>=2.6" --index-url $(TORCH_INDEX)
	$(PIP) install --quiet -e ".[hf,eval,dev]"
	touch $@

# Torch comes first, as in `install`, so the loaders' requirement (torch>=1.11) is met by the local CPU build.
loaders: $(LOADERS_VENV)/.installed

$(LOADERS_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(LOADERS_VENV)
	$(LOADERS_PY) -m pip install --quiet --upgrade pip
	$(LOADERS_PY) -m pip install --quiet --no-deps --no-index "torch>=2.6" || $(LOADERS_PY) -m pip install --quiet "torch>=2.6" --index-url $(TORCH_INDEX)
	$(LOADERS_PY) -m pip install --quiet $(LOADERS)
	touch $@

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The suite CI runs: lint, then every test not marked `slow` (within 30 minutes on 2 cores, set-up included);
# the loader tests start $(LOADERS_PY).
test: lint loaders
	FLASHLITE_LOADERS_PYTHON=$(abspath $(LOADERS_PY)) $(PY) -m pytest -m "not slow"

# The long tests (real-data fine-tuning, the notebooks at full size, multi-process training).
test-slow: install
	$(PY) -m pytest -m slow

# The main job: pretrain the full-size model, compress it with the default Flash-Lite recipe,
# export and verify ONNX, and print the stage table with the report's paths.
demo: install
	$(VENV)/bin/flashlite pretrain --preset full --steps $(DEMO_STEPS) --batch-size 16 --out $(DEMO_OUT)/full
	$(VENV)/bin/flashlite compress flash-lite --model $(DEMO_OUT)/full --out $(DEMO_OUT)/lite \
		--set distill.steps=$(DEMO_DISTILL_STEPS)

clean:
	rm -rf $(VENV) $(LOADERS_VENV) runs .pytest_cache
