# Two entry points for a fresh clone (see README): `make demo` and `make test`.
.PHONY: demo test lint bench

demo:
	bash scripts/setup.sh demo
	.venv/bin/triaged demo

test:
	bash scripts/setup.sh test
	.venv/bin/python -m pytest

lint:
	bash scripts/setup.sh dev
	.venv/bin/ruff format --check triaged tests benchmarks migrations
	.venv/bin/ruff check triaged tests benchmarks migrations
	.venv/bin/mypy triaged
