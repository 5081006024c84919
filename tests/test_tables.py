"""tables: the image's keys read from a real redis-server, with and without the cache."""

import asyncio
import logging
import os
import signal
import time

import pytest
from services.waiting import no_hang

from smtpgate.checks.access_value import Kind
from smtpgate.lookups import keys
from smtpgate.lookups.tables import TableError, Tables, interpret, tempfail_reply


async def eventually(predicate, timeout=5.0, what="condition"):
    """Await predicate() until true, with a deadline (invalidations arrive asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture(params=[False, True], ids=["direct", "cached"])
async def tables(request, redis_server, redis):
    t = Tables(redis_server.url, timeout=0.5, cache=request.param)
    await t.start()
    if request.param:
        assert await t.wait_cache_ready(5), "cache never loaded"
    yield t
    await t.close()


async def settle(tables, redis, **pairs):
    """Write keys; with the cache, wait until the last one is visible through it."""
    for k, v in pairs.items():
        redis.set(k, v)
    if tables.cache.ready and pairs:
        await tables.wait_cache_ready(5)
        marker = f"settle-{time.monotonic_ns()}.example"
        redis.set(f"VDOM:{marker}", "x")

        async def indexed():
            return tables.cache.lookup_name(keys.VDOM, marker)

        # Invalidations are delivered in order: once the marker's one is applied, all are.
        await eventually(indexed, what="marker indexed")
        redis.delete(f"VDOM:{marker}")


CIDR = {
    "PSA:192.168.0.0/16": "reject",
    "PSA:192.168.1.0/24": "permit",
    "PSA:192.168.1.7": "dunno",
    "PSA:10.0.0.0/8": "permit",
    "PSA:2001:db8::/32": "reject",
    "PSA:2001:db8:1::/48": "permit",
    "REV:203.0.113.0/24": "permit",
}

CIDR_CASES = [
    ("exact-ip-beats-networks", "192.168.1.7", "PSA:192.168.1.7", Kind.DUNNO),
    ("slash24-beats-slash16", "192.168.1.200", "PSA:192.168.1.0/24", Kind.OK),
    ("slash16", "192.168.9.9", "PSA:192.168.0.0/16", Kind.REJECT),
    ("slash8", "10.200.3.4", "PSA:10.0.0.0/8", Kind.OK),
    ("no-match", "172.16.0.1", None, None),
    ("ipv6-slash48", "2001:db8:1::25", "PSA:2001:db8:1::/48", Kind.OK),
    ("ipv6-slash32", "2001:db8:2::25", "PSA:2001:db8::/32", Kind.REJECT),
    ("ipv6-bracketed", "[2001:db8:2::25]", "PSA:2001:db8::/32", Kind.REJECT),
    ("ipv4-mapped-ipv6", "::ffff:10.1.2.3", "PSA:10.0.0.0/8", Kind.OK),
]


@pytest.mark.parametrize(("ip", "key", "kind"), [c[1:] for c in CIDR_CASES],
                         ids=[c[0] for c in CIDR_CASES])
async def test_psa_most_specific_match(tables, redis, ip, key, kind):
    await settle(tables, redis, **CIDR)
    facts = await tables.connect_facts(ip)
    if key is None:
        assert facts.psa is None
    else:
        assert facts.psa.key == key
        assert facts.psa.action.kind is kind


async def test_rev_by_ip_network_and_hostname(tables, redis):
    await settle(tables, redis, **CIDR, **{"REV:mail.example.net": "permit"})
    facts = await tables.connect_facts("203.0.113.9")
    assert facts.rev.key == "REV:203.0.113.0/24"
    assert facts.rev.action.kind is Kind.OK
    hit = await tables.rev_by_name("MAIL.example.NET.")
    assert hit is not None and hit.action.kind is Kind.OK
    assert await tables.rev_by_name("other.example.net") is None


async def test_helo_is_case_insensitive(tables, redis):
    await settle(tables, redis, **{"HLO:rejectedmessage": "permit",
                                   "HLO:mail.spammer.bulk": "reject"})
    assert (await tables.helo("REJECTEDMESSAGE")).action.kind is Kind.OK
    assert (await tables.helo("Mail.Spammer.Bulk")).action.kind is Kind.REJECT
    assert await tables.helo("mail.example.com") is None


async def test_helo_uppercase_key_as_the_readme_writes_it(tables, redis):
    await settle(tables, redis, **{"HLO:REJECTEDMESSAGE": "permit"})
    assert (await tables.helo("REJECTEDMESSAGE")).action.kind is Kind.OK
    if tables.cache.ready:  # the index folds stored keys too
        assert (await tables.helo("RejectedMessage")).action.kind is Kind.OK


RCPT = {
    "VDOM:example.com": "example.com",
    "VALI:user1@example.com": "user1@example.com",
    "VALI:sales@example.com": "user1@example.com user2@example.com",
    "VALI:team@example.com": "user1@example.com,user2@example.com, user3@example.com",
    "VALI:@catchall.example": "postmaster@example.com",
    "VDOM:catchall.example": "catchall.example",
    "VBOX:box@example.com": "example.com/box/",
    "RECIP:sendonly@example.com": "REJECT send-only account",
    "RECIP:example.org": "550 5.1.1 not here",
}

RCPT_CASES = [
    # label, address, vdom?, vali key, targets, recip key
    ("full-address", "user1@example.com", True, "VALI:user1@example.com",
     ("user1@example.com",), None),
    ("plus-extension", "user1+news@example.com", True, "VALI:user1@example.com",
     ("user1@example.com",), None),
    ("upper-case", "User1@EXAMPLE.com", True, "VALI:user1@example.com",
     ("user1@example.com",), None),
    ("alias-space-separated", "sales@example.com", True, "VALI:sales@example.com",
     ("user1@example.com", "user2@example.com"), None),
    ("alias-comma-separated", "team@example.com", True, "VALI:team@example.com",
     ("user1@example.com", "user2@example.com", "user3@example.com"), None),
    ("catch-all", "anyone@catchall.example", True, "VALI:@catchall.example",
     ("postmaster@example.com",), None),
    ("unknown-user", "nobody@example.com", True, None, (), None),
    ("unknown-domain", "a@elsewhere.test", False, None, (), None),
    ("recip-address", "sendonly@example.com", True, None, (), "RECIP:sendonly@example.com"),
    ("recip-domain", "x@example.org", False, None, (), "RECIP:example.org"),
]


@pytest.mark.parametrize(("address", "vdom", "vali", "targets", "recip"),
                         [c[1:] for c in RCPT_CASES], ids=[c[0] for c in RCPT_CASES])
async def test_rcpt_facts(tables, redis, address, vdom, vali, targets, recip):
    await settle(tables, redis, **RCPT)
    facts = await tables.rcpt_facts(address)
    assert (facts.vdom is not None) is vdom
    assert (facts.vali.key if facts.vali else None) == vali
    assert (facts.vali.targets if facts.vali else ()) == targets
    assert (facts.recip.key if facts.recip else None) == recip
    assert not facts.invalid


async def test_vbox_and_recip_actions(tables, redis):
    await settle(tables, redis, **RCPT)
    facts = await tables.rcpt_facts("box+x@example.com")
    assert facts.vbox.value == "example.com/box/"
    facts = await tables.rcpt_facts("sendonly@example.com")
    reply = facts.recip.action.reply_for("<sendonly@example.com>: Recipient address rejected")
    assert str(reply) == ("554 5.7.1 <sendonly@example.com>: Recipient address rejected: "
                          "send-only account")


async def test_logmap_sender_then_domain(tables, redis):
    await settle(tables, redis, **{"LOGMAP:boss@example.com": "boss, assistant",
                                   "LOGMAP:@example.com": "admin"})
    assert (await tables.logmap("boss@example.com")).targets == ("boss", "assistant")
    assert (await tables.logmap("other@Example.com")).targets == ("admin",)
    assert await tables.logmap("x@example.net") is None


async def test_unknown_action_is_invalid_and_logged_once(tables, redis, caplog):
    await settle(tables, redis, **{"RECIP:odd@example.com": "ALLOW",
                                   "PSA:198.51.100.1": "DEFER"})
    with caplog.at_level(logging.WARNING, logger="smtpgate.lookups.tables"):
        for _ in range(3):
            facts = await tables.rcpt_facts("odd@example.com")
            assert facts.invalid and facts.recip.action.kind is Kind.INVALID
            assert str(facts.recip.action.reply) == "451 4.3.0 Temporary lookup failure"
        psa = (await tables.connect_facts("198.51.100.1")).psa
    assert psa.invalid  # DEFER is access(5) but not a postscreen access-list action
    warned = [r for r in caplog.records if "RECIP:odd@example.com" in r.getMessage()]
    assert len(warned) == 1


async def test_one_round_trip_per_phase_uncached(redis_server, redis):
    redis.mset(RCPT)
    async with Tables(redis_server.url, timeout=0.5, cache=False) as t:
        before = t.stats.round_trips
        await t.connect_facts("2001:db8::1")
        await t.rcpt_facts("user1+x@example.com")
        await t.logmap("user1@example.com")
        assert t.stats.round_trips - before == 3


async def test_no_round_trip_when_cache_is_warm(redis_server, redis):
    redis.mset(RCPT)
    async with Tables(redis_server.url, timeout=0.5) as t:
        assert await t.wait_cache_ready(5)
        await t.rcpt_facts("sales@example.com")
        before = t.stats.round_trips
        facts = await t.rcpt_facts("sales@example.com")
        await t.connect_facts("192.0.2.1")
        assert t.stats.round_trips == before
        assert facts.vali.targets == ("user1@example.com", "user2@example.com")


async def test_cache_follows_changes(redis_server, redis):
    redis.mset(RCPT)
    async with Tables(redis_server.url, timeout=0.5) as t:
        assert await t.wait_cache_ready(5)
        assert (await t.rcpt_facts("sales@example.com")).vali is not None
        redis.set("VALI:sales@example.com", "user3@example.com")

        async def changed():
            vali = (await t.rcpt_facts("sales@example.com")).vali
            return vali.targets == ("user3@example.com",)

        await eventually(changed, what="VALI change seen")
        redis.delete("VALI:sales@example.com")

        async def gone():
            return (await t.rcpt_facts("sales@example.com")).vali is None

        await eventually(gone, what="VALI delete seen")
        redis.set("PSA:198.51.100.0/24", "reject")

        async def psa():
            hit = (await t.connect_facts("198.51.100.77")).psa
            return hit is not None and hit.action.kind is Kind.REJECT

        await eventually(psa, what="new PSA network indexed")
        redis.flushdb()

        async def flushed():
            return (await t.connect_facts("198.51.100.77")).psa is None

        await eventually(flushed, what="flush seen")


async def test_redis_killed_mid_session_then_back(redis_server, redis):
    redis.mset(RCPT)
    t = Tables(redis_server.url, timeout=0.3)
    await t.start()
    try:
        assert await t.wait_cache_ready(5)
        await t.rcpt_facts("nobody-cached-yet@example.com")
        redis_server.stop()
        # The cache drops itself with the invalidation stream; lookups then tempfail.
        async def failing():
            try:
                await t.rcpt_facts("user1@example.com")
            except TableError:
                return True
            return False

        await eventually(failing, what="TableError with Redis down")

        async def cache_dropped():
            return not t.cache_ready

        await eventually(cache_dropped, what="cache dropped with its invalidation stream")
        with pytest.raises(TableError):
            await t.connect_facts("192.0.2.9")
        assert t.health.ok is False
        assert str(tempfail_reply("connect")) == "421 4.3.0 Temporary lookup failure"
        assert str(tempfail_reply("rcpt", "<a@b.c>")) == (
            "451 4.3.0 <a@b.c>: Temporary lookup failure")
        redis_server.start()
        redis_server.client().mset(RCPT)

        async def back():
            try:
                return (await t.rcpt_facts("user1@example.com")).vali is not None
            except TableError:
                return False

        await eventually(back, timeout=10, what="lookups work again")
        assert t.health.ok is True
        assert await t.wait_cache_ready(10)
    finally:
        redis_server.start()
        await t.close()


async def test_hung_redis_times_out(redis_server, redis):
    async with Tables(redis_server.url, timeout=0.2, cache=False) as t:
        await t.rcpt_facts("warm-the-pool@example.com")
        pid = redis_server._proc.pid
        os.kill(pid, signal.SIGSTOP)  # Redis alive but not answering
        try:
            async with no_hang():  # the 0.2 s timeout ends it
                with pytest.raises(TableError, match="timed out"):
                    await t.rcpt_facts("user1@example.com")
        finally:
            os.kill(pid, signal.SIGCONT)
        assert (await t.rcpt_facts("user1@example.com")).vali is None


async def test_unreachable_redis_at_start_does_not_raise():
    t = Tables("redis://127.0.0.1:1/0", timeout=0.2)
    await t.start()
    try:
        with pytest.raises(TableError):
            await t.rcpt_facts("a@example.com")
        assert t.health.ok is False
    finally:
        await t.close()


INTERPRET = [
    ("psa-permit", "PSA:1.2.3.4", "permit", ""),
    ("psa-defer-not-allowed", "PSA:1.2.3.4", "DEFER", "is not permit, reject or dunno"),
    ("vali-empty", "VALI:a@b.c", "  ", "empty value"),
    ("vdom-any", "VDOM:b.c", "whatever", ""),
    ("recip-unknown", "RECIP:a@b.c", "WHITELIST", "unknown action"),
]


@pytest.mark.parametrize(("key", "value", "error"), [c[1:] for c in INTERPRET],
                         ids=[c[0] for c in INTERPRET])
def test_interpret(key, value, error):
    hit = interpret(key, value)
    assert error in hit.error if error else not hit.invalid


# --- REDIS forms: unix socket with a password, and TLS (rediss://, replacing stunnel) ---------


def _private_redis(tmp_path, *args):
    from services.procs import spawn, stop_process
    from services.waiting import wait_until

    proc = spawn(["redis-server", "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
                  "--requirepass", "s3cret", *args], tmp_path / "redis.log", cwd=tmp_path)
    return proc, stop_process, wait_until


async def _exercise(url):
    async with Tables(url, timeout=1.0) as t:
        assert await t.wait_cache_ready(5), "cache never loaded"
        facts = await t.connect_facts("192.168.7.7")
        assert facts.psa.key == "PSA:192.168.0.0/16"
        assert (await t.rcpt_facts("sales@example.com")).vali.targets == ("a@example.com",)


async def test_unix_socket_with_password(tmp_path):
    sock = tmp_path / "redis.sock"
    proc, stop, wait_until = _private_redis(tmp_path, "--port", "0", "--unixsocket", str(sock))
    try:
        import redis as sync_redis

        client = sync_redis.Redis(unix_socket_path=str(sock), password="s3cret")
        wait_until(client.ping, 10, "redis on a unix socket")
        client.mset({"PSA:192.168.0.0/16": "permit", "VALI:sales@example.com": "a@example.com"})
        await _exercise(f"unix://:s3cret@{sock}?db=0")
        with pytest.raises(TableError):
            async with Tables(f"unix://:wrong@{sock}?db=0", timeout=1.0, cache=False) as t:
                await t.rcpt_facts("sales@example.com")
    finally:
        stop(proc)


async def test_tls_rediss(tmp_path):
    trustme = pytest.importorskip("trustme")
    from services.ports import free_port

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    port = free_port()
    proc, stop, wait_until = _private_redis(
        tmp_path, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
        "--tls-cert-file", str(tmp_path / "cert.pem"), "--tls-key-file", str(tmp_path / "key.pem"),
        "--tls-ca-cert-file", str(tmp_path / "ca.pem"), "--tls-auth-clients", "no")
    try:
        import redis as sync_redis

        client = sync_redis.Redis(host="127.0.0.1", port=port, password="s3cret", ssl=True,
                                  ssl_ca_certs=str(tmp_path / "ca.pem"))
        wait_until(client.ping, 10, "redis over TLS")
        client.mset({"PSA:192.168.0.0/16": "permit", "VALI:sales@example.com": "a@example.com"})
        await _exercise(f"rediss://:s3cret@127.0.0.1:{port}/0?ssl_ca_certs={tmp_path}/ca.pem")
    finally:
        stop(proc)
