"""health - the HTTP endpoint for load balancers and Prometheus: /healthz and /metrics.

SYNOPSIS
    await start_health(gate, host, port) -> asyncio.Server
    health_report(gate) -> (status_code, dict)
    up(gate, check=True) -> (redis_ok, next_hop_ok, next_hop_detail)

DESCRIPTION
    /healthz answers 200 when this worker can do its job (Redis answered
    its last round trip, and the next hop's last connection attempt
    succeeded) and 503 otherwise, with a JSON body naming what is wrong.
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


def up(gate: Any, check: bool = True) -> tuple[bool, bool | None, str]:
    """Whether Redis and the next hop worked at their last use (None: not tried yet).

    check: have the pool drop the connections Postfix closed and open new ones first, as a
    request to this endpoint does; without it nothing is touched.
    """
    redis_ok = gate.policy.tables.health.ok is not False and gate.policy.redis_ok
    pool = gate.hop_pool
    if pool is None:
        return redis_ok, None, ""
    hop_ok, hop_detail = pool.check() if check else (pool.ok, pool.detail)
    return redis_ok, hop_ok, hop_detail


def health_report(gate: Any) -> tuple[int, dict]:
    tables = gate.policy.tables
    redis_ok, hop_ok, hop_detail = up(gate)
    body = {
        "status": "ok" if redis_ok and hop_ok is not False and not gate.draining
        else "unavailable",
        "redis": {"ok": redis_ok, "detail": tables.health.detail,
                  "cache_ready": tables.health.cache_ready},
        "next_hop": {"ok": hop_ok, "address": str(gate.config.next_hop), "detail": hop_detail},
        "draining": gate.draining,
        "sessions": len(gate.sessions),
        "dnsbl_unhealthy": sorted(gate.policy.querier.unhealthy),
        "pid": os.getpid(),
    }
    return (200 if body["status"] == "ok" else 503), body


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
