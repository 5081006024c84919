"""handshake_limit - how many implicit-TLS (465) handshakes one worker runs at once, per client.

SYNOPSIS
    HandshakeLimit(per_client, per_worker)          0: no bound
    limit.enter(ip) -> str | None       None: go ahead; else "client" or "worker", refused
    limit.leave(ip)
    limit.in_progress ; limit.refused[reason]

DESCRIPTION
    On 465 the TLS handshake comes before any SMTP, so a handshake in
    progress is a connection that no session counts yet: it costs a
    socket, OpenSSL's state and CPU for up to 30 s, and one client could
    open thousands. So the handshakes in progress are counted, per client
    address and per worker, and one over either bound is refused.

    No SMTP reply is possible before TLS (a 421 would be read as a bad
    handshake), so a refused connection is closed, as Postfix's smtpd
    closes a wrapper-mode connection over smtpd_client_new_tls_session_
    rate_limit ("warning: Refusing TLS service request from ... for
    service ..."), and counted (refused, for the metrics). A handshake that
    ends, well or not, leaves; a client's entry goes with its last one, so
    the table holds only addresses with handshakes in progress.
"""

from __future__ import annotations


class HandshakeLimit:
    __slots__ = ("by_client", "in_progress", "per_client", "per_worker", "refused")

    def __init__(self, per_client: int, per_worker: int) -> None:
        self.per_client = per_client
        self.per_worker = per_worker
        self.in_progress = 0
        self.by_client: dict[str, int] = {}
        # "rate": closed by the new TLS session rate limit (smtp.implicit_tls counts it)
        self.refused = {"client": 0, "worker": 0, "rate": 0}

    def enter(self, ip: str) -> str | None:
        if self.per_worker and self.in_progress >= self.per_worker:
            self.refused["worker"] += 1
            return "worker"
        held = self.by_client.get(ip, 0)
        if self.per_client and held >= self.per_client:
            self.refused["client"] += 1
            return "client"
        self.by_client[ip] = held + 1
        self.in_progress += 1
        return None

    def leave(self, ip: str) -> None:
        held = self.by_client.pop(ip, 0) - 1
        if held > 0:
            self.by_client[ip] = held
        self.in_progress -= 1
