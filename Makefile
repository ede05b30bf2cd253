# Set-up from nothing: `make demo` runs the CPU demo, `make test` the whole test suite.
# Each creates the virtual environment .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: demo test serve clean

$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

# torch first (the CPU build), so the Hugging Face packages never pull a CUDA one.
$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# open_clip's model code is the reference for the HPS conversion test; --no-deps because its
	# torchvision dependency breaks transformers here (the test stubs the one name it imports).
	$(PY) -m pip install -q --no-deps open-clip-torch==3.3.0
	# timm's EfficientNetV2-S is the reference for tests/test_effnet.py; --no-deps for the same
	# reason (the test stubs torchvision while importing it; no torchvision code runs).
	$(PY) -m pip install -q --no-deps timm==1.0.31
	touch $@

# Debian's Chromium and its driver for the web demo's browser test (tests/test_serve.py).
$(VENV)/.browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -q && apt-get install -y -q chromium chromium-driver; }
	touch $@

demo: $(VENV)/.base
	$(PY) -m ppd_jax.demo --workdir=$(WORKDIR)

# Two pytest workers (pytest-xdist, in the [test] extra): most tests wait on single-threaded XLA
# compiles, so two keep both cores busy. --dist loadscope keeps each module's fixtures on one worker.
test: $(VENV)/.test $(VENV)/.browser
	$(PY) -m pytest -q -n 2 --dist loadscope tests

# The web demo on the demo's PPD run (runs/demo/ppd), which `make demo` builds if it is missing.
$(VENV)/.serve: $(VENV)/.base
	$(PY) -m pip install -q -e ".[serve]"
	touch $@

serve: $(VENV)/.serve
	test -d $(WORKDIR)/ppd/checkpoints || $(MAKE) demo
	$(PY) -m ppd_jax.serve --workdir=$(WORKDIR)/ppd

clean:
	rm -rf $(VENV) runs .jax_cache .ppd_cache
