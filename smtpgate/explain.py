"""explain - run the whole MX policy for one imagined client and print every check.

SYNOPSIS
    run(args, config) -> int        `smtpgate explain --ip IP [--helo NAME] [--from ADDR]
                                                      [--rcpt ADDR]...`

DESCRIPTION
    A dry run against the live Redis tables and DNS: the same Policy the
    server uses, stage by stage (connect, HELO, MAIL, each RCPT), with no
    greet wait (there is no client to wait for) and nothing sent to
    Postfix. Each verdict is printed with its evidence (which key, which
    zone and answer), then the reply the client would get at that stage.
    Exit status 0 when every recipient would be passed on to Postfix, 1
    when something would be refused, 2 for bad arguments.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import sys
from dataclasses import dataclass, field
from typing import Any

from smtpgate.address import AddressError, parse_path
from smtpgate.config import Config
from smtpgate.verdict import Reply, Verdict


@dataclass
class DryRunSession:
    """The few session facts the policy reads, for a client that is not there."""

    gate: Any
    client_ip: str
    helo: str | None = None
    client_port: int = 0
    local_ip: str = "0.0.0.0"
    listener: str = "mx"
    client_name: str = "unknown"
    esmtp: bool = True
    tls: bool = False
    login: str | None = None
    last_command: str = ""
    screening: Any = None
    sender_reject: Reply | None = None
    mail_params: dict = field(default_factory=dict)
    record: list[Verdict] = field(default_factory=list)

    @property
    def client_label(self) -> str:
        return f"{self.client_name}[{self.client_ip}]"


def run(args: Any, config: Config) -> int:
    try:
        ipaddress.ip_address(args.ip)
    except ValueError:
        print(f"smtpgate explain: --ip {args.ip!r} is not an IP address", file=sys.stderr)
        return 2
    return asyncio.run(_explain(args, dataclasses.replace(config, greet_wait=0.0)))


async def _explain(args: Any, config: Config) -> int:
    from smtpgate.policy import Policy

    policy = await Policy.create(config)
    session = DryRunSession(gate=None, client_ip=args.ip, helo=args.helo)
    refused = False
    try:
        stages: list[tuple[str, Any]] = [("connect", lambda: policy.connect(session, "220 x"))]
        if args.helo:
            stages.append((f"HELO {args.helo}", lambda: policy.helo(session)))
        sender = None
        if args.sender is not None:
            try:
                sender = parse_path(f"<{args.sender}>", smtputf8=True, mail=True)
            except AddressError as exc:
                print(f"MAIL FROM:<{args.sender}>\n  reply: {exc.reply}")
                return 1
            stages.append((f"MAIL FROM:<{args.sender}>", lambda: policy.mail(session, sender)))
        for rcpt in args.rcpt:
            stages.append((f"RCPT TO:<{rcpt}>", _rcpt_stage(policy, session, rcpt)))
        for title, stage in stages:
            seen = len(session.record)
            reply = await stage()
            print(title)
            for verdict in session.record[seen:]:
                print(f"  {verdict.check:<16} {verdict.outcome:<7} {verdict.reason}")
            if reply is not None:
                print(f"  reply: {reply}")
                refused = True
                if reply.code == 421 or reply.code == 521:
                    break
            elif title.startswith("RCPT"):
                print("  reply: (passed on to Postfix, which answers)")
    finally:
        await policy.session_closed(session)
        await policy.close()
    return 1 if refused else 0


def _rcpt_stage(policy: Any, session: DryRunSession, rcpt: str):
    async def stage() -> Reply | None:
        try:
            path = parse_path(f"<{rcpt}>", smtputf8=True)
        except AddressError as exc:
            return exc.reply
        return await policy.rcpt(session, path)

    return stage
