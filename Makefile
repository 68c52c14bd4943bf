# make demo: the whole chain on the embedded synthetic default, on CPU.   make test: lint + the test suite.
# make gpu-check: the prepared measurement on one GPU (docs/benchmarks.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
DEMO ?= demo
MODEL ?= model
UPLOAD ?= upload

.PHONY: install demo test lint clean gpu-check fuzz

$(INSTALLED): requirements.txt training/requirements.txt test/requirements.txt
	$(PYTHON) -m venv $(VENV)
	@# torch first and pinned: the local build, so that nothing later pulls a different one
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet --disable-pip-version-check -r test/requirements.txt
	touch $@

install: $(INSTALLED)

# the last two steps leave the tree `docker build` needs: upload/ (the graph a GPU serves) and an answer to compare
demo: $(INSTALLED)
	$(PY) -m training synth --output $(DEMO)/data
	$(PY) -m training train --config training/configs/tiny-demo.yaml --data-root $(DEMO)/data --output $(DEMO)/run
	$(PY) -m training export $(DEMO)/run --output $(MODEL)
	$(PY) -m training upload $(MODEL) --output $(UPLOAD)
	$(PY) process.py --input test/input --output $(DEMO)/output --model $(MODEL) --device cpu
	@cat $(DEMO)/output/multiple-mitotic-figure-classification.json

lint: $(INSTALLED)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports

# two workers (pytest-xdist), a module at a time, the Docker engine's modules on one of them (test/conftest.py):
# the suite mostly waits on single processes (training, make demo, docker builds). The slowest 30 printed: the
# suite has a 12-minute budget (docs/benchmarks.md)
TEST_WORKERS ?= 2
test: lint
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope --durations=30

# process.py fuzzed as a whole process (test/test_fuzz_process.py): 300 mutants a seed instead of make test's 8
fuzz: $(INSTALLED)
	FUZZ_EXAMPLES=300 FUZZ_REPORT=fuzz-report.json $(PY) -m pytest -q test/test_fuzz_process.py

# On one GPU (docs/benchmarks.md): the Virchow-size ensemble served and trained, into one JSON. GPU_PYTHON: an
# interpreter with torch, timm, peft, onnx and the inference requirements (the GPU machine's own, or this venv).
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
GPU_CHECK_JSON ?= gpu-check.json
gpu-check:
	$(GPU_PYTHON) -m training gpu-check --device cuda --backbone virchow-size-random --json $(GPU_CHECK_JSON)

clean:
	rm -rf $(DEMO) $(UPLOAD) $(MODEL)/*.onnx $(MODEL)/*.onnx.data $(MODEL)/manifest.json
