# Two entry points: `make serve` (serve the default model) and `make test` (the whole test suite).
# Both create their virtual environments from scratch when missing.
PY ?= python3
VENV ?= .venv
IPEX_VENV ?= .venv-ipex

comma := ,

.PHONY: serve test lint test-default test-ipex venv venv-ipex

# $(call make_venv,DIR,EXTRAS): a fresh environment with the CPU torch on disk and raytp[EXTRAS], ops prebuilt.
# `make test` builds both environments at once (most of the time is downloads). Building raytp writes
# raytp.egg-info in this tree, so the two short steps that build it hold a lock: a wheel of raytp, whose
# dependencies then install unlocked, and the editable install that replaces it.
LOCK := flock build/.install.lock
define make_venv
	mkdir -p build
	rm -rf $(1)/raytp-wheel
	$(PY) -m venv $(1)
	$(1)/bin/pip install -q -U pip
	$(1)/bin/pip install -q torch==2.13.0
	$(LOCK) sh -c '$(1)/bin/pip wheel -q --no-deps -w $(1)/raytp-wheel . && rm -rf build/lib build/bdist.*'
	$(1)/bin/pip install -q "$$(ls $(1)/raytp-wheel/raytp-*.whl)[$(2)]"
	$(LOCK) $(1)/bin/pip install -q --no-deps -e .
	$(1)/bin/raytp build-ops
	touch $@
endef

$(VENV)/.installed: pyproject.toml
	$(call make_venv,$(VENV),dev$(comma)eval$(comma)kernels)

$(IPEX_VENV)/.installed: pyproject.toml
	$(call make_venv,$(IPEX_VENV),dev$(comma)ipex-llm)

venv: $(VENV)/.installed
venv-ipex: $(IPEX_VENV)/.installed

serve: venv
	$(VENV)/bin/serve run serve_config.yaml

# The default environment (transformers 5) runs everything. The ipex-llm environment (transformers 4.47)
# runs what depends on those versions: the unit tests, the IPEX-LLM low-bit tests (TP parity, HTTP,
# continuous batching) and the TP=2 == TP=1 == transformers parity tests; the serving, fault and deploy
# tests do not change with them and would double CI time. Both environments always run (a failure in
# one does not hide the other's result); `make test` fails if lint or either of them failed.
test:
	@$(MAKE) --no-print-directory -j2 venv venv-ipex
	@status=0; \
	$(MAKE) --no-print-directory lint || status=1; \
	$(MAKE) --no-print-directory test-default || status=1; \
	$(MAKE) --no-print-directory test-ipex || status=1; \
	exit $$status

lint: venv
	$(VENV)/bin/ruff check raytp tests benchmarks

test-default: venv
	$(VENV)/bin/python -m pytest tests --durations=25

test-ipex: venv-ipex
	$(IPEX_VENV)/bin/python -m pytest tests/unit tests/ipex tests/integration/test_parity.py
