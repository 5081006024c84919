"""The Postfix-style log line: its stamp made once a second, its prefix once per logger."""

import logging
import os
import time

from smtpgate.cli.main import JsonFormatter, LeanRecord, PostfixStyleFormatter


def record(name: str, created: float, message: str, *args) -> logging.LogRecord:
    entry = logging.LogRecord(name, logging.INFO, "", 0, message, args, None)
    entry.created, entry.process = created, 4242
    return entry


def stamp(seconds: float) -> str:
    return time.strftime("%b %d %H:%M:%S", time.localtime(seconds))


def test_lines_as_postfix_writes_them_across_seconds_and_loggers():
    formatter = PostfixStyleFormatter()
    t = 1764633600.25
    lines = [formatter.format(record("smtpgate.smtpd", t, "connect from %s", "x[192.0.2.1]")),
             formatter.format(record("smtpgate.smtpd", t + 0.8, "disconnect from %s", "x")),
             formatter.format(record("smtpgate.policy", t + 0.9, "PASS NEW [192.0.2.1]:25")),
             formatter.format(record("smtpgate", t + 1.0, "ready"))]
    assert lines == [f"{stamp(t)} smtpgate/smtpd[4242]: connect from x[192.0.2.1]",
                     f"{stamp(t + 1)} smtpgate/smtpd[4242]: disconnect from x",
                     f"{stamp(t + 1)} smtpgate/policy[4242]: PASS NEW [192.0.2.1]:25",
                     f"{stamp(t + 1)} smtpgate/smtpgate[4242]: ready"]
    assert stamp(t) != stamp(t + 1)


def test_a_lean_record_formats_as_the_standard_one():
    """setup_logging's record factory leaves out what no formatter here reads; what they
    read must come out the same, the arguments by name included."""
    lean = LeanRecord("smtpgate.smtpd", logging.INFO, "", 0, "to %(who)s", ({"who": "x"},),
                      None)
    full = logging.LogRecord("smtpgate.smtpd", logging.INFO, "", 0, "to %(who)s",
                             ({"who": "x"},), None)
    lean.created = full.created
    assert lean.process == full.process == os.getpid()
    for formatter in (PostfixStyleFormatter(), JsonFormatter()):
        assert formatter.format(lean) == formatter.format(full)
    assert (lean.levelname, lean.getMessage()) == ("INFO", "to x")
