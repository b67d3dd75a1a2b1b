# Two commands on a fresh machine:  `make demo` (set up + run the demo)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup demo compare test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# pin torch first: an unpinned torch pulls a multi-GB CUDA build (see docs/install.md)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,examples]'
	touch $@

setup: $(VENV)/.installed

# the coordinator on 127.0.0.1 with an embedded Ray; one digits job submitted over REST, followed to the end
demo: setup
	$(PY) examples/service_demo.py

# six compressors side by side on 2 local gloo ranks (no Ray)
compare: setup
	$(PY) examples/demo.py

lint: setup
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/compressors.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
