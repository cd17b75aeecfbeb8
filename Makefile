# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_CONFIG ?= configs/demo_cpu.yaml

.PHONY: install install-dev demo test clean

# labelenc and what it needs to train and evaluate; the demo needs nothing more
$(BIN)/labelenc: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e .
	touch $@

# the test extras on top: pytest, hypothesis, and the optional back-ends the tests cover (faster-coco-eval, ONNX)
$(VENV)/.dev-installed: $(BIN)/labelenc
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

install: $(BIN)/labelenc

install-dev: $(VENV)/.dev-installed

# The main job: baseline 1x, baseline 2x, LabelEnc Step 1 and Step 2 on the embedded synthetic dataset.
demo: install
	$(BIN)/labelenc data synth --out data/synth --seed 0 --num-train 1024 --num-val 500 --min-object-size 32
	$(BIN)/labelenc pipeline $(DEMO_CONFIG) --jobs 2

test: install-dev
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) data runs *.egg-info
