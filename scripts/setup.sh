#!/usr/bin/env bash
# setup.sh - prepare a fresh Debian 12 machine (as root) to run, test or benchmark smtpgate
#
# Usage: scripts/setup.sh [--run] [--bench]
#
# Installs the Debian packages (only those missing): with --run, what
# `make run` needs; without it, also what the tests and benchmarks run for
# real. Then creates ./.venv and installs smtpgate with its test extras
# (and bench extras with --bench), and, without --run, makes the images and
# the systemd root the container tests run on (once per machine, under
# /var/cache/smtpgate-test). Idempotent: a second run only checks.
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
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
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
    iproute2  # ip: tests/services/readme_stack.py brings up loopback in its own network namespace
    testssl.sh  # the cipher suites per port (tests/test_tls_ciphers_e2e.py)
    # the image, compose.yaml and the systemd unit run for real (tests/test_container_*.py)
    podman runc slirp4netns debootstrap systemd-container
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

# --- containers and systemd: what tests/test_container_*.py run on ---------------------------
#
# No registry reaches these machines, so the images the repository's files start FROM are
# made here from Debian's packages; none of it is pulled. Each piece is built once per
# machine under $cache and rebuilt only when the recipe that made it changes (its name
# carries a hash of the function's text and of the files it reads).

cache=${SMTPGATE_CONTAINER_CACHE:-/var/cache/smtpgate-test}
debian_mirror=http://deb.debian.org/debian

recipe_hash() {  # recipe_hash FUNCTION|FILE...: 12 hex digits of the functions' and files' text
    local part
    for part in "$@"; do
        if declare -F "$part" >/dev/null; then declare -f "$part"; else cat "$part"; fi
    done | sha256sum | cut -c1-12
}

# Podman on this kind of VM: crun fails on its hybrid cgroups, and root may not raise
# rlimits past the hard limits (20000 open files, 32768 processes).
containers_conf() {
    local conf=/etc/containers/containers.conf
    local want='# written by smtpgate scripts/setup.sh
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
events_logger = "file"
cgroup_manager = "cgroupfs"'
    if [ -e "$conf" ] && ! grep -q '^# written by smtpgate scripts/setup.sh' "$conf"; then
        echo "setup: keeping your $conf (the container tests need runc, cgroupfs, file events)"
        return
    fi
    if [ "$(cat "$conf" 2>/dev/null)" != "$want" ]; then
        mkdir -p /etc/containers
        printf '%s\n' "$want" > "$conf"
    fi
}

# A minimal Debian with the host's CA certificates: HTTPS to the package registries may go
# through a proxy CA, which pip and apt inside must trust.
make_debian_root() {  # make_debian_root ROOT SUITE
    local root=$1 suite=$2
    debootstrap --variant=minbase "$suite" "$root" "$debian_mirror" >"$root.log" 2>&1 \
        || { tail -20 "$root.log" >&2; return 1; }
    mkdir -p "$root/usr/local/share/ca-certificates" "$root/etc/ssl/certs"
    if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
        cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    fi
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
}
make_trixie_root() { make_debian_root "$1" trixie; }      # Debian 13: Python 3.13
make_bookworm_root() { make_debian_root "$1" bookworm; }  # Debian 12: debian:12-slim

# The root systemd-nspawn boots for the unit's test: systemd, D-Bus, libnss-systemd (for
# DynamicUser), ssl-cert (the unit's SupplementaryGroups), python3-venv (the unit's install
# steps) and procps (/bin/kill for ExecReload; every Debian server has it, minbase does not).
# The test lays an overlay on it, so each run starts from this state.
make_systemd_root() {
    local root=$1
    cp -a "$trixie_root/." "$root/"
    rm -f "$root/.complete"
    systemd-nspawn --quiet --register=no --keep-unit -D "$root" --pipe \
        /bin/sh -ec 'apt-get update -q
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
                systemd systemd-sysv dbus libnss-systemd ssl-cert python3-venv ca-certificates \
                procps
            rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb' >"$root.log" 2>&1 \
        || { tail -20 "$root.log" >&2; return 1; }
}

