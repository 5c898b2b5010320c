# `make demo` and `make test` each build .venv on a fresh machine, then do their job.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU wheel of torch first, so that nothing later pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m peerlearn.testnet.demo

lint: $(STAMP)
	$(PY) -m ruff check peerlearn tests bench examples
	$(PY) -m ruff format --check peerlearn tests bench examples
	$(PY) -m mypy peerlearn

test: lint
	$(PY) -m pytest -m "not slow" -q

bench: $(STAMP)
	$(PY) bench/stream_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
