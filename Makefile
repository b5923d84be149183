# The two commands of the README: `make train` and `make test`. Both build the environment first.
.PHONY: setup train test lint

setup:
	@bash scripts/setup.sh >/dev/null

train: setup
	bash scripts/train_ddp.sh -c configs/default.yaml

lint: setup
	@PY=$$(bash scripts/setup.sh) && $$PY -m ruff check .

test: setup lint
	@PY=$$(bash scripts/setup.sh) && $$PY scripts/run_tests.py
