"""prometheus_server - a real Prometheus (Debian's /usr/bin/prometheus) scraping test targets.

SYNOPSIS
    PrometheusServer(workdir, targets=["127.0.0.1:9425"], interval=1.0)
        .start(timeout=30) ; .stop(timeout=10)
        .query(expr) -> list[dict]           /api/v1/query, the result vector
        .wait_for_scrape(job="smtpgate", timeout=30)
        .port, .log_path, .config_path

DESCRIPTION
    Its configuration (one job, "smtpgate", scraping `targets` every
    `interval` seconds) and its storage live in workdir; it listens on a
    free loopback port (services.ports) and is ready when /-/ready answers
    200. stop() sends SIGTERM and asserts that Prometheus exited with status
    0 within the deadline; it raises with the log tail otherwise.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from .ports import free_port
from .procs import spawn
from .waiting import log_tail, wait_until

BINARY = "/usr/bin/prometheus"


class PrometheusServer:
    def __init__(self, workdir: Path, targets: list[str], interval: float = 1.0) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.targets = list(targets)
        self.interval = interval
        self.log_path = workdir / "prometheus.log"
        self.config_path = workdir / "prometheus.yml"
        self.proc: subprocess.Popen | None = None
        self.pick_ports()

    def pick_ports(self) -> None:
        self.port = free_port()

    def write_config(self) -> Path:
        seconds = f"{self.interval:g}s"
        config = {  # JSON is YAML
            "global": {"scrape_interval": seconds, "scrape_timeout": seconds,
                       "evaluation_interval": seconds},
            "scrape_configs": [{"job_name": "smtpgate",
                                "static_configs": [{"targets": self.targets}]}],
        }
        self.config_path.write_text(json.dumps(config, indent=2) + "\n")
        return self.config_path

    def start(self, timeout: float = 30.0) -> None:
        self.write_config()
        self.proc = spawn([
            BINARY, f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ], self.log_path, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with status {self.proc.returncode} at "
                                   f"start; log tail:\n{log_tail(self.log_path)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus not ready within {timeout:g} s; log tail:\n"
                                   f"{log_tail(self.log_path)}")
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready",
                                        timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def api(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:  # a bad expression: 400 with Prometheus's reason
            body = json.load(exc)
        if body.get("status") != "success":
            raise AssertionError(f"prometheus: {path} {params}: {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def wait_for_scrape(self, job: str = "smtpgate", timeout: float = 30.0) -> None:
        """Until every target of the job was scraped successfully at least once."""
        def scraped() -> bool:
            ups = self.query(f'up{{job="{job}"}}')
            return len(ups) == len(self.targets) and all(u["value"][1] == "1" for u in ups)

        wait_until(scraped, timeout, f"prometheus to scrape {self.targets}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM; Prometheus must exit with status 0 within timeout seconds."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
                raise AssertionError(f"prometheus did not exit within {timeout:g} s of "
                                     f"SIGTERM; log tail:\n{log_tail(self.log_path)}") from None
        if proc.returncode != 0:
            raise AssertionError(f"prometheus exited with status {proc.returncode}; log tail:\n"
                                 f"{log_tail(self.log_path)}")
