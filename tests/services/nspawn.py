"""nspawn - a booted Debian 13 with a real systemd, for the tests of the shipped unit

SYNOPSIS
    systemd_root() -> Path              the root scripts/setup.sh made (RuntimeError if none)
    BootedRoot(workdir, lower)
        .root: Path                     the root's / as seen from the host (an overlay)
        .boot(timeout=60) -> None       systemd-nspawn --boot; waits for the system to run
        .run(*argv, check=True, timeout=120, env=None) -> CompletedProcess   inside, as root
        .systemctl(*args, check=True) -> CompletedProcess
        .show(unit, *properties) -> dict[str, str]
        .journal(unit) -> str           journalctl -u unit, the messages only
        .shutdown(timeout=60) -> None   powers off, waits for nspawn, removes the overlay

DESCRIPTION
    The root (systemd, dbus, libnss-systemd, ssl-cert, python3-venv on a
    debootstrap of trixie) is made once per machine by scripts/setup.sh; each
    BootedRoot lays an overlay on it in workdir, so a test starts from that
    state and leaves the root unchanged. systemd-nspawn boots it with
    --register=no --keep-unit (no systemd or D-Bus on the host to register
    with) and without --private-network: the booted system shares the host's
    network, so a unit in it reaches the test harness's Redis, DNS and
    Postfix on the host's loopback, and its listeners are on the host's.
    There is no machinectl here: run() enters the booted system's namespaces
    with nsenter, with a clean environment.

    shutdown() sends nspawn SIGTERM, which makes it power the system off
    cleanly, waits, then unmounts the overlay; it is also registered to run
    at interpreter exit.
"""

from __future__ import annotations

import contextlib
import glob
import signal
import subprocess
from pathlib import Path

from .gate_process import children_of
from .procs import on_exit, spawn, stop_process
from .waiting import log_tail, wait_until

CACHE = Path("/var/cache/smtpgate-test")
CLEAN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "HOME": "/root", "LANG": "C.UTF-8"}


def systemd_root() -> Path:
    found = sorted(glob.glob(str(CACHE / "systemd-root-*/.complete")))
    if not found:
        raise RuntimeError(f"no systemd root under {CACHE}: scripts/setup.sh makes it")
    return Path(found[-1]).parent


class BootedRoot:
    def __init__(self, workdir: Path, lower: Path) -> None:
        self.workdir = Path(workdir)
        self.lower = Path(lower)
        self.root = self.workdir / "root"
        self.console = self.workdir / "console.log"
        self._proc = None
        self._mounted = False
        self.pid: int | None = None

    def _mount(self) -> None:
        upper, work = self.workdir / "upper", self.workdir / "work"
        for path in (upper, work, self.root):
            path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={self.lower},upperdir={upper},workdir={work}",
                        str(self.root)], check=True, capture_output=True, timeout=30)
        self._mounted = True

    def boot(self, timeout: float = 60) -> None:
        self._mount()
        on_exit(self.shutdown)
        self._proc = spawn(["systemd-nspawn", "--quiet", "--register=no", "--keep-unit",
                            "-D", str(self.root), "--boot"], self.console, env=CLEAN_ENV)

        def init_pid():
            if self._proc.poll() is not None:
                raise AssertionError(f"systemd-nspawn exited with {self._proc.returncode}:\n"
                                     f"{log_tail(self.console)}")
            children = children_of(self._proc.pid)
            return children[0] if children else None

        self.pid = wait_until(init_pid, timeout, "the booted system's init")
        # "degraded" is running too: a unit of the stock system may fail in a container
        try:
            wait_until(lambda: self.run("systemctl", "is-system-running", check=False)
                       .stdout.strip() in ("running", "degraded"), timeout,
                       f"systemd in {self.root} to finish booting")
        except TimeoutError as exc:  # what it still waits for says why
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
            jobs = self.run("systemctl", "list-jobs", "--no-pager", check=False).stdout
            raise TimeoutError(f"{exc}: still {state!r}; jobs:\n{jobs}\n"
                               f"console:\n{log_tail(self.console)}") from None

    def run(self, *argv: str, check: bool = True, timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(["nsenter", "-t", str(self.pid), "-a", *argv],
                                capture_output=True, text=True, timeout=timeout,
                                env={**CLEAN_ENV, **(env or {})}, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} (in {self.root}): exit status "
                                 f"{result.returncode}\n{result.stdout}{result.stderr}")
        return result

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("systemctl", *args, check=check)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={name}" for name in properties))
        return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit).stdout

    def shutdown(self, timeout: float = 60) -> None:
        if self._proc is not None:
            # SIGTERM to nspawn alone (not its process group): it powers the system off
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout)
            stop_process(self._proc, timeout=5)
            self._proc = None
        if self._mounted:
            with contextlib.suppress(subprocess.CalledProcessError):
                subprocess.run(["umount", str(self.root)], check=True, capture_output=True,
                               timeout=30)
                self._mounted = False
