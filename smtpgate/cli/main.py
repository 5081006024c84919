"""main - the `smtpgate` command: serve, check-config, table, explain, allow, deny, overrides,
shadow, replay.

SYNOPSIS
    main(argv: list[str] | None = None) -> int

DESCRIPTION
    Every command reads the effective configuration first (smtpgate.config);
    a bad setting ends the command with exit status 1 and one line naming
    the setting and what is wrong with it, never a traceback.

    `serve` takes its settings from its environment. The other commands
    read the gate's settings file too (smtpgate.env_file: --env-file FILE,
    $SMTPGATE_ENV_FILE, or the systemd unit's /etc/smtpgate/smtpgate.env),
    and --config FILE names the TOML file; they say on standard error
    which files they read, so that an answer is not taken for another
    gate's.
"""

from __future__ import annotations

import argparse
import asyncio
import collections.abc
import datetime
import json
import logging
import os
import sys
import time

from smtpgate import __version__, session_id
from smtpgate.cli import overrides as overrides_cli
from smtpgate.config import ConfigError, load


class PostfixStyleFormatter(logging.Formatter):
    """`Nov 25 15:00:01 smtpgate/smtpd[123]: connect from ...`, as Postfix writes its log.

    The stamp has a resolution of one second, so it is made once per second, and the
    prefix once per logger: a busy worker writes several lines per session.
    """

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""
        self._prefixes: dict[tuple[str, int | None], str] = {}

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%b %d %H:%M:%S", time.localtime(second))
        key = (record.name, record.process)
        prefix = self._prefixes.get(key)
        if prefix is None:
            component = record.name.rsplit(".", 1)[-1]
            prefix = self._prefixes[key] = f" smtpgate/{component}[{record.process}]: "
        return f"{self._stamp}{prefix}{record.getMessage()}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line (log_format = "json"), for log shippers: time (ISO 8601,
    local time with its offset), level, component, pid, session (when the line was logged
    on a session's behalf) and message, the same text as the Postfix-style line's."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created).astimezone().isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "component": record.name.rsplit(".", 1)[-1],
            "pid": record.process,
        }
        current = session_id.current.get()
        if current is not None:
            entry["session"] = current
        entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class BatchedHandler(logging.StreamHandler):
    """Log lines written in batches: one write per 20 ms, not one per line.

    At a few hundred sessions a second, three log lines per session were three write
    syscalls each; batched they cost one per batch. A warning or worse is written at once,
    and so is everything logged outside the event loop (start, stop, the supervisor).
    """

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._pending.append(self.format(record) + "\n")
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING or len(self._pending) >= 256:
            self._write()
            return
        if not self._scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._write()
                return
            self._scheduled = True
            loop.call_later(0.02, self.flush)

    def flush(self) -> None:
        with self.lock:
            self._write()

    def _write(self) -> None:
        self._scheduled = False
        if self._pending:
            data = "".join(self._pending)
            self._pending.clear()
            try:
                self.stream.write(data)
                self.stream.flush()
            except (OSError, ValueError):
                pass  # stderr gone: nothing left to tell


class LeanRecord(logging.LogRecord):
    """A LogRecord made without what setup_logging() turned off (threads, the process's
    name) and without taking the path of a source file apart that is never known here
    (logging._srcfile is None): half the cost of a record, and a session logs several."""

    def __init__(self, name, level, pathname, lineno, msg, args, exc_info, func=None,
                 sinfo=None, **kwargs) -> None:
        created = time.time()
        if args and len(args) == 1 and isinstance(args[0], collections.abc.Mapping) and args[0]:
            args = args[0]  # logging's own rule: a lone mapping is the arguments by name
        # the attributes in one update (a record's own, in its __dict__, as logging's are:
        # a %(...)s format reads them there), the constant ones from one dict
        self.__dict__.update(_RECORD_CONSTANTS, name=name, msg=msg, args=args,
                             levelname=logging.getLevelName(level), levelno=level,
                             pathname=pathname, filename=pathname, exc_info=exc_info,
                             stack_info=sinfo, lineno=lineno, funcName=func, created=created,
                             msecs=int((created - int(created)) * 1000) + 0.0,
                             relativeCreated=(created - logging._startTime) * 1000,
                             process=_pid[0])


