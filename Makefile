# Two commands do all the set-up on a fresh machine:
#   make demo   # virtual environment, install, then the whole pipeline on synthetic images
#   make test   # virtual environment, install, then the test suite
PYTHON ?= python3
VENV ?= .venv
# the CPU build of PyTorch (a plain "torch" would fetch a multi-GB CUDA build)
TORCH ?= torch==2.13.0
BIN = $(VENV)/bin

.PHONY: demo test install clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test,jax]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	rm -rf demo-run
	$(BIN)/covidxray demo --out demo-run

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) demo-run
