# Two commands on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The pin takes the CPU build of torch that this workplace keeps on disk; pyproject.toml asks only torch>=2.4.
TORCH_PIN := torch==2.13.0

.PHONY: install demo test lint clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/demo.py

test: install
	$(PY) -m pytest -x -q

lint: install
	$(VENV)/bin/ruff check src tests bench examples

clean:
	rm -rf $(VENV) nemo_experiments runs
