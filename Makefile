# The two commands of the README. Both run scripts/setup first (idempotent, cached).
.PHONY: setup demo test lint bench bench-env

setup:
	@scripts/setup

demo: setup  ## the full pipeline on a local broker, with generated sample media
	.venv/bin/streamproc demo

test: setup  ## the whole test suite against a real local Kafka broker
	.venv/bin/python -m pytest -q tests
	.venv/bin/ruff check streamproc tests benchmarks
	.venv/bin/python -m mypy

lint: setup  ## ruff, and mypy on the packages pyproject.toml [tool.mypy] lists
	.venv/bin/ruff check streamproc tests benchmarks
	.venv/bin/python -m mypy

bench-env: setup  ## .venv-bench: the runtime packages + the `bench` extra (Quix Streams, Bytewax)
	@scripts/bench-env
