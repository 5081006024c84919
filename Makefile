# The two commands of the README's quick start, and the rest of the daily loop.
.PHONY: setup run test lint bench

setup:
	bash scripts/setup.sh

# make run ARGS="--mx-port 3525 --metrics-port 9426": options of scripts/local_stack.py.
# It installs only what it runs (setup.sh --run): no HAProxy, Prometheus, fail2ban, rspamd.
run:
	bash scripts/setup.sh --run
	.venv/bin/python scripts/local_stack.py $(ARGS)

# The tests mostly wait on the real services they start, so pytest-xdist runs them in
# TEST_WORKERS processes (each with its own services); a module's tests stay together on
# one worker (--dist loadfile), so its module-scoped services start once.
TEST_WORKERS ?= 3

test: setup
	.venv/bin/ruff check smtpgate tests scripts benchmarks
	.venv/bin/hadolint Dockerfile deploy/postfix/Dockerfile
	.venv/bin/pytest -n $(TEST_WORKERS) --dist loadfile

lint: setup
	.venv/bin/ruff check smtpgate tests scripts benchmarks
	.venv/bin/hadolint Dockerfile deploy/postfix/Dockerfile

bench:
	bash scripts/setup.sh --bench
	.venv/bin/python -m benchmarks.run
