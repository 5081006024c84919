"""podman - images and containers for the tests that run the shipped image for real

SYNOPSIS
    HOST_LOOPBACK: str                  "10.0.2.2", the host's 127.0.0.1 seen from a container
    require_standins() -> None          fail clearly when scripts/setup.sh has not run
    podman(*args, timeout=120) -> str   stdout of a podman command (RuntimeError on failure)
    build_image(context, tag, containerfile=None, build_args=None) -> str
    remove_image(tag) -> None
    Container(image, name_prefix, env, ports=(), volumes=(), sysctls=(), network=SLIRP)
        .start(ready=None, timeout=30) ; .logs() -> str ; .wait_for_log(regex, timeout=20)
        .exec(*argv, check=True) -> CompletedProcess
        .stop(timeout=40) -> int        `podman stop`; the container's exit status
        .remove() -> None               podman rm -f (also at interpreter exit)
        .host_port(port) -> int         the host port published for the container's port

DESCRIPTION
    No registry reaches these machines: the base images the repository's
    files start FROM are made by scripts/setup.sh from Debian's packages
    (python:3.13-slim stood in by Debian 13's Python 3.13). require_standins()
    checks they exist and names the command that makes them.

    Containers use slirp4netns with allow_host_loopback, so that a container
    reaches the test harness's services, which listen on the host's loopback
    only, at HOST_LOOPBACK (10.0.2.2), and the host's Postfix sees smtpgate's
    XCLIENT connections come from 127.0.0.1, the address its
    smtpd_authorized_xclient_hosts trusts. Podman's default bridge could
    reach the host only on the bridge's address, where nothing of the
    harness listens. Published ports go to 127.0.0.1 on free host ports;
    clients published through slirp4netns reach the container from
    HOST_LOOPBACK.

    Each container gets a unique name, is removed at the end (also when a
    test fails or pytest is interrupted), and keeps its log for assertions.
    Podman, without systemd on the host, logs an error about healthcheck
    timers at run and stop; the healthcheck itself is run on demand
    (`podman healthcheck run`), so that error is harmless here.
"""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from pathlib import Path

from .ports import free_port
from .procs import on_exit
from .waiting import wait_until

HOST_LOOPBACK = "10.0.2.2"
SLIRP = "slirp4netns:allow_host_loopback=true,port_handler=slirp4netns"
PYTHON_BASE = "docker.io/library/python:3.13-slim"


def podman(*args: str, timeout: float = 120, check: bool = True) -> str:
    try:
        result = subprocess.run(["podman", *args], capture_output=True, text=True,
                                timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise RuntimeError("podman is not installed: run scripts/setup.sh") from None
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"podman {' '.join(args)}: no answer after {timeout:g} s") from None
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)}: exit status {result.returncode}\n"
                           f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result.stdout


def image_exists(tag: str) -> bool:
    return subprocess.run(["podman", "image", "exists", tag], capture_output=True).returncode == 0


def require_standins(*tags: str) -> None:
    missing = [tag for tag in (PYTHON_BASE, *tags) if not image_exists(tag)]
    if missing:
        raise RuntimeError(f"no local image {', '.join(missing)}: scripts/setup.sh makes the "
                           "stand-ins for the images no registry here serves")


def build_image(context: Path, tag: str, containerfile: Path | None = None,
                build_args: dict[str, str] | None = None) -> str:
    """Build with `--pull=never` (nothing to pull from here), Docker format (HEALTHCHECK kept)."""
    args = ["build", "--quiet", "--pull=never", "--format", "docker", "-t", tag]
    if containerfile is not None:
        args += ["-f", str(containerfile)]
    for key, value in (build_args or {}).items():
        args += ["--build-arg", f"{key}={value}"]
    podman(*args, str(context), timeout=600)
    return tag


def remove_image(tag: str) -> None:
    podman("rmi", "--force", tag, check=False)


class Container:
    def __init__(self, image: str, name_prefix: str, env: dict[str, str],
                 ports: tuple[int, ...] = (), volumes: tuple[str, ...] = (),
                 sysctls: tuple[str, ...] = (), network: str = SLIRP) -> None:
        self.image = image
        self.name = f"{name_prefix}-{uuid.uuid4().hex[:8]}"
        self.env = dict(env)
        self.ports = {port: free_port() for port in ports}
        self.volumes = tuple(volumes)
        self.sysctls = tuple(sysctls)
        self.network = network
        self.created = False

    def host_port(self, port: int) -> int:
        return self.ports[port]

    def start(self, ready: str | None = None, timeout: float = 30) -> None:
        args = ["run", "--detach", "--name", self.name, "--network", self.network]
        for inner, outer in self.ports.items():
            args += ["--publish", f"127.0.0.1:{outer}:{inner}"]
        for spec in self.volumes:
            args += ["--volume", spec]
        for sysctl in self.sysctls:
            args += ["--sysctl", sysctl]
        for key, value in self.env.items():
            args += ["--env", f"{key}={value}"]
        on_exit(self.remove)
        self.created = True
        podman(*args, self.image)
        if ready is not None:
            self.wait_for_log(re.escape(ready), timeout)

    def state(self) -> dict[str, str]:
        out = podman("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", self.name)
        status, code = out.split()
        return {"status": status, "exit_code": code}

    def logs(self) -> str:
        result = subprocess.run(["podman", "logs", self.name], capture_output=True, text=True,
                                timeout=30)
        return result.stdout + result.stderr

    def wait_for_log(self, regex: str, timeout: float = 20) -> re.Match:
        pattern = re.compile(regex)

        def found():
            match = pattern.search(self.logs())
            if match is None and self.state()["status"] == "exited":
                raise AssertionError(f"{self.name} exited:\n{self.logs()[-3000:]}")
            return match

        try:
            return wait_until(found, timeout, f"{regex!r} in {self.name}'s log", interval=0.2)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; log tail:\n{self.logs()[-3000:]}") from None

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(["podman", "exec", self.name, *argv], capture_output=True,
                                text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"podman exec {self.name} {' '.join(argv)}: exit status "
                                 f"{result.returncode}\n{result.stdout}{result.stderr}")
        return result

    def stop(self, timeout: float = 40) -> int:
        """`podman stop` (SIGTERM, SIGKILL after timeout s); the container's exit status."""
        started = time.monotonic()
        podman("stop", "--time", str(int(timeout)), self.name, timeout=timeout + 30)
        if time.monotonic() - started >= timeout:
            raise AssertionError(f"{self.name} did not stop within {timeout:g} s of SIGTERM "
                                 f"(killed); log tail:\n{self.logs()[-3000:]}")
        return int(self.state()["exit_code"])

    def remove(self) -> None:
        if self.created:
            podman("rm", "--force", "--time", "0", self.name, check=False, timeout=60)
            self.created = False

    def __repr__(self) -> str:
        return f"<Container {self.name} of {self.image}>"
