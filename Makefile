# `make demo` and `make test` each build .venv on a fresh machine, then do their job.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint fuzz bench clean

# torch's CPU build, chosen explicitly: TORCH_INDEX names the index to take it from (empty:
# pip's configured one, which on a machine that only has PyPI would give a CUDA build; the
# check below then stops with the fix instead of going on with gigabytes of CUDA).
TORCH_INDEX ?=
TORCH_FROM := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU wheel of torch first, so that nothing later pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0 $(TORCH_FROM)
	$(PY) -W ignore -c "import sys, torch; sys.exit(torch.version.cuda and 'torch is a CUDA build: run make clean, then make TORCH_INDEX=https://download.pytorch.org/whl/cpu')"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m peerlearn.testnet.demo

lint: $(STAMP)
	$(PY) -m ruff check peerlearn tests bench examples
	$(PY) -m ruff format --check peerlearn tests bench examples
	$(PY) -m mypy peerlearn

# Everything but `slow` (each over a minute): unit, property, real-libp2p, NAT lab (root), CLI.
test: lint
	@start=$$(date +%s); \
	$(PY) -m pytest -m "not slow" -q --durations=10; status=$$?; \
	echo "make test: pytest took $$(( $$(date +%s) - start )) s"; exit $$status

# The decoder properties with 5000 examples each instead of 100 (about 2 minutes).
fuzz: $(STAMP)
	PEERLEARN_FUZZ=1 $(PY) -m pytest -q tests/adversarial/test_decoders.py

# hivemind, for the side-by-side runs of bench/exchange.py, in a venv of its own (protobuf 7).
HIVEMIND_VENV := .venv-hivemind
HIVEMIND_STAMP := $(HIVEMIND_VENV)/.installed

$(HIVEMIND_STAMP): bench/hivemind-requirements.txt
	test -x $(HIVEMIND_VENV)/bin/python || $(PYTHON) -m venv $(HIVEMIND_VENV)
	$(HIVEMIND_VENV)/bin/python -m pip install --quiet torch==2.13.0 $(TORCH_FROM)
	$(HIVEMIND_VENV)/bin/python -m pip install --quiet -r bench/hivemind-requirements.txt
	touch $(HIVEMIND_STAMP)

bench: $(STAMP) $(HIVEMIND_STAMP)
	$(PY) bench/stream_throughput.py
	$(PY) bench/merge_cost.py
	$(PY) bench/exchange.py

clean:
	rm -rf $(VENV) $(HIVEMIND_VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
