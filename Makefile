# The two commands of the README: `make demo` (set up, then run the main job on the example image) and
# `make test` (set up, then run every test CI runs). Both work on a fresh Debian 12 machine as root.
PY := .venv/bin/python

.PHONY: setup demo test lint bench

setup:
	bash scripts/setup.sh

demo: setup
	bash examples/demo.sh

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: setup lint
	$(PY) -m pytest

# Benchmarks run each peer in the same run (luksy, sev-snp-measure, buildah mkcw in a sid chroot, openssl):
# ../shared/tools/peers.sh sets those up.
bench: setup
	bash ../shared/tools/peers.sh
	for b in bench/*.py; do $(PY) $$b || exit 1; done
