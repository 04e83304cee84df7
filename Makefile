# edgefleet: `make demo` and `make test` work on a fresh machine; everything installs into .venv.
SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = "0" ] || echo sudo)
PYTEST_ARGS ?=
# most tests wait on real processes (servers, brokers, agents), so several workers share 2 cores well; each worker
# takes whole files, the longest first (tests/conftest.py: LONGEST_FIRST)
TEST_WORKERS ?= 4

BENCHES := $(patsubst bench/bench_%.py,%,$(wildcard bench/bench_*.py))
comma  := ,
# Every extra `make demo`, `make test`, `make lint` and `make bench` use (the base install is only the device's).
EXTRAS := server+build+train+data+camera+coap+kafka+openvino+litert+dev

.PHONY: demo test bench bench-gpu lint services venv litert-venv clean $(addprefix bench-,$(BENCHES))

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

# The TFLite export (edgefleet.build.tflite) runs litert-torch and ai-edge-quantizer from a venv of their own: they
# pin pydantic and typing-extensions below the project's and pull ~680 MB (jax, jaxlib, the MLIR converter). The
# venv sees .venv's packages (torch, numpy, ai-edge-litert) through a .pth file; --no-deps installs what they import.
LITERT_VENV := .venv-litert
LITERT_PINS := litert-torch==0.10.0 litert-converter==0.5.0 ai-edge-quantizer==0.10.0 jax==0.10.2 jaxlib==0.10.2 \
               opt_einsum==3.4.0 immutabledict==4.3.1 absl-py==2.5.1
purelib = $$($(1) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

$(LITERT_VENV)/.installed: | $(VENV)/.installed-$(EXTRAS)
	$(PYTHON) -m venv $(LITERT_VENV)
	echo "$(call purelib,$(BIN)/python)" > "$(call purelib,$(LITERT_VENV)/bin/python)/edgefleet-base.pth"
	$(LITERT_VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps $(LITERT_PINS)
	touch $@

litert-venv: $(LITERT_VENV)/.installed

test: $(VENV)/.installed-$(EXTRAS) $(FL_VENV)/.installed services
	EDGEFLEET_FL_PYTHON=$(CURDIR)/$(FL_VENV)/bin/python $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile \
	  --no-loadscope-reorder --durations=25 $(PYTEST_ARGS)

lint: $(VENV)/.installed-$(EXTRAS)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports --no-logo

bench: $(VENV)/.installed-$(EXTRAS) services
	@for b in $(BENCHES); do $(MAKE) --no-print-directory bench-$$b || exit 1; done

# a static pattern rule: make runs no implicit (bench-%) rule for a .PHONY target
$(addprefix bench-,$(BENCHES)): bench-%: $(VENV)/.installed-$(EXTRAS) $(LITERT_VENV)/.installed services
	$(BIN)/python -m bench.bench_$*

# The GPU execution providers (TensorRT, CUDA): needs an NVIDIA GPU and onnxruntime-gpu; says so and exits 0 without.
bench-gpu: $(VENV)/.installed-$(EXTRAS)
	$(BIN)/python -m bench.gpu_providers

clean:
	rm -rf $(VENV) $(FL_VENV) $(LITERT_VENV) build .pytest_cache .mypy_cache .ruff_cache src/*.egg-info
