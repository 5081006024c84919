"""socketmap: the netstring service over real Redis, and a stock Postfix resolving through it."""

import asyncio
import smtplib
import subprocess
import sys
import uuid
from email.message import EmailMessage

import pytest
from services.waiting import wait_until

from smtpgate.lookups.tables import Tables
from smtpgate.service.socketmap import encode, start_socketmap

KEYS = {
    "VDOM:example.com": "example.com",
    "VALI:sales@example.com": "user1@example.com user2@example.com",
    "VALI:team@example.com": "user1@example.com,user2@example.com",
    "VALI:@catchall.example": "user1@example.com",
    "VBOX:user1@example.com": "example.com/user1/",
    "VBOX:user2@example.com": "example.com/user2/",
    "RECIP:sendonly@example.com": "REJECT send-only account",
    "RECIP:broken@example.com": "WHITELIST",
    "LOGMAP:boss@example.com": "boss,assistant",
}


@pytest.fixture
async def socketmap(redis_server, redis):
    redis.mset(KEYS)
    tables = Tables(redis_server.url, timeout=0.3)
    await tables.start()
    server = await start_socketmap(tables, "127.0.0.1", 0, max_request=1000, idle_timeout=5)
    port = server.sockets[0].getsockname()[1]
    yield port
    server.close()
    await server.wait_closed()
    await tables.close()


async def ask(port, *requests, raw=None):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw if raw is not None else b"".join(encode(r) for r in requests))
        await writer.drain()
        answers = []
        for _ in range(len(requests) or 1):
            head = await asyncio.wait_for(reader.readuntil(b":"), 5)
            size = int(head[:-1])
            body = await asyncio.wait_for(reader.readexactly(size + 1), 5)
            assert body.endswith(b",")
            answers.append(body[:-1].decode())
        return answers
    finally:
        writer.close()


CASES = [
    ("vdom-found", "vdom example.com", "OK example.com"),
    ("vdom-case-insensitive", "vdom EXAMPLE.com", "OK example.com"),
    ("vdom-missing", "vdom example.net", "NOTFOUND "),
    ("vali-alias-comma-joined", "vali sales@example.com",
     "OK user1@example.com, user2@example.com"),
    ("vali-commas-kept", "vali team@example.com", "OK user1@example.com, user2@example.com"),
    ("vali-extension-falls-back", "vali sales+x@example.com",
     "OK user1@example.com, user2@example.com"),
    ("vali-catchall-key-asked", "vali @catchall.example", "OK user1@example.com"),
    ("vali-catchall-applies", "vali a@catchall.example", "OK user1@example.com"),
    ("vbox", "vbox user1@example.com", "OK example.com/user1/"),
    ("recip-action", "recip sendonly@example.com", "OK REJECT send-only account"),
    ("logmap", "logmap boss@example.com", "OK boss, assistant"),
    ("unknown-map", "nosuch x", "PERM unknown map 'nosuch'"),
    ("empty-key", "vali ", "NOTFOUND "),
]


