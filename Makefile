# Two commands for a fresh machine (no GPU needed):
#   make demo   installs everything and fine-tunes SmolLM2-135M on SST-2 with HELENE
#   make test   installs everything and runs the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check -c constraints-cpu.txt

.PHONY: setup demo test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	# deepspeed builds against the torch already installed
	$(PIP) --no-build-isolation deepspeed
	$(PIP) -e '.[dev,gpu]'
	touch $@

demo: setup
	$(PY) launch/train.py --config configs/default.json

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not multiproc" tests

clean:
	rm -rf $(VENV) outputs
