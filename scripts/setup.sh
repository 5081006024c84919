#!/usr/bin/env bash
# setup.sh - prepare a fresh Debian 12 machine (as root) to run, test or benchmark smtpgate
#
# Usage: scripts/setup.sh [--run] [--bench]
#
# Installs the Debian packages (only those missing): with --run, what
# `make run` needs; without it, also what the tests and benchmarks run for
# real. Then creates ./.venv and installs smtpgate with its test extras
# (and bench extras with --bench). Idempotent: a second run only checks.
# Starts and enables no system service: Postfix, Dovecot, Redis and the rest
# are installed with a policy-rc.d that denies every start, removed again
# afterwards, and the units of the packages it installed are disabled
# (`make run` and the tests start private instances of their own).
set -euo pipefail

cd "$(dirname "$0")/.."

bench=no
only_run=no
for arg in "$@"; do
    case "$arg" in
        --run) only_run=yes ;;
        --bench) bench=yes ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown argument: $arg (usage: scripts/setup.sh [--run] [--bench])" >&2
           exit 2 ;;
    esac
done

if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: must run as root (it installs Debian packages)" >&2
    exit 1
fi

# What `make run` (scripts/local_stack.py) starts, and its first message's client.
run_packages=(
    postfix redis-server dovecot-core dovecot-lmtpd unbound swaks
    openssl ca-certificates python3-venv
)
# What the tests and benchmarks add.
test_packages=(
    dnsmasq-base  # the benchmarks' DNS server
    rspamd  # the milter in the tests' Postfix
    haproxy  # the PROXY protocol tests
    prometheus  # the dashboard test runs a private Prometheus and promtool
    systemd  # systemd-analyze verify checks conf/systemd/smtpgate.service (no systemd runs)
    fail2ban  # fail2ban-regex and fail2ban-client -t check conf/fail2ban (no fail2ban runs)
    testssl.sh  # the cipher suites per port (tests/test_tls_ciphers_e2e.py)
)

packages=("${run_packages[@]}")
[ "$only_run" = yes ] || packages+=("${test_packages[@]}")

missing=()
for pkg in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [ "$status" = "installed" ] || missing+=("$pkg")
done

installed_packages() {
    dpkg-query -W -f='${db:Status-Status} ${Package}\n' | awk '$1 == "installed" {print $2}' | sort
}

policy=/usr/sbin/policy-rc.d
made_policy=no
remove_policy() {
    if [ "$made_policy" = yes ]; then
        rm -f "$policy"
        made_policy=no
    fi
}

if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    # Postfix asks about the mail setup otherwise; make run and the tests write their own main.cf.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    export DEBIAN_FRONTEND=noninteractive
    # invoke-rc.d asks policy-rc.d before the packages' scripts start a service: 101 denies
    # it. A policy-rc.d already there (container images ship one) is left as it is.
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\n# scripts/setup.sh: no service starts while it installs packages\nexit 101\n' \
            > "$policy"
        chmod 755 "$policy"
        made_policy=yes
        trap remove_policy EXIT
        echo "setup: $policy denies service starts until the packages are installed"
    fi
    before=$(installed_packages)
    apt-get update -q >/dev/null
    apt-get install -y -q "${missing[@]}" >/dev/null
    # The packages' scripts enable their units (to start at boot) whatever policy-rc.d says:
    # disable those of every package this run installed, Recommends included.
    new=$(comm -13 <(echo "$before") <(installed_packages))
    units=$(for pkg in $new; do dpkg -L "$pkg"; done 2>/dev/null \
        | grep -E '^(/usr)?/lib/systemd/system/[^/]+\.(service|socket|timer)$' \
        | xargs -r -n1 basename | sort -u || true)
    for unit in $units; do
        deb-systemd-helper disable "$unit" >/dev/null 2>&1 || true
    done
    [ -z "$units" ] || echo "setup: disabled at boot: $(echo $units)"
    remove_policy
    trap - EXIT
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
