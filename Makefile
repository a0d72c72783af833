# mpdit-dist: set-up, tests and the embedded demo.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the release this project is tested with; any torch>=2.6 works (setup.cfg).
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup test test-unit test-distributed test-slurm slurm-up slurm-down demo clean

$(VENV)/.installed: setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q setuptools wheel ninja
	# DeepSpeed's CPU communication op built now, not JIT-compiled by the first test that needs it; never
	# from pip's cache, whose wheel may hold that op built for another torch (it then fails to load)
	DS_BUILD_SHM_COMM=1 $(PY) -m pip install -q --no-cache-dir --no-build-isolation 'deepspeed>=0.16,<1'
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q --durations=30 tests  # the 30 slowest tests listed at the end

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-distributed: setup
	$(PY) -m pytest -q tests/distributed

test-slurm: setup
	$(PY) -m pytest -q tests/slurm

slurm-up:
	scripts/slurm_cluster.sh install && scripts/slurm_cluster.sh start

slurm-down:
	scripts/slurm_cluster.sh stop

# the demo: digits -> latent shards -> training -> samples, left in results/demo
demo: setup
	$(PY) -m mpdit_dist.demo

clean:
	rm -rf results/demo
