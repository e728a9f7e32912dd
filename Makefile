# shiftfs — the README's two commands are `make demo` and `make test`.
PY := .venv/bin/python

.PHONY: setup demo test lint bench bench-quick stress clean
setup:
	@./scripts/setup.sh

demo: setup
	@./scripts/demo.sh

test: setup
	$(PY) -m pytest -q -ra tests

# ruff (lint and format check) and mypy (shiftfs/ and bench/, pyproject.toml); CI runs it before the tests.
lint: setup
	$(PY) -m ruff check shiftfs bench tests
	$(PY) -m ruff format --check shiftfs bench tests
	$(PY) -m mypy

bench: setup
	$(PY) -m bench --full

bench-quick: setup
	$(PY) -m bench --quick

stress: setup
	SHIFTFS_STRESS=1 $(PY) -m pytest -q -ra tests -k stress

clean:
	rm -rf .venv build *.egg-info
