"""Moving from docker-postfix-redis: what the README tells a user to paste works when pasted,
and the image's screening and wording are carried over everywhere smtpgate is configured.

README.md marks each snippet meant for pasting with an HTML comment naming where it goes
(`<!-- pasted into main.cf by tests/test_migration.py -->` before the fence). The main.cf and
master.cf snippets go into a scratch Postfix configuration that `postfix check` and `postconf`
must accept with the values as written; the environment snippet is loaded by smtpgate.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from smtpgate import config

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
CONF = REPO / "conf" / "postfix"
DIST = Path("/usr/share/postfix")  # Debian's stock main.cf and master.cf

MARKER = re.compile(r"<!-- (?:pasted into|loaded as) (.+?) by tests/test_migration\.py -->\n"
                    r"```[a-z]*\n(.*?)```", re.S)
FENCE = re.compile(r"(<!--[^\n]*-->\n)?```[a-z]*\n(.*?)```", re.S)
# what a Postfix setting or master.cf service line looks like, commented out or not
POSTFIX_LINE = re.compile(r"^#?(?:[a-z_]+ *= |\S+ +(?:inet|unix|pass|fifo|unix-dgram) )", re.M)

# the image's postscreen_dnsbl_sites, _threshold, _action and show_user_unknown_table_name
IMAGE_SCREENING = (("ix.dnsbl.manitu.net*2", "zen.spamhaus.org*2"), 3, "drop", False)


def snippets(target: str) -> list[str]:
    found = [text for where, text in MARKER.findall(README.read_text()) if where == target]
    assert found, f"README.md has no snippet marked for {target}"
    return found


def test_every_postfix_snippet_in_the_readme_is_marked_and_so_tested():
    unmarked = [text for marker, text in FENCE.findall(README.read_text())
                if not marker and POSTFIX_LINE.search(text)]
    assert not unmarked, f"README.md snippets for Postfix that no test pastes: {unmarked}"


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def scratch(tmp_path: Path, main_cf: str = "", master_cf: str | None = None) -> Path:
    """A Postfix configuration of its own: Debian's stock files, a private queue."""
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    for sub in ("queue", "data"):
        (tmp_path / sub).mkdir()
    shutil.chown(tmp_path / "data", "postfix", "postfix")
    (config_dir / "main.cf").write_text(
        f"compatibility_level = 3.6\nqueue_directory = {tmp_path / 'queue'}\n"
        f"data_directory = {tmp_path / 'data'}\n" + main_cf)
    (config_dir / "master.cf").write_text(
        master_cf if master_cf is not None else (DIST / "master.cf.dist").read_text())
    return config_dir


def complaints(config_dir: Path) -> str:
    """What `postfix check` and `postconf -n` say about it ('' when nothing)."""
    said = ""
    for argv in (["postfix", "-c", str(config_dir), "check"],
                 ["postconf", "-c", str(config_dir), "-n"]):
        result = run(*argv)
        if result.returncode or result.stderr.strip():
            said += f"{' '.join(argv[:1] + argv[3:])}: {result.stderr.strip()}\n"
    return said


def settings_of(snippet: str) -> dict[str, str]:
    lines = [line for line in snippet.splitlines() if line.strip() and not line.startswith("#")]
    return dict((k.strip(), v.strip()) for k, v in (line.split("=", 1) for line in lines))


def test_the_main_cf_snippet_pasted_into_main_cf(tmp_path):
    [snippet] = snippets("main.cf")
    config_dir = scratch(tmp_path, snippet)
    assert complaints(config_dir) == ""
    for key, value in settings_of(snippet).items():
        shown = run("postconf", "-c", str(config_dir), "-h", key).stdout.strip()
        assert shown == value, f"{key}: Postfix reads {shown!r}, the README means {value!r}"
    assert settings_of(snippet)["inet_protocols"] == "all"


def test_a_trailing_comment_in_main_cf_is_caught(tmp_path):
    """The check above can fail: the README's old lines, with comments after the values."""
    config_dir = scratch(tmp_path, "inet_protocols = all    # XCLIENT may name an IPv6 client\n")
    assert 'unknown inet_protocols value "#"' in complaints(config_dir)


def test_the_master_cf_snippet_and_fragments_pasted_into_master_cf(tmp_path):
    """The image's master.cf with the README's edit: its public services commented out (the
    snippet), next-hop.cf and submission.cf appended; nothing listens but on loopback."""
    [snippet] = snippets("master.cf")
    commented = {line[1:].split()[0] for line in snippet.splitlines()
                 if re.match(r"#\w+\s+\w+\s", line)}
    assert commented >= {"smtp", "smtpd", "dnsblog", "tlsproxy", "submission"}
    kept, skipping = [], False
    for line in (DIST / "master.cf.dist").read_text().splitlines():
        if line and not line[0].isspace():
            skipping = not line.startswith("#") and line.split()[0] in commented
        if not skipping:
            kept.append(line)
    master = "\n".join([*kept, snippet, (CONF / "next-hop.cf").read_text(),
                        (CONF / "submission.cf").read_text()])
    config_dir = scratch(tmp_path, master_cf=master)
    shutil.copy(CONF / "submission_header_cleanup", config_dir)
    assert complaints(config_dir) == ""
    services = run("postconf", "-c", str(config_dir), "-M").stdout.splitlines()
    inet = sorted(line.split()[0] for line in services if line.split()[1] == "inet")
    assert inet == ["127.0.0.1:10025", "127.0.0.1:10587"]


# --- the image's screening and wording, carried over ---------------------------------------------


def screening(loaded: config.Config) -> tuple:
    return (loaded.dnsbl_sites, loaded.dnsbl_threshold, loaded.dnsbl_action,
            loaded.show_user_unknown_table_name)


def env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile reads them (quotes removed)."""
    pairs = [shlex.split(line)[0].split("=", 1) for line in text.splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    return dict(pairs)


def from_readme() -> config.Config:
    [snippet] = snippets("smtpgate's environment")
    return config.load({"HOSTNAME": "mx.example.com", **env_file(snippet)})


def from_compose() -> config.Config:
    env = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]["smtpgate"][
        "environment"]
    return config.load({k: str(v) for k, v in env.items()
                        if k not in ("SMTPGATE_CONFIG", "LETSENCRYPT")})


def from_configmap(tmp_path: Path) -> config.Config:
    docs = yaml.safe_load_all((REPO / "deploy" / "kubernetes" / "configmap.yaml").read_text())
    [toml] = [doc["data"]["smtpgate.toml"] for doc in docs if doc["kind"] == "ConfigMap"]
    path = tmp_path / "smtpgate.toml"
    path.write_text(toml)
    return config.load({"SMTPGATE_CONFIG": str(path), "HOSTNAME": "mx.example.com"})


def from_unit() -> config.Config:
    text = (REPO / "conf" / "systemd" / "smtpgate.service").read_text()
    lines = [line.lstrip("#").strip() for line in text.splitlines()
             if re.match(r"#\s+SMTPGATE_\w+=", line)]
    return config.load({"HOSTNAME": "mx.example.com", **env_file("\n".join(lines))})


@pytest.mark.parametrize("where", ["readme", "compose", "configmap", "unit"])
def test_the_images_screening_is_carried_over(where, tmp_path):
    loaded = {"readme": from_readme, "compose": from_compose, "unit": from_unit,
              "configmap": lambda: from_configmap(tmp_path)}[where]()
    assert screening(loaded) == IMAGE_SCREENING
    assert screening(config.load({"HOSTNAME": "mx.example.com"})) != IMAGE_SCREENING  # defaults
