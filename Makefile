# One entry point for setup, the demo, the tests and the benchmarks. Everything runs from a
# project-local virtual environment (.venv) that `make setup` creates on first use.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
# On a CUDA machine: make setup TORCH_SPEC="torch==2.13.0" TORCH_INDEX="<your CUDA wheel index>".
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PIP_FLAGS ?= -q
# Never the working folder on sys.path (`python -m` would put it there): this checkout's top-level
# folders (kernels/, ...) would shadow installed packages of those names (Hugging Face's `kernels`).
export PYTHONSAFEPATH = 1

.PHONY: setup demo test lint bench clean browser debian

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) --upgrade pip
	$(PY) -m pip install $(PIP_FLAGS) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	# The editable install's one notice (a folder named like the package: brigade maps to this folder by
	# design) is a UserWarning of setuptools; nothing else of the build is silenced.
	PYTHONWARNINGS="ignore::UserWarning" $(PY) -m pip install $(PIP_FLAGS) -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/brigade demo

# Debian packages some tests need: chromium (browser tests) and nftables (the NAT testbed). Installed
# where we may (root with apt-get); without them those tests skip and say why.
DEBIAN_PACKAGES := chromium:chromium nft:nftables
debian:
	@for entry in $(DEBIAN_PACKAGES); do tool=$${entry%%:*}; package=$${entry##*:}; \
	  command -v $$tool >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    { apt-get install -y -q $$package >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $$package >/dev/null 2>&1; }; }; } || \
	  echo "$$package could not be installed: the tests that need it will skip"; done

browser: debian

test: setup debian
	$(VENV)/bin/ruff check .
	$(PY) -m pytest --durations=30

bench: setup
	$(PY) benchmarks/decode_latency.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
