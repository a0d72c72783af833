# mpdit-dist: set-up, tests and the embedded demo.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the release this project is tested with; any torch>=2.6 works (setup.cfg).
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup test test-unit test-distributed demo clean

$(VENV)/.installed: setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q tests

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-distributed: setup
	$(PY) -m pytest -q tests/distributed

demo: setup
	$(PY) -m mpdit_dist.demo

clean:
	rm -rf results/demo
