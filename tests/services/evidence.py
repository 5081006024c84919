"""evidence - what `smtpgate explain --session` says, once the session's record is in Redis

SYNOPSIS
    explained(cli, redis_url, session, timeout=10) -> str        explain's output

DESCRIPTION
    A refused session's evidence record reaches Redis in a batch a moment
    after the refusal (smtpgate.lookups.evidence: BATCH), so a test that
    has seen the refusal's log line may still be ahead of the record.
    explained() asks until explain finds it (exit status 0), with a
    deadline; the last answer is quoted if it never does.
"""

from __future__ import annotations

from collections.abc import Callable

from services.waiting import wait_until


def explained(cli: Callable[..., tuple[int, str, str]], redis_url: str, session: str,
              timeout: float = 10.0) -> str:
    def found() -> str:
        status, out, err = cli(redis_url, "explain", "--session", session)
        assert status == 0, f"explain exited with {status}: {err}{out}"
        return out

    return wait_until(found, timeout, f"session {session}'s evidence record")
