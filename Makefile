# schnet-md: `make demo` runs the shipped ethanol model in OpenMM; `make test` runs the test suite.
# Both create the environment first (see .ci/setup-env).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= demo-out

.PHONY: env demo test test-slow systems clean

env:
	@bash .ci/setup-env

demo: env
	@rm -rf $(DEMO_OUT)
	$(VENV)/bin/schnet-md export ethanol --structure systems/ethanol/ethanol.pdb --out $(DEMO_OUT)/ethanol-force.pt
	$(VENV)/bin/schnet-md simulate systems/ethanol/ethanol.pdb --model ethanol --out $(DEMO_OUT)/md \
		--steps 2000 --timestep 0.5 --temperature 300 --report-interval 20
	$(PY) -c "from schnet_md.analysis.load import read_trajectory; print('mdtraj reads', read_trajectory('$(DEMO_OUT)/md/trajectory.dcd', '$(DEMO_OUT)/md/topology.pdb'))"

test: env
	$(VENV)/bin/schnet-md-lammps build
	$(PY) -m pytest -q

test-slow: env
	$(PY) -m pytest -q -m slow

systems: env
	$(PY) systems/make_systems.py

clean:
	rm -rf $(DEMO_OUT) .pytest_cache build *.egg-info
