# Two commands on a fresh clone:  `make quickstart`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch/torchvision: the last releases known to work on these machines (CPU or CUDA, one wheel).
TORCH_PINS := "torch==2.14.1" "torchvision==0.29.1"

.PHONY: quickstart test venv venv-dev clean-outputs

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed
venv-dev: $(VENV)/.installed-dev

quickstart: $(VENV)/.installed
	$(VENV)/bin/genreward train configs/quickstart.yaml

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q

clean-outputs:
	find outputs -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
