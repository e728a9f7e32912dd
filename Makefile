# shiftfs — the README's two commands are `make demo` and `make test`.
PY := .venv/bin/python

.PHONY: setup demo test bench bench-quick stress clean
setup:
	@./scripts/setup.sh

demo: setup
	@./scripts/demo.sh

test: setup
	$(PY) -m pytest -q -ra tests

bench: setup
	$(PY) -m bench --full

bench-quick: setup
	$(PY) -m bench --quick

stress: setup
	SHIFTFS_STRESS=1 $(PY) -m pytest -q -ra tests -k stress

clean:
	rm -rf .venv build *.egg-info
