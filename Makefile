# fastsample: every target that runs code first makes sure the virtualenv is installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
PYTEST_ARGS ?=

.PHONY: help install data demo test test-slow lint format bench errors-doc pretrain pretrain-diffusion \
	pretrain-classifier pretrain-guidance-classifier pretrain-vae clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-28s %s\n", $$1, $$2}'

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
	$(PY) -m fastsample.jobs.demo

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

bench: install data  ## benchmarks under bench/ (print tables; docs/samplers.md has the results)
	$(PY) bench/convergence_order.py
	$(PY) bench/few_step_multistep.py
	$(PY) bench/sampler_overhead.py
	$(PY) bench/sampling_memory.py

errors-doc: install  ## regenerate docs/errors.md (the bad-input catalog) by running every case
	$(PY) tests/error_catalog.py

# Shipped models: train into $(PRETRAIN_DIR)/<name> (rerunning resumes from its last checkpoint), then
# install the exported bundle into fastsample/assets (copy + rename, so a failed copy leaves no partial file).
PRETRAIN_DIR ?= outputs/pretrain
ASSETS := fastsample/assets
TRAIN_ARGS ?=
define pretrain_recipe
	$(PY) train.py experiment=$(1) hydra.run.dir=$(PRETRAIN_DIR)/$(2) ckpt_path=last $(TRAIN_ARGS)
	cp $(PRETRAIN_DIR)/$(2)/model.pt $(ASSETS)/.$(3).tmp && mv $(ASSETS)/.$(3).tmp $(ASSETS)/$(3)
	@echo "installed $(ASSETS)/$(3)"
endef

pretrain: pretrain-diffusion pretrain-classifier pretrain-vae  ## train the shipped Fashion-MNIST models into fastsample/assets

pretrain-diffusion: install data  ## the diffusion model (experiment=pretrain_fmnist) -> assets/fmnist_diffusion.pt
	$(call pretrain_recipe,pretrain_fmnist,diffusion,fmnist_diffusion.pt)

pretrain-classifier: install data  ## the clean classifier (experiment=pretrain_classifier) -> assets/fmnist_classifier.pt
	$(call pretrain_recipe,pretrain_classifier,classifier,fmnist_classifier.pt)

pretrain-vae: install data  ## the ES-DDPM prior VAE (experiment=pretrain_vae, ~10 CPU min) -> assets/fmnist_vae.pt
	$(call pretrain_recipe,pretrain_vae,vae,fmnist_vae.pt)

pretrain-guidance-classifier: install data  ## a noisy guidance classifier -> assets/fmnist_guidance_classifier.pt
	$(call pretrain_recipe,pretrain_guidance_classifier,guidance_classifier,fmnist_guidance_classifier.pt)

clean:  ## remove outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache wandb lightning_logs
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +
