# The two set-up-and-run commands of the README:
#   make demo   create .venv, install, build the demo data, train, sample (CPU, minutes)
#   make test   create .venv, install, run the test suite
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
DEMO_DIR ?= demo-run

.PHONY: demo test venv clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Install torch first when none is importable (an open range would pull a multi-GB CUDA build).
$(VENV)/.installed: $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q tests

demo: venv
	$(PY) -m training.demo --outdir=$(DEMO_DIR)

clean:
	rm -rf $(VENV) $(DEMO_DIR)
