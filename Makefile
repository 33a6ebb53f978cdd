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

# constraints.txt pins every other package to the tested set: pip resolves nothing on a fresh machine.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# synthesise -> prepare -> train -> serve -> bulk job -> evaluate; `make demo S3=1` keeps everything in an
# embedded S3-compatible server
demo: $(STAMP)
	$(PY) workflows/demo.py --output $(DEMO_DIR) $(if $(S3),--s3)

bench: $(STAMP)
	$(PY) benchmarks/prepare.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/segment.py
	$(PY) benchmarks/evaluate.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
