# Two commands: `make book` and `make test`. Each sets up .venv first (only when needed).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch 2.13.0 (CPU) lies on this kind of machine's disk; pinning it avoids a multi-GB CUDA build
TORCH  ?= torch==2.13.0

.PHONY: book test bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[book,test]" "$(TORCH)"
	touch $(STAMP)

# The execution cache is keyed on notebook code only: drop it whenever helpers/ or data/ change.
_build/.inputs: $(shell find helpers data -type f -not -path '*/__pycache__/*' 2>/dev/null) | $(STAMP)
	rm -rf _build/.jupyter_cache
	mkdir -p _build && touch $@

book: $(STAMP) _build/.inputs
	$(VENV)/bin/jupyter-book build . -W --keep-going
	@echo "book: open _build/html/index.html"

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/throughput.py
	$(PY) bench/sae_speed.py
	$(PY) bench/capture_overhead.py
	$(PY) bench/intervention_overhead.py
	$(PY) bench/attribution_throughput.py
	$(PY) bench/policy_cost.py       # about 6 min: UNet passes per assignment policy with reuse + resume
	$(PY) bench/channels_last.py     # about 3 min: channels_last vs the default memory format when sampling
	$(PY) bench/harvest_memory.py   # about 22 min: 100,000 activations

clean:
	rm -rf _build .pytest_cache
