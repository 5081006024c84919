"""replies - the replies smtpgate writes itself, in Postfix smtpd's words.

DESCRIPTION
    Clients, fail2ban filters and people read these texts, so they follow
    Postfix's smtpd.c wording and enhanced status codes. Replies that come
    from the next hop (Postfix) are passed through as they are and are not
    listed here.
"""

from smtpgate.verdict import Reply

OK = Reply(250, "2.0.0", "Ok")
MAIL_OK = Reply(250, "2.1.0", "Ok")
RCPT_OK = Reply(250, "2.1.5", "Ok")
BYE = Reply(221, "2.0.0", "Bye")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
START_TLS = Reply(220, "2.0.0", "Ready to start TLS")

NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
HELO_SYNTAX = Reply(501, "5.5.4", "Syntax: HELO hostname")
EHLO_SYNTAX = Reply(501, "5.5.4", "Syntax: EHLO hostname")
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
NO_ARGS = Reply(501, "5.5.4", "Syntax error, no parameters allowed")
UNKNOWN_COMMAND = Reply(502, "5.5.2", "Error: command not recognized")
VRFY_DISABLED = Reply(502, "5.5.1", "VRFY command is disabled")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
BAD_UTF8 = Reply(500, "5.5.2", "Error: bad UTF-8 syntax")
BAD_SYNTAX = Reply(500, "5.5.2", "Error: bad syntax")
SIZE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Error: message file too big")
INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Insufficient system storage")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
TLS_ACTIVE = Reply(554, "5.5.1", "Error: TLS already active")
MUST_STARTTLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_NOT_ENABLED = Reply(503, "5.5.1", "Error: authentication not enabled")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_ALREADY = Reply(503, "5.5.1", "Error: already authenticated")
AUTH_IN_MAIL = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Error: authentication failed: authentication failure")
AUTH_TEMPFAIL = Reply(454, "4.7.0", "Temporary authentication failure")
AUTH_MECHANISM = Reply(504, "5.5.4", "Unsupported authentication mechanism")
AUTH_CANCELLED = Reply(501, "5.7.0", "Authentication aborted")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode response")
RELAY_UNAVAILABLE = Reply(451, "4.3.0", "Error: queue file write error")
SERVICE_TEMPFAIL = Reply(421, "4.3.0", "Service temporarily unavailable; try again later")


def timeout(hostname: str) -> Reply:
    return Reply(421, "4.4.2", f"{hostname} Error: timeout exceeded")


def too_many_errors(hostname: str) -> Reply:
    return Reply(421, "4.7.0", f"{hostname} Error: too many errors")


def unsupported_option(name: str) -> Reply:
    return Reply(555, "5.5.4", f"Unsupported option: {name}")


def shutting_down(hostname: str) -> Reply:
    return Reply(421, "4.3.2", f"{hostname} Service shutting down, closing transmission channel")