_RECORD_CONSTANTS = {"module": "Unknown module", "exc_text": None, "thread": None,
                     "threadName": None, "processName": None}
_pid = [os.getpid()]  # a worker forked from the supervisor learns its own below
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))


def setup_logging(level: str = "INFO", log_format: str = "postfix") -> None:
    # What no formatter here reads, the logging module need not find out for every line:
    # the caller's file and line (a walk up the stack), the thread, the multiprocessing
    # process name. About half the cost of a line (the logging HOWTO's "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.setLogRecordFactory(LeanRecord)
    handler = BatchedHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else PostfixStyleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="smtpgate", description=__doc__.split("\n")[0])
    top.add_argument("--version", action="version", version=f"smtpgate {__version__}")
    files = argparse.ArgumentParser(add_help=False)
    files.add_argument("--env-file", metavar="FILE",
                       help="the gate's KEY=VALUE settings file (default: $SMTPGATE_ENV_FILE, "
                            "else /etc/smtpgate/smtpgate.env when it exists)")
    files.add_argument("--config", metavar="FILE", help="the gate's TOML file (SMTPGATE_CONFIG)")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("serve", help="run the listeners until SIGTERM")
    check = sub.add_parser("check-config", parents=[files],
                           help="print the effective configuration")
    check.add_argument("--live", action="store_true",
                       help="also probe Redis and the next hop (XCLIENT, IPv6, extensions)")
    table = sub.add_parser("table", parents=[files],
                           help="get, set, delete or list Redis table keys")
    table.add_argument("args", nargs=argparse.REMAINDER,
                       help="get|set|del|list PREFIX [KEY [VALUE]]")
    explain = sub.add_parser(
        "explain", parents=[files],
        help="run the policy as a dry run for a client (--ip), or show a past session's "
             "evidence (--session)")
    explain.add_argument("--ip", help="the client's address, for a dry run")
    explain.add_argument("--session", help="the id that ended a refusal (session=ID)")
    explain.add_argument("--helo")
    explain.add_argument("--from", dest="sender")
    explain.add_argument("--rcpt", action="append", default=[])
    overrides_cli.add_commands(sub, [files])
    from smtpgate.cli import replay, shadow

    shadow.add_parser(sub, [files])
    replay.add_parser(sub)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "serve":
            config = load()
        else:
            from smtpgate.env_file import gate_environment

            gate = gate_environment(args.env_file, args.config, os.environ)
            print(f"smtpgate: {gate.said}", file=sys.stderr)
            config = load(gate.environ, gate.origins)
    except ConfigError as exc:
        print(f"smtpgate: {exc}", file=sys.stderr)
        return 1
    if args.command == "check-config":
        return check_config(config, args.live)
    if config.timezone:  # the image's TIMEZONE: log time stamps in local time there
        os.environ["TZ"] = config.timezone
        time.tzset()
    if args.command == "serve":
        setup_logging(log_format=config.log_format)
        from smtpgate.service.server import serve
        from smtpgate.smtp.tls import TlsError

        try:
            return serve(config)
        except (TlsError, OSError) as exc:
            print(f"smtpgate: fatal: {exc}", file=sys.stderr)
            return 1
    if args.command == "table":
        from smtpgate.cli.table import run

        return run(args.args, config)
    if args.command == "explain":
        from smtpgate.cli.explain import run as explain

        return explain(args, config)
    if args.command in overrides_cli.COMMANDS:
        return overrides_cli.run(args, config)
    if args.command == "shadow":
        from smtpgate.cli.shadow import run as shadow

        return shadow(args, config)
    if args.command == "replay":
        from smtpgate.cli.replay import run as replay

        return replay(args, config)
    return 2


def check_config(config, live: bool = False) -> int:
    from smtpgate.cli.check import run_checks

    rows = config.describe()
    width = max(len(name) for name, _, _ in rows)
    for name, value, source in rows:
        print(f"{name:<{width}} = {value}" + (f"    # {source}" if source != "default" else ""))
    return run_checks(config, live)
