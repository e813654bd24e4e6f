# The two commands of README: `make serve` and `make test`. Both set up .venv on first use.
.PHONY: setup serve test

setup:
	bash scripts/setup.sh

serve: setup
	.venv/bin/saft serve

test: setup
	.venv/bin/lint-imports
	.venv/bin/ruff check .
	.venv/bin/mypy
	.venv/bin/python -m pytest -q
