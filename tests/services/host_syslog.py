"""host_syslog - start a Postfix the way Debian's postfix.service does, and read its syslog

SYNOPSIS
    postfix_start_syslog(config_dir, workdir, wait=20.0) -> list[str]

DESCRIPTION
    Debian's postfix.service runs `postfix start` (through postmulti): the
    master goes to the background with no terminal, and Postfix logs with
    syslog(3), to /dev/log, unless maillog_file names a file. This machine
    has no syslog daemon, and the tests must not take /dev/log from it, so
    the start runs in a mount namespace of its own (`unshare --mount`) with
    a private /dev: a tmpfs holding the device nodes Postfix needs (bound
    from the real /dev) and a datagram socket at /dev/log that this module
    reads, as syslogd would.

    postfix_start_syslog() runs `postfix -c config_dir start` there, waits
    up to `wait` seconds for the master's "daemon started" line to arrive
    on /dev/log, runs `postfix stop`, waits for the master to exit, and
    returns every message that arrived, without the <priority> prefix. A
    Postfix that logs elsewhere (maillog_file) leaves the list without
    them. Postfix is stopped whatever happens.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_PRIVATE_DEV = """set -e
old=$1; shift
mkdir -p "$old"
mount --rbind /dev "$old"
mount -t tmpfs -o mode=755 tmpfs /dev
for node in null zero random urandom full; do
    touch /dev/$node
    mount --bind "$old/$node" /dev/$node
done
ln -s /proc/self/fd /dev/fd
ln -s /proc/self/fd/0 /dev/stdin
ln -s /proc/self/fd/1 /dev/stdout
ln -s /proc/self/fd/2 /dev/stderr
exec "$@"
"""

_RECEIVER = r"""
import os, re, socket, subprocess, sys, time
config_dir, wait = sys.argv[1], float(sys.argv[2])
log = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
log.bind("/dev/log")
os.chmod("/dev/log", 0o666)
lines = []

def drain(seconds, until_started):
    deadline = time.monotonic() + seconds
    while True:
        log.settimeout(max(0.0, deadline - time.monotonic()))  # 0: do not block
        try:
            data = log.recv(65536)
        except (BlockingIOError, TimeoutError):
            return
        lines.append(re.sub(r"^<\d+>", "", data.decode(errors="replace")))
        if until_started and re.search(r"postfix/master\[\d+\]: daemon started", lines[-1]):
            return

def postfix(*args):
    return subprocess.run(["postfix", "-c", config_dir, *args], capture_output=True,
                          text=True, timeout=60)

pid_file = subprocess.run(["postconf", "-c", config_dir, "-h", "queue_directory"],
                          capture_output=True, text=True).stdout.strip() + "/pid/master.pid"
started = postfix("start")
try:
    if started.returncode != 0:
        sys.exit(f"postfix start failed: {started.stdout}{started.stderr}")
    drain(wait, True)
finally:
    try:
        pid = int(open(pid_file).read().split()[0])
    except (OSError, ValueError, IndexError):
        pid = None
    postfix("stop")
    deadline = time.monotonic() + 20
    while pid is not None and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    drain(0, False)
print("\0".join(lines))
"""


def postfix_start_syslog(config_dir: Path, workdir: Path, wait: float = 20.0) -> list[str]:
    workdir.mkdir(parents=True, exist_ok=True)
    script = workdir / "private-dev.sh"
    script.write_text(_PRIVATE_DEV)
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", str(script),
         str(workdir / "dev"), sys.executable, "-c", _RECEIVER, str(config_dir), str(wait)],
        capture_output=True, text=True, timeout=wait + 120)
    if result.returncode != 0:
        raise RuntimeError(f"postfix start with a private /dev/log failed "
                           f"({result.returncode}):\n{result.stdout}\n{result.stderr}")
    out = result.stdout.rstrip("\n")
    return out.split("\0") if out else []
