"""env_file - the gate's settings file, for the commands that are not the gate itself.

SYNOPSIS
    UNIT_ENV_FILE, UNIT_CONFIG                 the systemd unit's files
    read(path, label="--env-file") -> dict[str, str]
                                               KEY=VALUE lines; ConfigError naming the line
    gate_environment(env_file, config, environ, unit_env_file=UNIT_ENV_FILE,
                     unit_config=UNIT_CONFIG) -> GateEnvironment
    GateEnvironment(environ, origins, said)

DESCRIPTION
    `smtpgate serve` takes its settings from its environment, which the
    systemd unit fills from /etc/smtpgate/smtpgate.env (EnvironmentFile=)
    and `make run` from the file it writes. The CLI (check-config, table,
    explain) must see the same settings, or it answers for another gate:
    an empty SMTPGATE_MYNETWORKS in the file and the default in the
    caller's shell make `explain --ip 127.0.0.1` call a stranger
    trusted. gate_environment() picks the file, first found:

      env_file (--env-file FILE), then $SMTPGATE_ENV_FILE (`make run`
      prints it; an empty value reads no file), then the unit's
      /etc/smtpgate/smtpgate.env when it exists.

    The file's variables come first and the caller's environment
    overrides them one by one (`REDIS=... smtpgate table list` still
    works). SMTPGATE_CONFIG is then config (--config FILE) if given, else
    what the file or the environment say, else the unit's
    /etc/smtpgate/smtpgate.toml when the unit's env file was read and
    the TOML file exists (the unit sets it with Environment=).

    origins maps each variable taken from the file to the file's path,
    so check-config shows where a setting came from; said is one
    sentence for standard error naming what was read.

    The file's syntax is the subset of systemd's EnvironmentFile= that
    such files use: KEY=VALUE lines, blank lines and lines starting with
    # or ; ignored, an optional `export `, the value stripped and
    unquoted from matching single or double quotes (a backslash in
    double quotes escapes the next character).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from smtpgate.config import ConfigError

UNIT_ENV_FILE = "/etc/smtpgate/smtpgate.env"
UNIT_CONFIG = "/etc/smtpgate/smtpgate.toml"


@dataclass(frozen=True)
class GateEnvironment:
    environ: dict[str, str]
    origins: dict[str, str]  # variable -> the file it came from
    said: str


def read(path: str, label: str = "--env-file") -> dict[str, str]:
    """label: how the file was named, for the error (the option, or the variable)."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except PermissionError as exc:
        raise ConfigError(label, f"cannot read {path}: {exc.strerror} (the gate's settings "
                                 "file: run as root, or name one with --env-file)") from None
    except OSError as exc:
        raise ConfigError(label, f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(label, f"{path} is not UTF-8 text") from None
    found: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text[0] in "#;":
            continue
        if text.startswith("export "):
            text = text[len("export "):].lstrip()
        name, sep, value = text.partition("=")
        name = name.strip()
        if not sep or not name or not (name[0].isalpha() or name[0] == "_") \
                or not all(c.isalnum() or c == "_" for c in name):
            raise ConfigError(f"{path}:{number}", f"{line.strip()!r} is not NAME=VALUE")
        found[name] = _unquote(value.strip())
    return found


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == "'":
        return value[1:-1]
    if len(value) >= 2 and value[0] == value[-1] == '"':
        inner, out, escaped = value[1:-1], [], False
        for char in inner:
            if escaped or char != "\\":
                out.append(char)
                escaped = False
            else:
                escaped = True
        return "".join(out)
    return value


def gate_environment(env_file: str | None, config: str | None, environ: Mapping[str, str],
                     unit_env_file: str = UNIT_ENV_FILE,
                     unit_config: str = UNIT_CONFIG) -> GateEnvironment:
    path, why = _choose(env_file, environ, unit_env_file)
    label = "SMTPGATE_ENV_FILE" if why == "SMTPGATE_ENV_FILE" else "--env-file"
    from_file = read(path, label) if path else {}
    merged = {**from_file, **environ}
    origins = {name: path for name in from_file if name not in environ}
    if config:
        merged["SMTPGATE_CONFIG"] = config
        origins["SMTPGATE_CONFIG"] = "--config"
    elif path == unit_env_file and "SMTPGATE_CONFIG" not in merged \
            and os.path.isfile(unit_config):
        merged["SMTPGATE_CONFIG"] = unit_config
        origins["SMTPGATE_CONFIG"] = "the systemd unit"
    toml = merged.get("SMTPGATE_CONFIG", "").strip()
    said = (f"settings from {path} ({why}), then the environment" if path
            else f"settings from the environment only ({why})")
    if toml:
        said += f"; {toml}"
    return GateEnvironment(merged, origins, said)


def _choose(env_file: str | None, environ: Mapping[str, str],
            unit_env_file: str) -> tuple[str | None, str]:
    if env_file:
        return env_file, "--env-file"
    if "SMTPGATE_ENV_FILE" in environ:
        named = environ["SMTPGATE_ENV_FILE"].strip()
        return (named, "SMTPGATE_ENV_FILE") if named else (None, "SMTPGATE_ENV_FILE is empty")
    if os.path.exists(unit_env_file):
        return unit_env_file, "the systemd unit's"
    return None, f"no {unit_env_file}; --env-file FILE names one"