@pytest.mark.parametrize(("request_", "reply"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_answers(socketmap, request_, reply):
    assert await ask(socketmap, request_) == [reply]


async def test_bad_value_is_temp(socketmap):
    [reply] = await ask(socketmap, "recip broken@example.com")
    assert reply.startswith("TEMP ") and "RECIP:broken@example.com" in reply


async def test_several_requests_on_one_connection(socketmap):
    answers = await ask(socketmap, "vdom example.com", "vali nobody@example.com",
                        "vbox user2@example.com")
    assert answers == ["OK example.com", "NOTFOUND ", "OK example.com/user2/"]


@pytest.mark.parametrize("raw", [
    pytest.param(b"5000:" + b"x" * 5000 + b",", id="over-limit"),
    pytest.param(b"abc:vdom x,", id="not-a-length"),
    pytest.param(b"6:vdom x;", id="bad-terminator"),
    pytest.param(b"99999999999:", id="huge-length"),
])
async def test_malformed_request_closes(socketmap, raw):
    reader, writer = await asyncio.open_connection("127.0.0.1", socketmap)
    try:
        writer.write(raw)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, no reply
    finally:
        writer.close()


async def test_redis_down_answers_temp(socketmap, redis_server):
    redis_server.stop()
    try:
        [reply] = await ask(socketmap, "vali someone-new@example.com")
        assert reply.startswith("TEMP ")
    finally:
        redis_server.start()


# --- a stock Postfix reading the tables through the socketmap --------------------------------

POSTFIX_KEYS = ("virtual_mailbox_domains", "virtual_alias_maps", "virtual_mailbox_maps",
                "smtpd_recipient_restrictions")


def _postconf_get(postfix_server, name):
    return subprocess.run(["postconf", "-c", str(postfix_server.config_dir), "-h", name],
                          capture_output=True, text=True, timeout=10, check=True).stdout.strip()


def _send(port, rcpts, subject):
    msg = EmailMessage()
    msg["From"] = "sender@example.net"
    msg["To"] = ", ".join(rcpts)
    msg["Subject"] = subject
    msg.set_content("hello through the socketmap\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        return smtp.send_message(msg, to_addrs=rcpts)


def _rcpt_code(port, rcpt):
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo("probe.example.net")
        smtp.mail("sender@example.net")
        code, _ = smtp.rcpt(rcpt)
        smtp.rset()
        return code


@pytest.mark.slow
async def test_postfix_alias_expansion_through_socketmap(socketmap, redis, redis_server,
                                                         postfix_server, dovecot_server):
    saved = {k: _postconf_get(postfix_server, k) for k in POSTFIX_KEYS}
    # team@ exists only in Redis, not in the harness's texthash maps: delivery proves the path.
    base = f"socketmap:inet:127.0.0.1:{socketmap}"
    await asyncio.to_thread(
        postfix_server.postconf,
        virtual_mailbox_domains=f"{base}:vdom",
        virtual_alias_maps=f"{base}:vali",
        virtual_mailbox_maps=f"{base}:vbox",
        smtpd_recipient_restrictions=f"check_recipient_access {base}:recip")
    try:
        # A reload lets idle smtpd processes of the old configuration finish at their
        # convenience: one may still take the next connection. Wait for the new maps.
        await asyncio.to_thread(wait_until, lambda: _rcpt_code(postfix_server.port,
                                                               "team@example.com") == 250,
                                20, "Postfix answering from the socketmap after its reload")
        subject = f"socketmap {uuid.uuid4()}"
        refused = await asyncio.to_thread(_send, postfix_server.port, ["team@example.com"], subject)
        assert refused == {}
        for user in ("user1@example.com", "user2@example.com"):
            await asyncio.to_thread(dovecot_server.wait_for_message, user,
                                    lambda raw: subject.encode() in raw, 30)

        # check_recipient_access through the socketmap: RECIP's REJECT
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused_info:
            await asyncio.to_thread(_send, postfix_server.port, ["sendonly@example.com"], "x")
        code, text = refused_info.value.recipients["sendonly@example.com"]
        assert code == 554 and b"send-only account" in text

        # Redis down: the socketmap answers TEMP and Postfix defers, never accepts or bounces.
        redis_server.stop()
        with pytest.raises(smtplib.SMTPRecipientsRefused) as deferred:
            await asyncio.to_thread(_send, postfix_server.port, ["newcomer@example.com"], "y")
        code, text = deferred.value.recipients["newcomer@example.com"]
        assert code == 451 and text.startswith(b"4.3.0"), (code, text)
    finally:
        redis_server.start()
        await asyncio.to_thread(postfix_server.postconf, **saved)


STOP_WITH_OPEN_CONNECTIONS = """
import asyncio, socket, sys
import uvloop
from smtpgate.lookups.tables import Tables
from smtpgate.service.socketmap import start_socketmap

async def main():
    tables = Tables(sys.argv[2], timeout=0.3)
    server = await start_socketmap(tables, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    while len(asyncio.all_tasks()) < 4:  # each connection's task has started
        await asyncio.sleep(0.01)
    server.close()
    return held  # still open, as Postfix keeps them, when the loop ends

(uvloop.run if sys.argv[1] == "uvloop" else asyncio.run)(main())
print("stopped")
"""


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_worker_stopping_with_postfixs_connections_open_logs_no_traceback(
        loop, redis_server, tmp_path):
    script = tmp_path / "stop.py"
    script.write_text(STOP_WITH_OPEN_CONNECTIONS)
    result = subprocess.run([sys.executable, str(script), loop, redis_server.url],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "stopped\n", result.stderr
    assert result.stderr == ""
