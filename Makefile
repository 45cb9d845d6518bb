# The two-command quickstart: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# our quantized-product kernels (C++), rebuilt when their sources change; a failed build is not an error
KERNELS := $(VENV)/.kernels
KERNEL_SOURCES := $(wildcard model/kernels/*.cpp model/kernels/*.h model/kernels/build.py)

.PHONY: install demo test lint proto bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned torch would pull a CUDA build of several GB
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(KERNELS): $(STAMP) $(KERNEL_SOURCES)
	$(PY) -m homeswarm.model.kernels.build
	touch $(KERNELS)

install: $(STAMP) $(KERNELS)

# options of `homeswarm demo`, e.g. make demo DEMO_ARGS="--keep-running --nodes 2"
DEMO_ARGS ?=
demo: $(STAMP) $(KERNELS)
	$(VENV)/bin/homeswarm demo $(DEMO_ARGS)

# import-linter reads a package from disk, so it checks a plain (non-editable) copy of ours
lint: $(STAMP) $(KERNELS)
	rm -rf build/lint
	$(PY) -m pip install --quiet --no-deps --no-build-isolation --target build/lint .
	PYTHONPATH=build/lint $(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest

proto: $(STAMP)
	$(PY) -m homeswarm.protocol.regenerate

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache model/kernels/_build
