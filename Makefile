# Two commands on a fresh machine:  `make demo` (set up + run the demo)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup system-deps demo compare test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# pin torch first: an unpinned torch pulls a multi-GB CUDA build (README, quick start)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,examples]'
	touch $@

setup: $(VENV)/.installed

# Debian packages some tests use (a real Prometheus and promtool, docker-compose to validate the
# compose file, iproute2's ip and tc for the shaped-link harness): installed when missing and we are root with apt-get (a Prometheus the package may
# have started on every interface is stopped; tests start their own on 127.0.0.1); otherwise they skip
system-deps:
	@if ! command -v promtool >/dev/null || ! command -v docker-compose >/dev/null || ! command -v tc >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus docker-compose iproute2 >/dev/null \
	      && { pkill -x prometheus 2>/dev/null || true; }; \
	  else echo "promtool, docker-compose or tc missing and no root apt-get: their tests will be skipped"; fi; fi

# the coordinator on 127.0.0.1 with an embedded Ray; one digits job submitted over REST, followed to the end
demo: setup
	$(PY) examples/service_demo.py

# six compressors side by side on 2 local gloo ranks (no Ray)
compare: setup
	$(PY) examples/demo.py

lint: setup
	$(VENV)/bin/ruff check .

test: lint system-deps
	$(PY) -m pytest

# the quick set of every benchmark (~20 minutes on 2 cores; the link benchmarks need root)
bench: setup
	$(PY) benchmarks/compressors.py --quick
	$(PY) benchmarks/links.py --quick
	$(PY) benchmarks/convergence.py --quick
	$(PY) benchmarks/costmodel.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
