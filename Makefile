# Two commands for a new user: `make demo` (install + run every stage on the synthetic phantoms)
# and `make test` (install + run the test suite). Each creates .venv if missing, installing the
# pinned CPU torch FIRST so pip never resolves a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
WORKDIR ?= demo_workdir

.PHONY: install demo test bench bench-quick clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/segpipe demo --workdir $(WORKDIR)

test: $(VENV)/.installed
	$(PY) -m ruff check pipeline tests benchmarks cluster
	$(PY) -m pytest -q --timeout=900 tests

bench: $(VENV)/.installed
	$(PY) benchmarks/run_all.py --readme README.md

bench-quick: $(VENV)/.installed
	$(PY) benchmarks/run_all.py --quick --readme README.md

clean:
	rm -rf $(WORKDIR) .pytest_cache
