# fastsample: every target that runs code first makes sure the virtualenv is installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
PYTEST_ARGS ?=
# torch's OpenMP threads sleep instead of spinning between parallel regions. On a machine shared with other
# jobs, spinning threads burn the cores the others need: beside the same 4-6 busy processes, `make demo` took
# 198-245 s wall (145-166 s CPU) spinning and 74 s (55 s CPU) passive; 30 training steps 124 s vs 20 s.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: help install data demo test test-slow lint format bench bench-fid bench-gpu bench-gpu-quick errors-doc \
	pretrain pretrain-diffusion pretrain-classifier pretrain-guidance-classifier pretrain-vae foreign-models clean

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

demo: install data  ## ~1 min: our best 5-step sampler vs the usual ones (FID, class accuracy, grids)
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

# The README's FID-vs-NFE table: 6 samplers x 4 / 8 / 16 steps, 400 seeds (~7 min on 2 free cores).
bench-fid: install data  ## the README's FID vs NFE table on the shipped model (the former demo)
	$(PY) bench/fid_vs_nfe.py --model unet_fmnist --no-exact --num-samples 400 --steps 4,8,16 \
		--samplers euler,heun,dpmpp_2m,unipc,ipndm,dpmpp_2m_sde --out outputs/bench/fid_vs_nfe_unet class_labels=cycle

bench-gpu: install  ## on a CUDA GPU: images/s + overhead vs diffusers / k-diffusion (docs/ecosystem.md)
	$(PY) bench/gpu_throughput.py --out outputs/bench/gpu_throughput

bench-gpu-quick: install  ## the same script on the CPU with a tiny UNet (seconds; what the test runs)
	$(PY) bench/gpu_throughput.py --quick

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

# Foreign benchmark models (docs/tuning.md): class-conditional diffusers UNet2DModels trained with
# diffusers' recipe into $(FOREIGN_DIR)/<name> (save_pretrained: unet/ + scheduler/; model=diffusers
# model.path=$(FOREIGN_DIR)/<name> loads one); rerunning resumes from <name>/checkpoint.pt.
FOREIGN_DIR ?= outputs/foreign
FOREIGN_ARGS ?=

foreign-models: install data  ## diffusers eps/linear (6000 steps) + v/cosine (3000) Fashion-MNIST UNets (~0.4 s/step quiet) -> $(FOREIGN_DIR)
	$(PY) bench/train_foreign_models.py --out $(FOREIGN_DIR) $(FOREIGN_ARGS)

clean:  ## remove outputs, refs/ and caches (keeps .venv and the .cache/ of fitted mixtures / references)
	rm -rf outputs multirun refs .pytest_cache .ruff_cache wandb lightning_logs
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +
