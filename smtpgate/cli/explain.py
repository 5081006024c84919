"""explain - run the whole MX policy for one imagined client, or show a past session's evidence.

SYNOPSIS
    run(args, config) -> int        `smtpgate explain --ip IP [--helo NAME] [--from ADDR]
                                                      [--rcpt ADDR]...`
                                    `smtpgate explain --session ID`
    print_record(record, out=sys.stdout)

DESCRIPTION
    A dry run against the live Redis tables and DNS: the same Policy the
    server uses, stage by stage (connect, HELO, MAIL, each RCPT), with no
    greet wait (there is no client to wait for), nothing sent to Postfix
    and nothing written to Redis: the client's connection counts and rate
    are read as if it connected once more, not counted, and its screening
    cache is read, not written. Each verdict is printed with its evidence (which key, which
    zone and answer), then the reply the client would get at that stage.
    Exit status 0 when every recipient would be passed on to Postfix, 1
    when something would be refused, 2 for bad arguments.

    --session ID reads what a past session left in Redis (the ID ends
    every refusal smtpgate wrote; smtpgate.lookups.evidence keeps the
    record for session_record_ttl) and prints it in the same shape: the
    session's facts, then each stage's verdicts with their evidence, each
    refusal after the verdicts that led to it, with the command it
    answered and when. Exit status 0 when printed, 1 when there is no
    such record (unknown, expired, or the session was refused nothing) or
    Redis cannot be read, 2 for an id of the wrong shape or --session
    given with the dry run's options. ID may be given as the reply and the
    log write it (`session=ID`, with the `;` or `,` around it). A session
    refused as an earlier one was (the same in all that the record shows
    but its id, port and times, minutes apart) has only an alias naming
    that one: explain says so and prints the earlier record.
    A session the shadow rules (SMTPGATE_SHADOW_CONFIG) would have decided
    otherwise has a record too, refused or not, and its last section says
    what they would have done at which check.
    A session refused while the node's records were over
    session_record_memory has none ("not recorded").
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
import sys
from typing import Any, TextIO

from smtpgate import session_id
from smtpgate.address import AddressError, parse_path
from smtpgate.config import Config, mask_secret
from smtpgate.policy.state import Client, ClientState
from smtpgate.verdict import Reply

# the stage each check belongs to, for the record's headings
STAGES = {
    "override": "connect", "access_list": "connect", "limits": "connect",
    "pregreet": "connect", "dnsbl": "connect",
    "pipelining": "protocol", "non_smtp_command": "protocol", "bare_newline": "protocol",
    "auth_limit": "AUTH", "helo": "HELO", "sender": "MAIL", "sender_login": "MAIL",
    "client_fcrdns": "RCPT", "destination": "RCPT", "recipient": "RCPT", "greylist": "RCPT",
    "new_tls_session_rate_limit": "STARTTLS", "auth_rate_limit": "AUTH",
    "message_rate_limit": "MAIL", "login_message_rate_limit": "MAIL",
    "recipient_rate_limit": "RCPT", "login_recipient_rate_limit": "RCPT",
}

SHADOW_SAID = {"refuse": "would refuse", "accept": "would accept",
               "reply": "would reply otherwise"}


def run(args: Any, config: Config) -> int:
    if args.session is not None:
        if args.ip is not None or args.helo or args.sender is not None or args.rcpt:
            print("smtpgate explain: --session shows a past session; --ip, --helo, --from "
                  "and --rcpt belong to the dry run", file=sys.stderr)
            return 2
        return asyncio.run(_recorded(args.session, config))
    if args.ip is None:
        print("smtpgate explain: give --ip IP (a dry run for that client) or --session ID "
              "(a past session's evidence)", file=sys.stderr)
        return 2
    try:
        ipaddress.ip_address(args.ip)
    except ValueError:
        print(f"smtpgate explain: --ip {args.ip!r} is not an IP address", file=sys.stderr)
        return 2
    return asyncio.run(_explain(args, dataclasses.replace(config, greet_wait=0.0)))


async def _explain(args: Any, config: Config) -> int:
    from smtpgate.policy.stages import Policy

    policy = await Policy.create(config, dry_run=True)
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
                print(f"  {verdict.check:<16} {verdict.outcome:<7} {verdict.logged}")
            if reply is not None:
                print(f"  reply: {reply}")
                refused = True
                if title == "connect" or reply.code == 421 or reply.code == 521:
                    break  # a reply at connect is the last word: the client is hung up on
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


async def _recorded(text: str, config: Config) -> int:
    from smtpgate.lookups.redis_client import ERRORS
    from smtpgate.policy.stages import Policy

    wanted = session_id.normal(text)
    if not session_id.valid(wanted):
        print(f"smtpgate explain: --session {text!r} is not a session id (12 letters and "
              "digits, as after 'session=' in a reply)", file=sys.stderr)
        return 2
    days = config.session_record_ttl / 86400
    policy = await Policy.create(config)
    try:
        record = await policy.evidence.load(wanted)
        first = None
        if record is not None and record.get("same_as"):
            first = record["same_as"]
            alias, record = record, await policy.evidence.load(first)
    except (*ERRORS, TimeoutError) as exc:
        print(f"smtpgate explain: Redis at {mask_secret(config.redis)} failed: "
              f"{exc or 'timed out'}", file=sys.stderr)
        return 1
    finally:
        await policy.close()
    if first is not None:
        print(f"session {wanted}: client [{alias.get('ip')}] at {_when(alias.get('time'))} "
              f"was refused as session {first} was (same client, listener, HELO, sender, "
              f"recipients, commands, verdicts and replies; another port, time and "
              f"connection count); "
              f"not recorded again: session {first}'s record follows")
        if record is None:
            print(f"smtpgate explain: no record of session {first}: expired (records are "
                  f"kept {days:g} days)", file=sys.stderr)
            return 1
    if record is None:
        print(f"smtpgate explain: no record of session {wanted}: unknown, expired (records "
              f"are kept {days:g} days), not recorded (over session_record_memory), or the "
              "session was refused nothing", file=sys.stderr)
        return 1
    print_record(record)
    return 0


def print_record(record: dict, out: TextIO | None = None) -> None:
    """A stored session record in the dry run's shape (see DESCRIPTION)."""
    # sys.stdout looked up per call, not bound at import: it may be replaced (tests, redirects)
    out = out or sys.stdout
    def say(line: str) -> None:
        print(line, file=out)

    say(f"session {record.get('session')}: {record.get('listener')} client "
        f"{record.get('name')}[{record.get('client')}]:{record.get('port')} "
        f"to {record.get('local')}")
    ended = record.get("ended")
    say(f"  started {_when(record.get('started'))}"
        + (f", ended {_when(ended)}" if ended else ", still open when last written"))
    facts = [f"helo=<{record['helo']}>" if record.get("helo") else "",
             f"from=<{record['sender']}>" if record.get("sender") is not None else "",
             f"login={record['login']}" if record.get("login") else "",
             "to=" + ",".join(f"<{r}>" for r in record["recipients"])
             if record.get("recipients") else ""]
    if any(facts):
        say("  " + " ".join(f for f in facts if f))
    if record.get("commands"):
        say(f"  commands: {record['commands']}")
    omitted = record.get("omitted") or {}
    if omitted.get("everything"):
        say("  (the record was too big to keep its verdicts and replies)")
    verdicts = record.get("verdicts") or []
    refusals = record.get("replies") or []
    gap_at, gap = omitted.get("verdicts_at"), omitted.get("verdicts", 0)
    reply_gap_at, reply_gap = omitted.get("replies_at"), omitted.get("replies", 0)
    shown_replies, title = 0, None

    def replies_until(position: float) -> None:
        nonlocal shown_replies, title
        while shown_replies < len(refusals) and refusals[shown_replies]["verdicts"] <= position:
            if shown_replies == reply_gap_at:
                say(f"  ({reply_gap} more replies left out: the record's size limit)")
            r = refusals[shown_replies]
            say(f"  reply: {r['reply']}    ({r['command']}, {_when(r['time'], clock=True)})")
            shown_replies += 1
            title = None  # the verdicts after a reply get their heading again

    for i, verdict in enumerate(verdicts):
        position = i + gap if gap_at is not None and i >= gap_at else i
        if i == gap_at:
            say(f"  ({gap} more verdicts left out: the record's size limit)")
        replies_until(position)
        stage = STAGES.get(verdict["check"], "other")
        if stage != title:
            say(stage)
            title = stage
        say(f"  {verdict['check']:<16} {verdict['outcome']:<7} {verdict['reason']}")
    replies_until(float("inf"))
    shadow = record.get("shadow") or []
    if shadow:
        say("shadow rules (what the candidate rules would have done otherwise)")
    for entry in shadow:
        said = SHADOW_SAID.get(entry.get("direction"), entry.get("direction"))
        say(f"  {entry.get('check', '?'):<16} {said}: live {entry.get('live')}; "
            f"shadow {entry.get('shadow')}" + (f" ({entry['reason']})" if entry.get("reason")
                                                else ""))


def _when(stamp: float | None, clock: bool = False) -> str:
    if stamp is None:
        return "?"
    moment = datetime.datetime.fromtimestamp(stamp).astimezone()
    shown = moment.strftime("%H:%M:%S.%f" if clock else "%Y-%m-%d %H:%M:%S.%f")[:-3]
    return shown if clock else f"{shown} {moment.tzname()}"
