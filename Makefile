# fastsde: `make sample` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU wheel of torch (a plain `torch` from PyPI is the multi-GB CUDA build on Linux): first the
# CPU build pinned explicitly from PyTorch's CPU index; where that index does not answer within 5 s
# (probed once, so pip never retries against it) or has no such build, the same version from the
# default index. TORCH=... overrides the version.
TORCH ?= torch==2.13.0
TORCH_CPU ?= $(TORCH)+cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
INDEX_ANSWERS := import sys, urllib.request as u; u.urlopen(sys.argv[1], timeout=5).close()

.PHONY: sample test docs lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	if $(PY) -c "$(INDEX_ANSWERS)" "$(TORCH_CPU_INDEX)/" 2>/dev/null; then \
		$(PIP) install -q --timeout 20 --retries 1 "$(TORCH_CPU)" --extra-index-url $(TORCH_CPU_INDEX) \
		|| { echo "CPU build $(TORCH_CPU) not available: installing $(TORCH) from the default index"; \
		     $(PIP) install -q "$(TORCH)"; }; \
	else \
		echo "$(TORCH_CPU_INDEX) does not answer: installing $(TORCH) from the default index"; \
		$(PIP) install -q "$(TORCH)"; \
	fi
	$(PIP) install -q -e ".[dev]"
	touch $@

sample: $(VENV)/.installed
	$(VENV)/bin/fastsde sample

# Two workers (pytest-xdist), one test file per worker at a time: module fixtures are built once.
test: $(VENV)/.installed
	$(PY) -m pytest -n 2 --dist loadfile

# The documentation site (site/index.html), strict: a broken link or reference fails the build.
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) build dist site src/*.egg-info
