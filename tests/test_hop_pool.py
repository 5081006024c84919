"""The pool of Postfix connections greeted ahead of need, against the real Postfix."""

from __future__ import annotations

import asyncio

import pytest

from smtpgate.config import HostPort
from smtpgate.relay import ClientIdentity, HopPool, NextHop

IDENTITY = ClientIdentity(addr="127.0.0.77", port=4000, name="host77.clients.example.test",
                          helo="client.example.test", proto="ESMTP")


async def filled(pool: HopPool, count: int, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while len(pool._idle) < count:
            await asyncio.sleep(0.02)


@pytest.mark.slow
async def test_pool_hands_out_greeted_connections_and_survives_a_postfix_restart(postfix_server):
    pool = HopPool(HostPort("127.0.0.1", postfix_server.port), 10, "mx.example.test", size=2)
    try:
        assert await pool.take() is None  # empty at first; taking starts the filling
        await filled(pool, 2)
        hop = await NextHop.open(pool.hop, IDENTITY, 10, "mx.example.test", pool)
        mail, rcpt = await hop.commands([b"MAIL FROM:<a@example.net>\r\n",
                                         b"RCPT TO:<user1@example.com>\r\n"])
        assert (mail.code, rcpt.code) == (250, 250)
        await hop.quit()
        await filled(pool, 2)
        # a Postfix restart kills the idle connections; open() must notice and start afresh
        await asyncio.to_thread(postfix_server.stop)
        await asyncio.to_thread(postfix_server.start)
        hop = await NextHop.open(pool.hop, IDENTITY, 10, "mx.example.test", pool)
        assert (await hop.command(b"MAIL FROM:<a@example.net>\r\n")).code == 250
        await hop.quit()
    finally:
        pool.close()
