"""container - smtpgate from the shipped image as a benchmark target, beside one on the host.

SYNOPSIS
    build_image(cleanup) -> tag                 the repository's Dockerfile, removed at cleanup
    start_image_gate(stack, image, env, name, cleanup) -> ImageGate
    ImageGate: .port, .pid, .pids(), .runtime_pids(), .python   (a benchmarks.stack.Smtpgate)
    host_python(pid) -> "CPython 3.11.7"        the interpreter a host process runs

DESCRIPTION
    The image runs with podman, --network=host (the container shares the
    host's loopback: neither slirp4netns nor NAT is in what is measured),
    the environment's SMTPGATE_* keys and REDIS, HOSTNAME, DOMAIN passed
    with --env, and the stack's certificate folder mounted read-only.

    Its processes are the host's: ImageGate.pid is the container's first
    process (smtpgate's main process, the image's ENTRYPOINT in exec form),
    whose cutime+cstime holds the children it has reaped, and pids() is
    every process in the container's PID namespace (/proc/PID/ns/pid), so
    the CPU figure (benchmarks.procstat.cpu_seconds) covers all of the
    front's processes whatever their parent. runtime_pids() is what the
    container costs besides: conmon (which carries the container's
    stdout, smtpgate's log, to the podman client) and the podman client
    itself, reported apart from the front's own figure.

    The Python is asked of the interpreter in the process's own context:
    podman exec in the container, /proc/PID/exe on the host.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from benchmarks import procstat
from benchmarks.stack import Smtpgate, Stack, StackError, smtp_banner_any, spawn, wait_for

ROOT = Path(__file__).resolve().parent.parent
PROBE = "import platform, sys; print(platform.python_implementation(), sys.version.split()[0])"
# what the container is given of a target's environment (the rest is the host's own)
PASSED = ("REDIS", "HOSTNAME", "DOMAIN")


def podman(*args: str, timeout: float = 600) -> str:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise StackError(f"podman {' '.join(args)}: exit status {result.returncode}\n"
                         f"{result.stderr}")
    return result.stdout


def build_image(cleanup: contextlib.ExitStack) -> str:
    """Build the Dockerfile (on the base images already here: no registry) under a fresh
    tag, removed when cleanup closes."""
    image = f"localhost/smtpgate-bench:{uuid.uuid4().hex[:8]}"
    print(f"building {image} from {ROOT / 'Dockerfile'}", flush=True)
    podman("build", "--quiet", "--pull=never", "--format", "docker", "-t", image, str(ROOT))
    cleanup.callback(subprocess.run, ["podman", "rmi", "--force", image], capture_output=True)
    return image


def host_python(pid: int) -> str:
    exe = Path(f"/proc/{pid}/exe").readlink()
    return subprocess.run([str(exe), "-c", PROBE], capture_output=True, text=True,
                          timeout=30).stdout.strip()


def pid_namespace_members(pid: int) -> list[int]:
    """Every process in pid's PID namespace (pid itself included)."""
    try:
        namespace = os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return []
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/ns/pid") == namespace:
                    members.append(int(entry))
    return members


@dataclass
class ImageGate(Smtpgate):
    container: str = ""
    host_pid: int = 0  # the container's first process, as the host numbers it
    conmon_pid: int = 0
    python: str = ""

    @property
    def pid(self) -> int:
        return self.host_pid

    def pids(self) -> list[int]:
        return pid_namespace_members(self.host_pid)

    def runtime_pids(self) -> list[int]:
        client = self.proc.pid
        return [self.conmon_pid, client, *procstat.descendants(client)]


def start_image_gate(stack: Stack, image: str, env: dict[str, str], name: str,
                     cleanup: contextlib.ExitStack, deadline: float = 60) -> ImageGate:
    """The image's smtpgate with env's settings on env's SMTPGATE_MX_LISTEN port; stopped
    (and the container removed) when cleanup closes."""
    port = int(env["SMTPGATE_MX_LISTEN"].rpartition(":")[2])
    container = f"smtpgate-bench-{uuid.uuid4().hex[:8]}"
    cert_dir = stack.cert[0].parent
    keys = [key for key in env if key.startswith("SMTPGATE_") or key in PASSED]
    argv = ["podman", "run", "--rm", "--name", container, "--network=host",
            "--volume", f"{cert_dir}:{cert_dir}:ro",
            *(arg for key in keys for arg in ("--env", f"{key}={env[key]}")), image]
    proc = spawn(name, argv, stack.workdir)
    # the client forwards SIGTERM to the container; if it had to be killed, the container
    # would outlive it: removed by name (callbacks run last-in first-out)
    cleanup.callback(subprocess.run, ["podman", "rm", "--force", "--ignore", container],
                     capture_output=True, timeout=60)
    cleanup.callback(proc.stop, 30)

    def ready() -> bool:
        if proc.popen.poll() is not None:
            raise StackError("the image's smtpgate exited:\n"
                             + proc.log.read_text(errors="replace")[-3000:])
        return b"ready" in proc.log.read_bytes() and smtp_banner_any(port)

    wait_for(f"smtpgate from the image ({name})", ready, deadline, proc.log)
    state = podman("inspect", "--format", "{{.State.Pid}} {{.State.ConmonPid}}", container)
    host_pid, conmon_pid = (int(n) for n in state.split())
    python = podman("exec", container, "python", "-c", PROBE).strip()
    return ImageGate(proc, port, env, container=container, host_pid=host_pid,
                     conmon_pid=conmon_pid, python=f"{python} (image {image})")
