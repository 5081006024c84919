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
from typing import Any

from smtpgate.address import AddressError, parse_path
from smtpgate.config import Config
from smtpgate.policy.state import Client, ClientState
from smtpgate.verdict import Reply


def run(args: Any, config: Config) -> int:
    try:
        ipaddress.ip_address(args.ip)
    except ValueError:
        print(f"smtpgate explain: --ip {args.ip!r} is not an IP address", file=sys.stderr)
        return 2
    return asyncio.run(_explain(args, dataclasses.replace(config, greet_wait=0.0)))


async def _explain(args: Any, config: Config) -> int:
    from smtpgate.policy.stages import Policy

    policy = await Policy.create(config)
    state = policy.open(Client(args.ip, 0))
    refused = False
    try:
        stages: list[tuple[str, Any]] = [("connect", lambda: policy.connect(state))]
        if args.helo:
            stages.append((f"HELO {args.helo}", lambda: policy.helo(state, args.helo)))
        sender = None
        if args.sender is not None:
            try:
                sender = parse_path(f"<{args.sender}>", smtputf8=True, mail=True)
            except AddressError as exc:
                print(f"MAIL FROM:<{args.sender}>\n  reply: {exc.reply}")
                return 1
            stages.append((f"MAIL FROM:<{args.sender}>", lambda: policy.mail(state, sender, None)))
        for rcpt in args.rcpt:
            stages.append((f"RCPT TO:<{rcpt}>", _rcpt_stage(policy, state, rcpt)))
        for title, stage in stages:
            seen = len(state.record)
            reply = await stage()
            print(title)
            for verdict in state.record[seen:]:
                print(f"  {verdict.check:<16} {verdict.outcome:<7} {verdict.reason}")
            if reply is not None:
                print(f"  reply: {reply}")
                refused = True
                if reply.code == 421 or reply.code == 521:
                    break
            elif title.startswith("RCPT"):
                print("  reply: (accepted; Postfix has the last word when the message is relayed)")
    finally:
        policy.close_session(state)
        await policy.close()
    return 1 if refused else 0


def _rcpt_stage(policy: Any, state: ClientState, rcpt: str):
    async def stage() -> Reply | None:
        try:
            path = parse_path(f"<{rcpt}>", smtputf8=True)
        except AddressError as exc:
            return exc.reply
        return await policy.rcpt(state, path, None, smtputf8=True)

    return stage