built=
build_dir() {  # build_dir FUNCTION NAME [RECIPE...]: make $cache/NAME-HASH with FUNCTION once
    local fn=$1 name=$2 dir    # (HASH of FUNCTION and the other recipes); $built names it
    shift 2
    dir="$cache/$name-$(recipe_hash "$fn" "$@")"
    built=$dir
    if [ ! -e "$dir/.complete" ]; then
        echo "setup: building $dir (once per machine)"
        rm -rf "$dir" "$dir.log"
        mkdir -p "$dir"
        "$fn" "$dir"
        touch "$dir/.complete"
    fi
    # Older builds of the same piece are of no further use.
    find "$cache" -maxdepth 1 -name "$name-*" ! -name "$(basename "$dir")*" \
        -exec rm -rf {} + 2>/dev/null || true
}

image_recipe() {  # image_recipe IMAGE: the recipe label of a local image, empty if none
    podman image inspect --format '{{index .Labels "org.smtpgate.recipe"}}' "$1" 2>/dev/null \
        || true
}

import_root() {  # import_root ROOT IMAGE: the folder as an image, labelled with its folder's hash
    local root=$1 image=$2 hash=${1##*-}
    [ "$(image_recipe "$image")" = "$hash" ] && return
    echo "setup: importing $root as $image"
    tar -C "$root" --exclude=./.complete -c . \
        | podman import --quiet --change "LABEL org.smtpgate.recipe=$hash" - "$image" >/dev/null
}

# standin IMAGE DIR BASE: DIR's Containerfile built FROM BASE and tagged IMAGE, the name of an
# image no registry here serves; rebuilt when DIR or BASE changes.
standin() {
    local image=$1 dir=$2 base=$3 hash
    hash=$( { image_recipe "$base"; cat "$dir"/*; } | sha256sum | cut -c1-12)
    [ "$(image_recipe "$image")" = "$hash" ] && return
    echo "setup: building the stand-in for $image (once per machine)"
    podman build --quiet --pull=never --format docker --build-arg "BASE=$base" \
        --label "org.smtpgate.recipe=$hash" -t "$image" "$dir" >/dev/null
}

trixie_chain() {
    build_dir make_trixie_root trixie make_debian_root
    trixie_root=$built
    import_root "$trixie_root" localhost/smtpgate-test/trixie:latest
    # the Dockerfile's python:3.13-slim: Debian 13's Python 3.13
    standin docker.io/library/python:3.13-slim tests/containers/python-slim \
        localhost/smtpgate-test/trixie:latest & local python=$!
    build_dir make_systemd_root systemd-root make_trixie_root make_debian_root
    wait "$python"
}

bookworm_chain() {
    # deploy/postfix's debian:12-slim, and what compose.yaml pulls, from Debian 12's packages
    build_dir make_bookworm_root bookworm make_debian_root
    import_root "$built" docker.io/library/debian:12-slim
    local name pids=()
    for name in redis rspamd dovecot; do
        standin "$(sed -n 's/^# IMAGE: //p' "tests/containers/$name/Containerfile")" \
            "tests/containers/$name" docker.io/library/debian:12-slim &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
}

# The two Debian releases are made side by side: most of the time goes to downloads.
containers_setup() {
    containers_conf
    mkdir -p "$cache"
    trixie_chain & local trixie=$!
    bookworm_chain & local bookworm=$!
    local status=0
    wait "$trixie" || status=$?
    wait "$bookworm" || status=$?
    [ "$status" -eq 0 ] || { echo "setup: making the container images failed" >&2; exit 1; }
}

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    python3 -m venv .venv
fi

extras=test
[ "$bench" = yes ] && extras=test,bench
# The images and the venv need nothing of each other and both wait mostly on downloads:
# on a new machine, made side by side, they take the time of the longer one.
images=
if [ "$only_run" = no ]; then
    containers_setup &
    images=$!
fi
echo "setup: pip install -e '.[$extras]' into .venv"
pip_status=0
.venv/bin/pip install -q -e ".[$extras]" || pip_status=$?
if [ -n "$images" ]; then
    wait "$images" || exit 1  # containers_setup said what failed
fi
[ "$pip_status" -eq 0 ] || { echo "setup: pip install failed" >&2; exit "$pip_status"; }

echo "setup: done; run the tests with .venv/bin/pytest"
