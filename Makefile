# fastsample: every target that runs code first makes sure the virtualenv is installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
PYTEST_ARGS ?=

.PHONY: help install data demo test test-slow lint format bench pretrain clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev,diffusers,sweeps,anchors]"
	# k-diffusion imports clip, which needs pkg_resources (setuptools < 70); torch only warns.
	$(PY) -m pip install -q "setuptools<70" 2>&1 | grep -v "requires setuptools" || true
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)  ## create / refresh the virtualenv (.venv) with everything
	@echo "installed into $(VENV)"

data:  ## Fashion-MNIST from Debian's dataset-fashion-mnist (needs root), if missing
	@test -f $(FMNIST) || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
		|| echo "warning: Fashion-MNIST missing; run 'apt-get install dataset-fashion-mnist' as root"; }

demo: install data  ## the embedded default: sample with several samplers, write grids and a table
	$(PY) -m fastsample.demo

test: install data  ## fast test suite (not slow)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow" -n 2 $(PYTEST_ARGS)

test-slow: install data  ## the slow tests only
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

lint: install  ## ruff lint + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install  ## ruff format + autofix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install data  ## benchmarks under bench/ (print tables)
	$(PY) bench/sampler_overhead.py

clean:  ## remove outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache wandb lightning_logs
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +
