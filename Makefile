# The two set-up-and-run commands of the README:
#   make demo   create .venv, install the project, build the demo data, train, sample (CPU, minutes)
#   make test   create .venv, install the project with its dev and latent extras, run the test suite
# PYTHON: the interpreter that makes .venv (Python 3.10 or newer, as pyproject.toml requires).
# VENV=none: no virtual environment and no installing: run with $(PYTHON) as it is (the Docker image
# sets this; its environment has everything).
# TORCH_SPEC: the torch installed into a new .venv when none is importable there (the version tested
# here; pyproject.toml states the supported range).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo-run
DEMO_DATA ?= datasets/demo-shapes-32x32.zip
# A 0.43M-parameter DDPM++ on 32x32 patches of the demo shapes, 70 kimg: about 7 minutes of training on
# 2 CPU cores, under 9 minutes for all of `make demo` (docs/PERFORMANCE.md has the measurements behind
# this recipe).
# Short runs gain most from more images through a smaller network; batch 16 gives more steps per image;
# channels-last makes the CPU convolutions ~15% faster.
# --P_mean/--P_std put more training on high noise levels, which a short run needs for the global layout.
DEMO_TRAIN_FLAGS ?= --arch=ddpmpp --cbase=16 --cres=1,2,2 --blocks=2 --attn=none --batch=16 \
	--duration=0.07 --lr=2e-3 --lr-rampup=1 --ema=0.002 --dropout=0 --augment=0 --real_p=0.5 \
	--P_mean=-0.4 --P_std=1.4 \
	--tick=10 --snap=5 --dump=5 --seed=0 --samples=36 --channels-last=1 --device=cpu
# The grid: EDM's sampler with churn (fresh noise at sigma 0.05..50), which gave cleaner outlines than
# the deterministic sampler and than 32 steps with less churn from the same 70-kimg network.
DEMO_SAMPLE_FLAGS ?= --steps=48 --S_churn=20 --S_min=0.05 --S_max=50 --S_noise=1.003

.PHONY: demo test venv venv-dev clean

ifeq ($(VENV),none)
PY := $(PYTHON)
venv venv-dev:
	@$(PY) -c "import torch" || (echo "VENV=none: $(PY) has no torch; install the project first" >&2; exit 1)
else
PY := $(VENV)/bin/python

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# What the demo needs: torch (first, when none is importable: an open range would pull a multi-GB
# CUDA build), then the project and its dependencies.
$(VENV)/.installed: $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e .
	touch $@

# What the tests need besides: the dev and latent extras.
$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev,latent]"
	touch $@

venv: $(VENV)/.installed
venv-dev: $(VENV)/.installed-dev
endif

test: venv-dev
	$(PY) -m pytest -q tests

demo: venv
	@test -e $(DEMO_DATA) || $(PY) dataset_tool.py --source=demo:shapes --dest=$(DEMO_DATA) --resolution=32x32
	$(PY) train.py --outdir=$(DEMO_DIR) --data=$(DEMO_DATA) $(DEMO_TRAIN_FLAGS)
	$(PY) generate.py --device=cpu --seeds=0-63 --grid --outdir=$(DEMO_DIR)/samples $(DEMO_SAMPLE_FLAGS) \
		--network=$$(ls -t $(DEMO_DIR)/*/network-snapshot-*.pkl | head -n 1)
	@echo "Demo samples: $(DEMO_DIR)/samples-grid.png (training data: $(DEMO_DATA))"

clean:
	rm -rf $(filter-out none,$(VENV)) $(DEMO_DIR) $(DEMO_DATA)
