"""The deployment files: compose.yaml, the Postfix image's start script, the Dovecot drop-in,
the systemd unit and the Kubernetes manifests are valid for the tools that will read them,
mount what the repository has, and set only settings smtpgate knows.

No Docker engine, systemd or cluster runs here: each file is checked by the real validator
offline (check-jsonschema with the Compose specification's schema, systemd-analyze verify,
kubernetes-validate with its bundled schemas, doveconf, postfix check, hadolint), and each
check is shown to fail on a broken copy.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from smtpgate import config

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "compose.yaml"
UNIT = REPO / "conf" / "systemd" / "smtpgate.service"
KUBERNETES = REPO / "deploy" / "kubernetes"
POSTFIX_IMAGE = REPO / "deploy" / "postfix"
BIN = Path(sys.executable).parent

KNOWN_ENV = {config.env_name(f.name, f.metadata["env"])
             for f in dataclasses.fields(config.Config)} | {"SMTPGATE_CONFIG"}


def tool(name: str) -> str:
    found = shutil.which(name, path=f"{BIN}:{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    assert found, f"{name} is not installed (scripts/setup.sh installs it)"
    return found


def run(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kwargs)


# --- compose.yaml ------------------------------------------------------------------------------


def compose_errors(path: Path) -> str:
    """check-jsonschema's complaint about path against the Compose specification ('' if none)."""
    result = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path))
    return "" if result.returncode == 0 else result.stdout + result.stderr


def test_compose_file_follows_the_compose_specification(tmp_path):
    assert compose_errors(COMPOSE) == ""
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("    ports:\n", "    portz:\n", 1))
    assert "portz" in compose_errors(broken)


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _bind_sources(service: dict) -> list[str]:
    sources = []
    for volume in service.get("volumes", []):
        source = volume["source"] if isinstance(volume, dict) else volume.split(":", 1)[0]
        if source.startswith((".", "/")):
            sources.append(source)
    return sources


def test_compose_mounts_only_what_the_repository_has():
    services = _compose()["services"]
    mounted = {name: _bind_sources(service) for name, service in services.items()}
    repo_mounts = [(name, source) for name, sources in mounted.items() for source in sources]
    assert repo_mounts, "compose.yaml mounts nothing from the repository"
    missing = [(name, source) for name, source in repo_mounts
               if not (REPO / source).exists() or not source.startswith("./")]
    assert not missing, f"mounted but not in the repository: {missing}"
    # Postfix is configured from the files the tests' Postfix runs
    assert "./conf/postfix" in mounted["postfix"]
    assert "./conf/smtpgate.toml" in mounted["smtpgate"]
    for name, service in services.items():
        build = service.get("build")
        context = build if isinstance(build, str) else (build or {}).get("context")
        if context:
            assert (REPO / context / "Dockerfile").is_file(), name


def test_compose_sets_only_known_settings_and_the_public_ports():
    compose = _compose()
    smtpgate = compose["services"]["smtpgate"]
    unknown = set(smtpgate["environment"]) - KNOWN_ENV
    assert not unknown, f"compose.yaml sets variables smtpgate does not read: {unknown}"
    assert {"25:25", "587:587", "465:465"} <= set(smtpgate["ports"])
    assert "ssl-certs:/etc/letsencrypt:ro" in smtpgate["volumes"]
    assert compose["volumes"]["ssl-certs"] == {"external": True}
    # the toml file it mounts is one smtpgate loads
    loaded = config.load({"SMTPGATE_CONFIG": str(REPO / "conf" / "smtpgate.toml"),
                          **{k: str(v) for k, v in smtpgate["environment"].items()
                             if k not in ("REDIS", "SMTPGATE_CONFIG", "LETSENCRYPT")}})
    assert [str(hop) for hop in loaded.next_hop] == ["127.0.0.1:10025"]
    # Postfix shares smtpgate's network namespace: its loopback services are smtpgate's
    postfix = compose["services"]["postfix"]
    assert postfix["network_mode"] == "service:smtpgate"
    assert "ports" not in postfix


def test_postfix_image_dockerfile_passes_hadolint():
    result = run(tool("hadolint"), str(POSTFIX_IMAGE / "Dockerfile"))
    assert result.returncode == 0, result.stdout + result.stderr


