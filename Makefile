# The two set-up commands: `make demo` and `make test` (each installs what it needs first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch comes first and pinned here (not in the package metadata, which asks torch>=2.4).
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test check lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[demo,dev]'
	touch $@

demo: install
	$(BIN)/probekit demo

lint: install
	$(BIN)/ruff check probekit tests benchmarks
	$(BIN)/ruff format --check probekit tests benchmarks
	$(BIN)/mypy
	$(BIN)/python benchmarks/code_shape.py

test: lint
	$(BIN)/python -m pytest -q

# for iteration: lint, then the suite without the tests marked slow (CI runs `make test`)
check: lint
	$(BIN)/python -m pytest -q -m 'not slow and not network'

bench: install
	$(BIN)/python benchmarks/bench_extract.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
