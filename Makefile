# edgefleet: `make demo` and `make test` work on a fresh machine; everything installs into .venv.
SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = "0" ] || echo sudo)
PYTEST_ARGS ?=
# most tests wait on real processes (servers, brokers, agents), so several workers share 2 cores well
TEST_WORKERS ?= 3

BENCHES := $(patsubst bench/bench_%.py,%,$(wildcard bench/bench_*.py))
comma  := ,
# Every extra `make demo`, `make test`, `make lint` and `make bench` use (the base install is only the device's).
EXTRAS := server+build+train+data+camera+coap+kafka+openvino+litert+dev

.PHONY: demo test bench lint services venv clean $(addprefix bench-,$(BENCHES))

# Flower (the fl extra) pins protobuf, cryptography and the web stack below the project's versions: the federated
# learning tests run its processes from a venv of their own (EDGEFLEET_FL_PYTHON), never from .venv.
FL_VENV := .venv-fl
FL_PIN  := flwr==1.42.0

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# One stamp per set of extras, redone when pyproject.toml changes.
$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	@echo "installing edgefleet[$(subst +,$(comma),$*)] into $(VENV)"
	@set -o pipefail; $(BIN)/pip install --quiet --disable-pip-version-check -e ".[$(subst +,$(comma),$*)]" 2>&1 \
	  | { grep -v "^WARNING: Location" || true; }
	touch $@

venv: $(VENV)/.installed-$(EXTRAS)

demo: $(VENV)/.installed-$(EXTRAS)
	$(BIN)/edgefleet demo

# Debian's Mosquitto, libcoap's coap-client (coap-client-notls) and chromium (dashboard tests) for the
# integration tests; the tests start the broker themselves on
# free loopback ports.
services:
	@{ command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; } && command -v mosquitto_pub >/dev/null 2>&1 \
	  && command -v coap-client-notls >/dev/null 2>&1 && [ -x /usr/lib/postgresql/15/bin/postgres ] \
	  && [ -x /usr/bin/chromium ] || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq mosquitto mosquitto-clients postgresql-15 \
	    libcoap3-bin chromium >/dev/null; }
	@# the package may start a system broker on 1883; the tests never use it, and it must not hold the port
	@-$(SUDO) service mosquitto stop >/dev/null 2>&1 || true

$(FL_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(FL_VENV)
	$(FL_VENV)/bin/pip install --quiet --disable-pip-version-check "$(FL_PIN)" numpy
	touch $@

test: $(VENV)/.installed-$(EXTRAS) $(FL_VENV)/.installed services
	EDGEFLEET_FL_PYTHON=$(CURDIR)/$(FL_VENV)/bin/python $(BIN)/pytest -q -n $(TEST_WORKERS) --durations=25 $(PYTEST_ARGS)

lint: $(VENV)/.installed-$(EXTRAS)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports --no-logo

bench: $(VENV)/.installed-$(EXTRAS) services
	@for b in $(BENCHES); do $(MAKE) --no-print-directory bench-$$b || exit 1; done

bench-%: $(VENV)/.installed-$(EXTRAS) services
	$(BIN)/python -m bench.bench_$*

clean:
	rm -rf $(VENV) $(FL_VENV) build .pytest_cache .mypy_cache .ruff_cache src/*.egg-info
