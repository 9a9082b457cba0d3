# Two commands on a fresh machine:
#   make demo   set up, check the environment, and run the main job (2 ranks, digits, no download)
#   make test   set up and run the whole test suite (real mpirun/Gloo ranks, real Slurm)
VENV ?= .venv
BIN  := $(VENV)/bin
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1

.PHONY: setup demo test doctor lint
setup:
	scripts/setup.sh

doctor: setup
	$(BIN)/hvdcomp doctor

demo: setup
	$(BIN)/hvdcomp doctor
	scripts/demo.sh

test: setup lint
	$(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check hvdcomp cli tests scripts examples
