"""flow_control - a transport's pause_writing()/resume_writing() as one thing to wait on.

SYNOPSIS
    WriteFlow()
    flow.pause() ; flow.resume()        from asyncio.Protocol.pause_writing / resume_writing
                                        (and connection_lost: nothing more will drain)
    flow.paused -> bool
    await flow.drained(timeout)         TimeoutError when the peer reads nothing meanwhile

DESCRIPTION
    asyncio tells a protocol that its transport's buffer passed the high
    mark (pause_writing) and fell below the low one (resume_writing); a
    writer that does not wait in between makes the process hold whatever
    the peer does not read. Both of smtpgate's wires, the client's
    (smtpgate.smtp.wire) and the next hop's (smtpgate.relay.next_hop),
    wait the same way: one future per paused period, created at pause,
    resolved at resume or when the connection is lost, awaited through a
    shield so a timed-out wait leaves it for the next one.
"""

from __future__ import annotations

import asyncio


class WriteFlow:
    __slots__ = ("_drained",)

    def __init__(self) -> None:
        self._drained: asyncio.Future | None = None

    def pause(self) -> None:
        if self._drained is None or self._drained.done():
            self._drained = asyncio.get_running_loop().create_future()

    def resume(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    @property
    def paused(self) -> bool:
        return self._drained is not None and not self._drained.done()

    async def drained(self, timeout: float) -> None:
        if self.paused:
            await asyncio.wait_for(asyncio.shield(self._drained), timeout)
