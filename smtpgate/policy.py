"""policy - the checks of each stage, in order, with their facts fetched and their actions applied.

(being built; see the stage methods)
"""

from __future__ import annotations

from smtpgate.config import Config
from smtpgate.verdict import Reply


class Policy:
    def __init__(self, config: Config) -> None:
        self.config = config

    @classmethod
    async def create(cls, config: Config) -> Policy:
        return cls(config)

    async def connect(self, session, banner: str) -> Reply | None:
        return None

    async def helo(self, session) -> Reply | None:
        return None

    async def mail(self, session, sender: str) -> Reply | None:
        return None

    async def rcpt(self, session, path) -> Reply | None:
        return None

    async def data(self, session) -> Reply | None:
        return None

    async def protocol_violation(self, session, test: str, verb: str) -> None:
        return None

    async def auth_allowed(self, session, login: str | None) -> Reply | None:
        return None

    async def authenticate(self, session, mechanism: str, plain: bytes, login: str) -> Reply:
        raise NotImplementedError

    async def session_closed(self, session) -> None:
        return None

    async def close(self) -> None:
        return None
