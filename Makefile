# Two commands on a fresh machine:  `make demo` (set up + run the demo)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch goes in first, pinned, so that gradwire's `torch>=2.4` never resolves to another build.
# Which build pip picks is up to its index: on Linux x86_64 PyPI's torch is the CUDA build (several
# GB; macOS and Linux aarch64 get CPU builds). For PyTorch's CPU-only or another CUDA build, pass
# the wheel index that PyTorch's install page lists for it, e.g.
#   make setup PIP_TORCH_ARGS='--index-url <that index>'
# (keep TORCH_SPEC equal to deploy/Dockerfile's TORCH_VERSION: tests check the two agree).
TORCH_SPEC     ?= torch==2.13.0
PIP_TORCH_ARGS ?=

.PHONY: setup system-deps demo compare test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_TORCH_ARGS) '$(TORCH_SPEC)'
	@$(PY) -W ignore -c "import torch; print('torch', torch.__version__, 'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU-only')"
	# the development set: every extra (cli, train, server, postgres, examples...), test and lint tools
	$(PY) -m pip install -q -e '.[dev]' '$(TORCH_SPEC)'
	touch $@

setup: $(VENV)/.installed

# Debian packages some tests use (a real Prometheus and promtool, docker-compose to validate the
# compose file, iproute2's ip and tc for the shaped-link harness, PostgreSQL's server binaries for
# the job-store tests, which start a throwaway cluster of their own): installed when missing and we
# are root with apt-get; otherwise their tests skip. Debian's prometheus package would start a
# Prometheus service on every interface: where no policy-rc.d exists, one that answers 101 ("do not
# start") is in place for this apt-get only, so no service starts (tests run their own Prometheus
# on 127.0.0.1) and nothing has to be stopped afterwards. An existing policy-rc.d is left as it is.
POLICY_RC := /usr/sbin/policy-rc.d
system-deps:
	@if ! command -v promtool >/dev/null || ! command -v docker-compose >/dev/null || ! command -v tc >/dev/null \
	    || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    made_policy=; \
	    if [ ! -e $(POLICY_RC) ]; then \
	      printf '#!/bin/sh\n# written by gradwire make system-deps for one apt-get; removed after it\nexit 101\n' > $(POLICY_RC) \
	        && chmod 755 $(POLICY_RC) && made_policy=1; \
	    fi; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus docker-compose iproute2 postgresql >/dev/null; \
	    status=$$?; \
	    if [ -n "$$made_policy" ]; then rm -f $(POLICY_RC); fi; \
	    [ $$status = 0 ] || exit $$status; \
	  else echo "promtool, docker-compose, tc or PostgreSQL missing and no root apt-get: their tests will be skipped"; fi; fi

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
