"""The engine's connection object over real loopback sockets: deadlines and waits."""

from __future__ import annotations

import asyncio

from smtpgate.smtp import wire as wire_module
from smtpgate.smtp.wire import Wire, WireTimeout


async def served(script):
    """Run `script(wire)` as the server side of one loopback connection; return the client."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    async def run(w: Wire) -> None:
        try:
            done.set_result(await script(w))
        except Exception as exc:
            done.set_exception(exc)
        finally:
            w.close()

    server = await loop.create_server(lambda: Wire(lambda w: loop.create_task(run(w))),
                                      "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return server, reader, writer, done


async def test_the_proxy_header_deadline_does_not_end_the_greet_wait(monkeypatch):
    monkeypatch.setattr(wire_module, "HEADER_TIMEOUT", 0.1)
    waited = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def script(w: Wire):
        await w.readuntil(b"\r\n")
        started = loop.time()
        early, _ = await w.greet_wait(b"220-x\r\n", 0.3, None)  # outlives the header's 0.1 s
        took = loop.time() - started
        waited.set()
        line = await w.line(5.0, 512)  # the old deadline must not answer for this wait
        return early, took, line

    server, reader, writer, done = await served(script)
    writer.write(b"PROXY TCP4 127.0.0.9 127.0.0.1 4000 25\r\n")
    assert await reader.readline() == b"220-x\r\n"
    await asyncio.wait_for(waited.wait(), 5)
    writer.write(b"EHLO x\r\n")
    early, took, line = await asyncio.wait_for(done, 5)
    assert (early, line) == (b"", b"EHLO x\r\n")
    assert took >= 0.3  # the whole greet wait, not cut at the header's deadline
    writer.close()
    server.close()


async def test_a_silent_client_times_out_once_per_wait():
    timed_out = asyncio.Event()

    async def script(w: Wire):
        try:
            await w.line(0.2, 512)
        except WireTimeout:
            timed_out.set()
        else:
            raise AssertionError("no timeout")
        return await w.line(5.0, 512)  # a new wait, a new deadline

    server, _reader, writer, done = await served(script)
    await asyncio.wait_for(timed_out.wait(), 5)
    writer.write(b"NOOP\r\n")
    assert await asyncio.wait_for(done, 5) == b"NOOP\r\n"
    writer.close()
    server.close()


async def _greet_with_hold(answer, client_says: bytes = b"", seconds: float = 0.3):
    """One greet wait whose teaser is held for a DNSBL outcome; `answer(hold, decided)`
    settles them (or not). Returns what the wait returned, how long it took, and every
    byte the client got."""
    loop = asyncio.get_running_loop()

    async def script(w: Wire):
        hold, decided = loop.create_future(), loop.create_future()
        if answer is _listed_already:  # from the DNSBL cache: known before the wait
            hold.set_result("listed")
            hold.add_done_callback(lambda _: decided.set_result(True))
        else:
            loop.call_later(0.05, answer, hold, decided)
        started = loop.time()
        early, delay = await w.greet_wait(b"220-x\r\n", seconds, decided, hold)
        took = loop.time() - started
        w.write_now(b"END\r\n")
        return early, delay, took

    server, reader, writer, done = await served(script)
    if client_says:
        writer.write(client_says)
    early, delay, took = await asyncio.wait_for(done, 5)
    heard = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    server.close()
    return early, delay, took, heard


def _listed(hold, decided):
    hold.set_result("listed")
    decided.set_result(True)


def _listed_already(hold, decided):
    pass


async def test_a_client_dropped_before_the_teaser_hears_only_its_refusal():
    for answer in (_listed, _listed_already):
        early, delay, took, heard = await _greet_with_hold(answer)
        assert (early, delay, heard) == (b"", 0.0, b"END\r\n")  # no teaser
        assert took < 0.25


async def test_an_answer_without_a_verdict_sends_the_teaser_and_the_wait_goes_on():
    early, delay, took, heard = await _greet_with_hold(
        lambda hold, decided: hold.set_result("not listed"))
    assert (early, delay, heard) == (b"", 0.0, b"220-x\r\nEND\r\n")
    assert took >= 0.3  # counted from the connect, not from the teaser


async def test_a_dnsbl_that_does_not_answer_holds_the_teaser_a_moment_only(monkeypatch):
    monkeypatch.setattr(wire_module, "TEASER_HOLD", 0.1)
    early, _, took, heard = await _greet_with_hold(lambda hold, decided: None,
                                                       seconds=0.5)
    assert (early, heard) == (b"", b"220-x\r\nEND\r\n")
    assert took >= 0.5


async def test_a_client_talking_before_the_held_teaser_is_a_pregreet():
    early, delay, took, heard = await _greet_with_hold(lambda hold, decided: None,
                                                       client_says=b"EHLO eager\r\n")
    assert (early, delay) == (b"EHLO eager\r\n", 0.0)
    assert heard == b"220-x\r\nEND\r\n" and took < 0.25
