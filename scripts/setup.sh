#!/usr/bin/env bash
# setup.sh - prepare a fresh Debian 12 machine (as root) to develop and test smtpgate
#
# Usage: scripts/setup.sh [--bench]
#
# Installs the Debian packages the tests run for real (only those missing),
# creates ./.venv and installs smtpgate with its test extras (and bench
# extras with --bench). Idempotent: a second run only checks. Starts no
# service: the tests start their own private instances.
set -euo pipefail

cd "$(dirname "$0")/.."

bench=no
for arg in "$@"; do
    case "$arg" in
        --bench) bench=yes ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown argument: $arg (usage: scripts/setup.sh [--bench])" >&2; exit 2 ;;
    esac
done

if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: must run as root (it installs Debian packages)" >&2
    exit 1
fi

packages=(
    postfix redis-server dovecot-core dovecot-lmtpd unbound dnsmasq-base
    swaks rspamd haproxy openssl ca-certificates python3-venv prometheus
    systemd  # systemd-analyze verify checks conf/systemd/smtpgate.service (no systemd runs)
    fail2ban  # fail2ban-regex and fail2ban-client -t check conf/fail2ban (no fail2ban runs)
    iproute2  # ip: tests/services/readme_stack.py brings up loopback in its own network namespace
)

missing=()
for pkg in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [ "$status" = "installed" ] || missing+=("$pkg")
done

if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    # Postfix asks about the mail setup otherwise; the tests write their own main.cf.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q "${missing[@]}" >/dev/null
else
    echo "setup: Debian packages present"
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    python3 -m venv .venv
fi

extras=test
[ "$bench" = yes ] && extras=test,bench
echo "setup: pip install -e '.[$extras]' into .venv"
.venv/bin/pip install -q -e ".[$extras]"

echo "setup: done; run the tests with .venv/bin/pytest"
