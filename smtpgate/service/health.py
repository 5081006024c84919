"""health - the HTTP endpoint for load balancers and Prometheus: /healthz and /metrics.

SYNOPSIS
    await start_health(gate, host, port) -> asyncio.Server
    health_report(gate) -> (status_code, dict)
    up(gate, check=True) -> (redis_ok, next_hop_ok, mx_hops, submission_hops)

DESCRIPTION
    /healthz answers 200 when this worker can do its job (Redis answered
    its last round trip, and the last connection attempt to at least one
    next hop succeeded) and 503 otherwise, with a JSON body naming what is
    wrong; `next_hops` lists each hop (ok, detail, retry_in seconds),
    `submission_next_hops` those authenticated mail goes to. Either group with
    no hop that takes mail makes it 503.
    Each check also has the connection pool replace connections Postfix
    closed, so a Postfix that stopped or came back shows within a check or
    two, even with no mail flowing. With several workers the port is
    shared (SO_REUSEPORT) and each request is answered by one of them:
    /healthz speaks for that worker.

    /metrics is the Prometheus text of all the workers together, the same
    whichever worker answers: counters summed over the workers (those that
    died included), gauges summed or the worst taken, no pid label
    (smtpgate.service.metrics, which lists the metrics).

    Only GET of those two paths is served; anything else is 404 or 405, and
    a request that does not arrive within 5 s is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from typing import Any

MAX_REQUEST = 8192
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def up(gate: Any, check: bool = True) -> tuple[bool, bool | None, list, list]:
    """Whether Redis and the next hops worked at their last use (None: not tried yet), and
    each hop's health (smtpgate.relay.hops.HopHealth): the MX hops, then the submission
    ones (empty without a submission listener). The next hops are not ok when either
    group has no hop that takes mail.

    check: have the pools drop the connections Postfix closed and open new ones first, as a
    request to this endpoint does; without it nothing is touched.
    """
    redis_ok = gate.policy.tables.health.ok is not False and gate.policy.redis_ok
    hops = gate.hops.check() if check else gate.hops.status()
    submission = gate.submission_hops.status() if gate.submission_hops is not None else []
    groups = [next_hop_ok([hop.ok for hop in group]) for group in (hops, submission) if group]
    hop_ok = False if False in groups else True if True in groups else None
    return redis_ok, hop_ok, hops, submission


def health_report(gate: Any) -> tuple[int, dict]:
    tables = gate.policy.tables
    redis_ok, hop_ok, hops, submission = up(gate)
    every = hops + submission
    body = {
        "status": "ok" if redis_ok and hop_ok is not False and not gate.draining
        else "unavailable",
        "redis": {"ok": redis_ok, "detail": tables.health.detail,
                  "cache_ready": tables.health.cache_ready},
        "next_hop": {"ok": hop_ok, "address": gate.hops.label,
                     "detail": "; ".join(f"{h.address}: {h.detail}" for h in every if h.detail)},
        "next_hops": [_hop(h) for h in hops],
        "submission_next_hops": [_hop(h) for h in submission],
        "draining": gate.draining,
        "sessions": len(gate.sessions),
        "dnsbl_unhealthy": sorted(gate.policy.querier.unhealthy),
        "pid": os.getpid(),
    }
    return (200 if body["status"] == "ok" else 503), body


def _hop(hop: Any) -> dict:
    return {"address": str(hop.address), "ok": hop.ok, "detail": hop.detail,
            "retry_in": round(hop.retry_in, 1)}


def next_hop_ok(each: list[bool | None]) -> bool | None:
    """One hop that takes mail is enough: a message that finds its hop down moves to another
    in the same transaction, so a balancer that took this gate out of service would only lose
    capacity. False (503) when every hop's last attempt failed; None when none was tried."""
    if all(ok is False for ok in each):
        return False
    return True if any(ok for ok in each) else None


def _response(code: int, content_type: str, body: str | bytes) -> bytes:
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 400: "Bad Request",
              503: "Service Unavailable"}[code]
    data = body.encode() if isinstance(body, str) else body
    return (f"HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data


async def _handle(gate: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
            ConnectionError):
        writer.close()
        return
    method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
    path = rest.split(" ", 1)[0]
    if method != "GET":
        reply = _response(405, "text/plain", "only GET\n")
    elif path == "/healthz":
        code, body = health_report(gate)
        reply = _response(code, "application/json", json.dumps(body) + "\n")
    elif path == "/metrics":
        reply = _response(200, METRICS_CONTENT_TYPE, gate.metrics.exposition(gate))
    else:
        reply = _response(404, "text/plain", "not found\n")
    writer.write(reply)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    writer.close()


async def start_health(gate: Any, host: str, port: int) -> asyncio.Server:
    return await asyncio.start_server(lambda r, w: _handle(gate, r, w), host, port,
                                      reuse_port=True, limit=MAX_REQUEST)
