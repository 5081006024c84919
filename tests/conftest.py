"""conftest - session-wide real services for the integration tests

SYNOPSIS
    Session fixtures (started on first use, once per pytest run, stopped at the end):
        service_root    Path of the run's temporary directory
        redis_server    services.redis_server.RedisServer
        redis_cluster   services.redis_ha.RedisClusterSet (three masters)
        dns_server      services.dns_server.DnsServer
        signed_zone     services.signed_zone.SignedZoneServer (a validating resolver over a
                        signed example.test: answers with the AD bit, for DANE)
        dovecot_server  services.dovecot_server.DovecotServer
        rspamd_server   services.rspamd_server.RspamdServer
        postfix_server  services.postfix_server.PostfixServer (uses dovecot, rspamd)
    Function fixtures:
        redis           redis.Redis on a flushed db 0 (Redis restarted if a test left it down)
        dns             dns_server with no records and no special zones
    Session fixture start_gate(listeners=("mx",), **env) -> services.gate_process.GateProcess
    Function fixture cli(redis_url, *args) -> (status, stdout, stderr): `smtpgate ARGS` run in
        this process against that Redis, as SUDO_USER=alice, with no settings file
    Session fixture smtpgate_image -> str: the repository's Dockerfile built (once per worker;
        builds take turns, so the second one is podman's cache)
    Every test, automatically: SMTP clients (services.smtp_talk.Talk) it left open are
    closed after it, and a test that passed but left one open fails at teardown.
    Every module, automatically: if it changed postfix_server's main.cf settings and did
    not put them back, they are put back and its last test fails at teardown.

DESCRIPTION
    Every service runs on free loopback ports inside one tempfile.mkdtemp()
    directory, so two pytest runs on one machine do not collide, and none
    touches /etc/postfix, /var/spool/postfix or /etc/rspamd/local.d. Each
    start waits for readiness with a deadline and fails with the service's
    own log tail; a start that finds a port taken meanwhile is tried again on
    new ports (services.ports). Services are stopped by the fixture finalizers, and again
    at interpreter exit (an interrupted run), and foreground services get
    SIGTERM if pytest dies. The directory is removed at the end unless
    SMTPGATE_TEST_KEEP=1 is set (its path is printed in the header).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

import pytest
from services import procs, smtp_talk
from services.dns_server import DnsServer
from services.dovecot_server import DovecotServer
from services.gate_process import GateProcess, make_certificate
from services.podman import build_image, remove_image, require_standins
from services.ports import start_on_free_ports
from services.postfix_server import PostfixServer
from services.redis_ha import RedisClusterSet
from services.redis_server import RedisServer
from services.rspamd_server import RspamdServer
from services.signed_zone import SignedZoneServer
from services.world import populate

_root: Path | None = None
BUILD_LOCK = Path("/run/lock/smtpgate-image-build.lock")


def _service_root() -> Path:
    global _root
    if _root is None:
        _root = procs.make_root()
        if os.environ.get("SMTPGATE_TEST_KEEP") != "1":
            # Registered first, so it runs after every service has stopped.
            procs.on_exit(lambda: shutil.rmtree(_root, ignore_errors=True))
    return _root


def pytest_report_header(config) -> str:
    return "smtpgate test services: SMTPGATE_TEST_KEEP=1 keeps their temporary directory"


def _serve(service):
    """Start service, stop it at the end of the session even if pytest is interrupted."""
    procs.on_exit(service.stop)
    return start_on_free_ports(service)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    return report


_CALL_FAILED = pytest.StashKey[bool]()


@pytest.fixture(autouse=True)
def _smtp_clients_closed(request):
    """Close the Talk clients a test left open; a passing test must not leave any."""
    before = {id(talk) for talk in smtp_talk.open_clients()}
    yield
    left = [talk for talk in smtp_talk.open_clients() if id(talk) not in before]
    for talk in left:
        talk.close()
    if left and not request.node.stash.get(_CALL_FAILED, True):
        pytest.fail(f"the test left {len(left)} SMTP client(s) open: {left}; "
                    "use `with Talk(...) as talk:`", pytrace=False)


@pytest.fixture(scope="session")
def service_root() -> Path:
    return _service_root()


@pytest.fixture(scope="session")
def redis_server(service_root):
    server = _serve(RedisServer(service_root / "redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(service_root):
    cluster = _serve(RedisClusterSet(service_root / "redis-cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_redis(redis_cluster):
    """The Cluster, emptied (FLUSHDB on every master); a module overrides `redis` with it."""
    client = redis_cluster.client()
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def redis(redis_server):
    if not redis_server.running:
        redis_server.start()
    client = redis_server.client()
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="session")
def dns_server(service_root):
    server = _serve(DnsServer(service_root / "dns"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def signed_zone(service_root):
    server = _serve(SignedZoneServer(service_root / "signed-zone"))
    yield server
    server.stop()


@pytest.fixture
def dns(dns_server):
    dns_server.clear()
    return dns_server


@pytest.fixture(scope="session")
def dovecot_server(service_root):
    server = _serve(DovecotServer(service_root / "dovecot"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def rspamd_server(service_root, dns_server):
    server = _serve(RspamdServer(service_root / "rspamd", nameserver=dns_server.nameserver))
    yield server
    server.stop()


_postfix: list[tuple[PostfixServer, dict[str, str]]] = []  # the session's, as it started


@pytest.fixture(scope="session")
def postfix_server(service_root, dovecot_server, rspamd_server):
    server = _serve(
        PostfixServer(
            service_root / "postfix",
            lmtp_port=dovecot_server.lmtp_port,
            milter_port=rspamd_server.milter_port,
            sasl_port=dovecot_server.auth_port,
        )
    )
    _postfix.append((server, server.settings()))
    yield server
    server.stop()


@pytest.fixture(scope="module", autouse=True)
def _postfix_left_as_found():
    """A module that changes the session's Postfix settings must put them back: `make test`
    spreads the modules over workers in no fixed order, so any module may come next."""
    yield
    for server, started in _postfix:
        now = server.settings()
        changed = sorted(key for key in started.keys() | now.keys()
                         if started.get(key) != now.get(key))
        if changed:
            server.postconf(**{key: started[key] for key in changed if key in started})
            pytest.fail("the module left the session's Postfix changed: "
                        + ", ".join(f"{key} = {now.get(key)!r} (was {started.get(key)!r})"
                                    for key in changed), pytrace=False)


# --- smtpgate itself, in front of the harness's Postfix ---------------------------------------


@pytest.fixture(scope="session")
def certificate(service_root):
    """(ca_path, cert_path, key_path) for mx.example.test, from a throwaway CA."""
    directory = service_root / "tls"
    directory.mkdir(exist_ok=True)
    return make_certificate(directory)


@pytest.fixture
def world(redis, dns):
    """The README's example keys and the loopback clients' DNS (services.world)."""
    populate(redis, dns)
    return redis


@pytest.fixture(scope="session")
def start_gate(service_root, postfix_server, redis_server, dns_server, dovecot_server,
               certificate):
    """start_gate(listeners=("mx",), **env) -> a running `smtpgate serve` in front of Postfix.

    MX only by default (listeners may add "submission", "submissions", "metrics",
    "socketmap", each on its own port: gate.<name>_port), no greet wait, mynetworks empty
    (so 127.0.0.x clients are strangers); every SMTPGATE_* setting can be overridden. Stop
    each with .stop() where its test or module ends: that asserts a clean exit (status 0
    within the deadline). What is still running at the end of the session is stopped, and
    checked, then.
    """
    _, cert, key = certificate
    started: list[GateProcess] = []
    counter = iter(range(1_000_000))

    def start(listeners: tuple[str, ...] = ("mx",), **env: str) -> GateProcess:
        gate = GateProcess(service_root / f"gate{next(counter)}", {
            "REDIS": redis_server.url,
            "SMTPGATE_NAMESERVERS": dns_server.nameserver,
            "SMTPGATE_NEXT_HOP": f"127.0.0.1:{postfix_server.port}",
            "SMTPGATE_SUBMISSION_NEXT_HOP": f"127.0.0.1:{postfix_server.submission_port}",
            "DOVECOT": "127.0.0.1",
            "SMTPGATE_DOVECOT_AUTH_PORT": str(dovecot_server.auth_port),
            "SMTPGATE_TLS_CERT": str(cert),
            "SMTPGATE_TLS_KEY": str(key),
            "SMTPGATE_TLS_OPTIONAL": "no",
            "SMTPGATE_MYNETWORKS": "",
            "SMTPGATE_GREET_WAIT": "0",
            "SMTPGATE_DNS_TIMEOUT": "2",
            **env,
        }, listeners=listeners)
        procs.on_exit(gate.stop)
        started.append(gate)
        gate.start()
        return gate

    yield start
    failures = []
    for gate in started:
        try:
            gate.stop()
        except AssertionError as exc:
            failures.append(f"{gate.workdir.name}: {exc}")
    if failures:
        raise AssertionError("\n\n".join(failures))


@pytest.fixture
def cli(monkeypatch, capsys):
    """smtpgate's command line, in this process: (exit status, stdout, stderr)."""
    from smtpgate.cli.main import main

    monkeypatch.setenv("SMTPGATE_ENV_FILE", "")
    monkeypatch.setenv("SUDO_USER", "alice")

    def call(url: str, *args: str) -> tuple[int, str, str]:
        monkeypatch.setenv("REDIS", url)
        capsys.readouterr()
        try:
            status = main(list(args))
        except SystemExit as exc:  # argparse's own refusals
            status = exc.code
        out, err = capsys.readouterr()
        return status, out, err

    return call


# --- the shipped image ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def smtpgate_image() -> str:
    """The repository's Dockerfile, unchanged, built once per run on the local stand-in for
    python:3.13-slim (scripts/setup.sh makes it); a tag of its own, removed at the end."""
    require_standins()
    tag = f"localhost/smtpgate-test/smtpgate:{os.getpid()}"
    procs.on_exit(lambda: remove_image(tag))
    # One build at a time on the machine: the next (another worker's) is then all cache hits.
    BUILD_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(BUILD_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        build_image(Path(__file__).resolve().parent.parent, tag)
    yield tag
    remove_image(tag)
