# Quickstart: `make demo` and `make test` on a fresh machine; both create the venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch lies on this disk; on a GPU machine override, e.g. TORCH_SPEC='torch==2.13.0'.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-output

.PHONY: venv test test-fast demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(PY) workflows/synthesize.py --output $(DEMO_DIR)/volumes --volumes 10 --size 256 --slices 48
	$(PY) workflows/prepare.py --input $(DEMO_DIR)/volumes --output $(DEMO_DIR)/prepared --image-size 128 --keep-liver 0.5 --val-fraction 0.2
	rm -rf $(DEMO_DIR)/run
	$(PY) workflows/train.py --data $(DEMO_DIR)/prepared --output $(DEMO_DIR)/run --num-workers 1 --cpus-per-worker 2 --epochs 8 --base-width 16 --batch-size 16 --lr 1e-3 --name demo
	$(PY) workflows/synthesize.py --output $(DEMO_DIR)/new-scans --volumes 4 --size 256 --slices 48 --seed 7 --first-id 100
	$(PY) workflows/segment.py --input $(DEMO_DIR)/new-scans --output $(DEMO_DIR)/segmentations --model $(DEMO_DIR)/run/model --ref $(DEMO_DIR)/new-scans --cpus-per-volume 0.5

bench: $(STAMP)
	$(PY) benchmarks/prepare.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/segment.py
	$(PY) benchmarks/evaluate.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
