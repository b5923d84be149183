# The commands of the README: `make train`, `make test` (the suite without the tests marked slow,
# ~20 min) and `make test-all` (everything, what .ci/run runs). All build the environment first.
.PHONY: setup train test test-all lint

setup:
	@bash scripts/setup.sh >/dev/null

train: setup
	bash scripts/train_ddp.sh -c configs/default.yaml

lint: setup
	@PY=$$(bash scripts/setup.sh) && $$PY -m ruff check .

test: setup lint
	@PY=$$(bash scripts/setup.sh) && $$PY scripts/run_tests.py --fast

test-all: setup lint
	@PY=$$(bash scripts/setup.sh) && $$PY scripts/run_tests.py
