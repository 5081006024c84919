"""closing - the signal that ends a session once its queued replies are written.

SYNOPSIS
    raise Closing

DESCRIPTION
    Raised by the session (smtpgate.smtp.session) and the parts it drives
    (smtpgate.smtp.intake, smtpgate.smtp.auth_exchange) when the client's
    last reply is queued: QUIT, a 421, a hang-up, a client gone mid-DATA.
    The session catches it, flushes what is queued and closes; it is not
    an error and leaves no log line of its own.
"""

from __future__ import annotations


class Closing(Exception):
    """The session ends after the queued replies are written."""
