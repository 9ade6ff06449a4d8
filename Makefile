# Two commands on a fresh clone: `make run` (pipeline on the embedded default) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(CURDIR)/$(VENV)/bin
# dvc.yaml and the Snakefile call `ajepa`, `dvc` and `snakemake` by name: put the venv first
export PATH := $(BIN):$(PATH)

.PHONY: install run test test-fast snakemake check gpu-check clean

# Reinstall when the dependency list changes; the stamp keeps `make test` fast otherwise.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[pipeline,test]'
	touch $@

install: $(VENV)/.installed

run: install
	dvc repro

# two pytest workers (pytest-xdist): one runs the tests that mostly wait (SLURM, signals) while the other
# computes; tests/conftest.py keeps each module, and the modules sharing the smoke run, on one worker, and
# puts the longest groups first
TEST_WORKERS ?= 2
test: install
	python -m pytest -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

# the unit tests alone (no test marked slow: none starts ajepa, dvc, snakemake or a training run), in under a minute
test-fast: install
	python -m pytest -m "not slow" -q

snakemake: install
	snakemake --cores all

# ruff clean (its rules in pyproject.toml), the Snakefile (read from dvc.yaml) lints clean, and
# docs/parameters.md is current
check: install
	ruff check ajepa tests
	snakemake --lint
	ajepa params-doc | diff -u docs/parameters.md -

# on a GPU machine, in minutes: paper-size bf16 steps (MFU, memory against the GPU's), micro_batch auto, loader
# clips/s, open-file limit, 300 steps, kill and resume, probes, fine-tuning, DDP and torchrun on every GPU; one
# JSON object (docs/cluster.md). Without a usable GPU it fails in one line saying why; `make test` runs the CPU
# miniature (ajepa gpu-check --cpu).
gpu-check: install
	ajepa gpu-check

# what the pipeline rebuilds; data/downloads/ (the fetched archives: VoxCeleb alone is ~30 GB) stays
clean:
	if [ -d data ]; then find data -mindepth 1 -maxdepth 1 ! -name downloads -exec rm -rf {} +; fi
	rm -rf logs results models dvclive .snakemake
