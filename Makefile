# Set-up and everyday commands. Everything installs itself into .venv on first use.
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

demo: $(STAMP)
	$(BIN)/sbipipe simulators
	$(BIN)/sbipipe simulate two_moons -n 20000 -o demo-out/two_moons.h5 --seed 1
	$(BIN)/sbipipe bank info demo-out/two_moons.h5
	$(BIN)/sbipipe train demo-out/two_moons.h5 -o demo-out/two_moons-npe
	$(BIN)/sbipipe observe two_moons --theta 0.3,-0.2 -o demo-out/obs.npy --seed 7
	$(BIN)/sbipipe sample demo-out/two_moons-npe --observation demo-out/obs.npy -n 10000 -o demo-out/samples.h5 --plot demo-out/corner.png
	$(BIN)/sbipipe simulate cosmo_lognormal -n 2000 -o demo-out/cosmo_lognormal.h5 --seed 1
	$(BIN)/sbipipe bank info demo-out/cosmo_lognormal.h5

bench: $(STAMP)
	$(BIN)/python benchmarks/bank_throughput.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