def _entrypoint_copy(tmp_path: Path) -> tuple[Path, Path, dict]:
    """The shipped conf/postfix/ with a private queue, and the environment for the script."""
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf" / "postfix", conf)
    for sub in ("queue", "data"):
        (tmp_path / sub).mkdir()
    shutil.chown(tmp_path / "data", "postfix", "postfix")
    tmp_path.chmod(0o755)
    with open(conf / "main.cf", "a") as main_cf:  # keep the machine's own Postfix out of it
        main_cf.write(f"queue_directory = {tmp_path / 'queue'}\n"
                      f"data_directory = {tmp_path / 'data'}\n")
    etc = tmp_path / "etc"
    etc.mkdir()
    env = {"PATH": os.environ["PATH"] + ":/usr/sbin:/sbin", "SMTPGATE_POSTFIX_CONF": str(conf),
           "POSTFIX_CONFIG_DIR": str(etc)}
    return conf, etc, env


def test_postfix_image_start_script_applies_the_image_variables(tmp_path):
    """deploy/postfix/entrypoint.sh: the shipped files, HOSTNAME/DOMAIN/DOVECOT applied, and
    `postfix check` passes on the result."""
    _, etc, env = _entrypoint_copy(tmp_path)
    script = str(POSTFIX_IMAGE / "entrypoint.sh")
    result = run(script, "--check-only",
                 env={**env, "HOSTNAME": "mx.example.org", "DOVECOT": "imap.internal"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning" not in result.stderr, result.stderr
    shown = run("postconf", "-c", str(etc), "-h", "myhostname", "mydomain", "virtual_transport",
                "recipient_delimiter").stdout.split()
    assert shown == ["mx.example.org", "mx.example.org", "lmtp:inet:imap.internal:24", "+"]


def test_postfix_image_start_script_refuses_to_start_without_hostname(tmp_path):
    _, _, env = _entrypoint_copy(tmp_path)
    result = run(str(POSTFIX_IMAGE / "entrypoint.sh"), "--check-only", env=env)
    assert result.returncode != 0
    assert "HOSTNAME must name this mail server" in result.stderr


def test_dovecot_drop_in_parses_with_dovecot(dovecot_server, tmp_path):
    """conf/dovecot/smtpgate.conf on top of a working Dovecot configuration: doveconf accepts
    it and the auth service listens on the image's port 11330."""
    combined = tmp_path / "dovecot.conf"
    combined.write_text(dovecot_server.conf_path.read_text()
                        + f"\n!include {REPO / 'conf' / 'dovecot' / 'smtpgate.conf'}\n")
    result = run("doveconf", "-c", str(combined), "-n")
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    auth = result.stdout[result.stdout.index("service auth {"):]
    assert "port = 11330" in auth[:auth.index("\n}")]
    combined.write_text(combined.read_text() + "service auth {\n  inet_listner x {\n  }\n}\n")
    assert run("doveconf", "-c", str(combined), "-n").returncode != 0


# --- the systemd unit --------------------------------------------------------------------------


def unit_problems(unit_text: str, tmp_path: Path) -> str:
    """What `systemd-analyze verify` says about the unit ('' when nothing). No systemd runs
    here; verify works offline, but insists that ExecStart's program exists, so the
    installed path /opt/smtpgate/bin/smtpgate is pointed at this environment's smtpgate."""
    smtpgate = BIN / "smtpgate"
    assert smtpgate.is_file()
    assert "ExecStart=/opt/smtpgate/bin/smtpgate serve\n" in unit_text
    unit = tmp_path / "smtpgate.service"
    unit.write_text(unit_text.replace("/opt/smtpgate/bin/smtpgate", str(smtpgate)))
    result = run(tool("systemd-analyze"), "verify", "--man=no", str(unit))
    # verify exits 0 on unknown keys and bad values (it logs them and ignores the line)
    return (result.stdout + result.stderr).strip() + (
        f"\nexit status {result.returncode}" if result.returncode else "")


def test_systemd_unit_verifies(tmp_path):
    text = UNIT.read_text()
    assert unit_problems(text, tmp_path) == ""
    assert "Type=exec\n" in text  # smtpgate does not speak sd_notify
    assert "ExecReload=/bin/kill -HUP $MAINPID\n" in text
    assert "EnvironmentFile=-/etc/smtpgate/smtpgate.env\n" in text


@pytest.mark.parametrize("breakage", [
    ("ProtectSystem=strict", "ProtectSystem=strickt"),
    ("NoNewPrivileges=yes", "NoNewPrivilege=yes"),
    ("Type=exec", "Type=notifyy"),
])
def test_systemd_check_fails_on_a_broken_unit(tmp_path, breakage):
    old, new = breakage
    assert unit_problems(UNIT.read_text().replace(old, new), tmp_path) != ""


def test_systemd_unit_sets_only_known_settings():
    names = {line.split("=", 2)[1] for line in UNIT.read_text().splitlines()
             if line.startswith("Environment=")}
    assert names and names <= KNOWN_ENV


# --- Kubernetes --------------------------------------------------------------------------------


def manifests() -> list[Path]:
    found = sorted(KUBERNETES.glob("*.yaml"))
    assert {p.name for p in found} >= {"deployment.yaml", "service.yaml", "configmap.yaml",
                                        "poddisruptionbudget.yaml"}
    return found


def kubernetes_problems(*paths: Path) -> str:
    result = run(tool("kubernetes-validate"), "--strict", "--quiet", *map(str, paths))
    return "" if result.returncode == 0 else result.stdout + result.stderr


def test_kubernetes_manifests_validate(tmp_path):
    assert kubernetes_problems(*manifests()) == ""
    broken = tmp_path / "deployment.yaml"
    broken.write_text((KUBERNETES / "deployment.yaml").read_text()
                      .replace("readinessProbe:", "readynessProbe:"))
    assert "readynessProbe" in kubernetes_problems(broken)


def _documents() -> dict[str, dict]:
    docs = {}
    for path in manifests():
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


def test_kubernetes_smtpgate_settings_are_known_and_load(tmp_path):
    docs = _documents()
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item.get("value", "") for item in container["env"]}
    assert not set(env) - KNOWN_ENV, f"unknown settings: {set(env) - KNOWN_ENV}"
    assert env["REDIS"].startswith("redis+sentinel://")
    assert env["SMTPGATE_PROXY_PROTOCOL"] in ("v1", "v2", "auto")
    assert env["SMTPGATE_PROXY_TRUSTED"] not in ("", "0.0.0.0/0")
    assert env["SMTPGATE_MYNETWORKS"] == ""  # behind the balancer, nobody relays unauthenticated
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert "livenessProbe" in container
    # the ConfigMap's file is one smtpgate loads, and its ports are the ones the pod exposes
    toml = tmp_path / "smtpgate.toml"
    toml.write_text(docs["ConfigMap"]["data"]["smtpgate.toml"])
    loaded = config.load({"SMTPGATE_CONFIG": str(toml), "HOSTNAME": "mx.example.com",
                          "SMTPGATE_PROXY_PROTOCOL": env["SMTPGATE_PROXY_PROTOCOL"],
                          "SMTPGATE_PROXY_TRUSTED": env["SMTPGATE_PROXY_TRUSTED"]})
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert loaded.mx_listen[0].port == ports["smtp"]
    assert loaded.submission_listen[0].port == ports["submission"]
    assert loaded.submissions_listen[0].port == ports["submissions"]
    assert loaded.metrics_listen[0].port == ports["metrics"]
    service = docs["Service"]["spec"]
    assert service["type"] == "LoadBalancer"
    assert {(p["port"], p["targetPort"]) for p in service["ports"]} == {
        (25, "smtp"), (587, "submission"), (465, "submissions")}
    assert docs["PodDisruptionBudget"]["spec"]["selector"] == docs["Deployment"]["spec"][
        "selector"]


def test_kubernetes_image_is_the_one_its_build_comment_makes():
    """The Deployment's image tag is the project's version, which the comment above it
    builds; a tag nothing builds leaves the pods in ImagePullBackOff."""
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    text = (KUBERNETES / "deployment.yaml").read_text()
    assert f"docker build -t REGISTRY/smtpgate:{version} ." in text
    images = [c["image"] for doc in yaml.safe_load_all(text) if doc
              for c in doc.get("spec", {}).get("template", {}).get("spec", {})
              .get("containers", [])]
    assert images == [f"smtpgate:{version}"]


def test_deployment_files_cite_only_what_the_repository_has():
    """A reader sent to a file the repository lacks (design.md lives outside it) is lost."""
    for path in [*KUBERNETES.iterdir(), COMPOSE, UNIT, REPO / "Dockerfile"]:
        assert "design.md" not in path.read_text(), path


def test_dockerfile_exposes_every_listener_of_the_image():
    exposed = next(line.split()[1:] for line in (REPO / "Dockerfile").read_text().splitlines()
                   if line.startswith("EXPOSE"))
    assert sorted(exposed) == ["25", "465", "587"]
