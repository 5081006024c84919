# The two commands of the README's quick start, and the rest of the daily loop.
.PHONY: setup run test lint bench

setup:
	bash scripts/setup.sh

# make run ARGS="--mx-port 3525 --metrics-port 9426": options of scripts/local_stack.py.
# It installs only what it runs (setup.sh --run): no HAProxy, Prometheus, fail2ban, rspamd.
run:
	bash scripts/setup.sh --run
	.venv/bin/python scripts/local_stack.py $(ARGS)

test: setup
	.venv/bin/ruff check smtpgate tests scripts benchmarks
	.venv/bin/hadolint Dockerfile deploy/postfix/Dockerfile
	.venv/bin/pytest

lint: setup
	.venv/bin/ruff check smtpgate tests scripts benchmarks
	.venv/bin/hadolint Dockerfile deploy/postfix/Dockerfile

bench:
	bash scripts/setup.sh --bench
	.venv/bin/python -m benchmarks.run
