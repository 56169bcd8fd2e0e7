# Set-up and everyday commands. Everything installs itself into .venv on first use.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench clean

install: $(STAMP)

# torch first: a plain `torch` requirement with nothing installed pulls several GB of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The service end to end: the local Prefect server (unless PREFECT_API_URL names one), the pipeline
# flow (simulate -> train -> validate -> register) on a science simulator at a small budget, then
# the infer flow on a synthetic observation; the runs' UI URLs are printed (and in demo-out/demo.log).
DEMO_SIM ?= cosmo_gaussian
DEMO_THETA ?= 0.3,0.8
DEMO_SIMS ?= 5000
DEMO_EPOCHS ?= 20
DEMO_VALIDATION ?= 500

demo: $(STAMP)
	@mkdir -p demo-out
	@if [ -z "$$PREFECT_API_URL" ]; then $(BIN)/sbipipe server start; fi
	$(BIN)/sbipipe flow pipeline $(DEMO_SIM) --name demo -n $(DEMO_SIMS) --max-epochs $(DEMO_EPOCHS) --n-validation $(DEMO_VALIDATION) --n-samples $(DEMO_VALIDATION) | tee demo-out/demo.log
	$(BIN)/sbipipe observe $(DEMO_SIM) --theta $(DEMO_THETA) -o demo-out/obs.npy --seed 7
	$(BIN)/sbipipe flow infer demo --observation demo-out/obs.npy | tee -a demo-out/demo.log
	@$(BIN)/sbipipe models
	@echo "UI pages of the demo's runs:"; grep -o "^[a-z]* run: http.*" demo-out/demo.log | sed 's/^/  /'

bench: $(STAMP)
	$(BIN)/python benchmarks/bank_throughput.py

clean:
	if [ -x $(BIN)/sbipipe ]; then $(BIN)/sbipipe server stop; fi
	rm -rf $(VENV) demo-out .pytest_cache
