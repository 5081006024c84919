"""`smtpgate table get|set|del|list`: validation (pure) and the commands against real Redis."""

import io

import pytest

from smtpgate.address import parse_rcpt_arg
from smtpgate.cli.table import run
from smtpgate.config import load
from smtpgate.lookups import keys

KEY_OK = [
    ("psa-ip", "PSA", "192.168.0.8", "192.168.0.8"),
    ("psa-cidr", "PSA", "192.168.0.0/24", "192.168.0.0/24"),
    ("psa-ipv6-cidr", "PSA", "2001:DB8::/32", "2001:db8::/32"),
    ("psa-host-route", "PSA", "10.0.0.1/32", "10.0.0.1"),
    ("psa-bracketed-ipv6", "PSA", "[::1]/128", "::1"),
    ("rev-hostname", "REV", "Mail.Example.net.", "mail.example.net"),
    ("rev-cidr", "REV", "203.0.113.0/24", "203.0.113.0/24"),
    ("hlo-lowered", "HLO", "REJECTEDMESSAGE", "rejectedmessage"),
    ("vdom", "VDOM", "Example.COM", "example.com"),
    ("vali-address", "VALI", "Sales@Example.com", "sales@example.com"),
    ("vali-catchall", "VALI", "@example.com", "@example.com"),
    ("recip-domain", "RECIP", "example.org", "example.org"),
    ("logmap-address", "LOGMAP", "boss@example.com", "boss@example.com"),
]

KEY_BAD = [
    ("psa-hostname", "PSA", "mail.example.com", "not an IP address or CIDR"),
    ("psa-host-bits", "PSA", "192.168.0.1/24", "did you mean 192.168.0.0/24"),
    ("psa-bad-mask", "PSA", "10.0.0.0/33", "not an IP address or CIDR"),
    ("vdom-word", "VDOM", "localhost", "not a domain"),
    ("vdom-address", "VDOM", "a@example.com", "not a domain"),
    ("vali-not-address", "VALI", "sales", "not an address"),
    ("whitespace", "HLO", "a b", "white space"),
    ("unknown-prefix", "FOO", "x", "unknown prefix"),
]

VALUE_OK = [
    ("psa-permit", "PSA", "permit", "permit"),
    ("psa-reject-upper", "PSA", "REJECT", "REJECT"),
    ("rev-access-text", "RECIP", "550 5.7.1 no", "550 5.7.1 no"),
    ("vali-normalized", "VALI", "a@example.com,b@example.com  c@example.com",
     "a@example.com b@example.com c@example.com"),
    ("vdom-anything", "VDOM", "example.com", "example.com"),
    ("logmap-list", "LOGMAP", "boss, assistant", "boss assistant"),
]

VALUE_BAD = [
    ("psa-defer", "PSA", "DEFER", "not permit, reject or dunno"),
    ("psa-typo", "PSA", "permti", "unknown action"),
    ("recip-all-numeric", "RECIP", "550", "all-numerical"),
    ("recip-unsupported", "RECIP", "DISCARD", "not supported"),
    ("vali-not-address", "VALI", "user1 user2@example.com", "user1 is not an address"),
    ("empty", "VDOM", "  ", "empty"),
    ("vbox-space", "VBOX", "a b", "white space"),
]


@pytest.mark.parametrize(("prefix", "name", "stored"), [c[1:] for c in KEY_OK],
                         ids=[c[0] for c in KEY_OK])
def test_normalize_key(prefix, name, stored):
    assert keys.normalize_key(prefix, name) == stored


@pytest.mark.parametrize(("prefix", "name", "why"), [c[1:] for c in KEY_BAD],
                         ids=[c[0] for c in KEY_BAD])
def test_normalize_key_refuses(prefix, name, why):
    with pytest.raises(ValueError, match=why):
        keys.normalize_key(prefix, name)


# Written as a client writes them in RCPT TO (SMTPUTF8 declared); each is accepted there.
RCPT_FORMS = [
    "user@example.com", "User@Example.COM.", "first_last@mail_host.example.com",
    '"john doe"@example.com', '"a\\"b"@example.com', '"a,b"@example.com', '"x@y"@example.com',
    '"john(work)"@example.com',
    "user@b\u00fccher.example", "p\u00e9rez@example.com", "postmaster@[192.0.2.1]",
    "postmaster@[IPv6:2001:db8::1]", "user@localhost", "a.b+tag@example.com",
]


@pytest.mark.parametrize("written", RCPT_FORMS)
@pytest.mark.parametrize("prefix", ["VALI", "VBOX", "RECIP", "LOGMAP"])
def test_every_address_the_smtp_parser_accepts_is_a_valid_key(prefix, written):
    """One address grammar: a key can be set for whatever a client may give in RCPT TO.

    The key is the parser's internal form (quotes removed), lower-cased, as it is looked up;
    white space is the one exception (the CLI takes a key as one word)."""
    path = parse_rcpt_arg(f"TO:<{written}>", smtputf8=True)
    if any(c.isspace() for c in path.address):
        with pytest.raises(ValueError, match="white space"):
            keys.normalize_key(prefix, path.address)
        return
    assert keys.normalize_key(prefix, path.address) == path.address.lower()


@pytest.mark.parametrize(("prefix", "value", "stored"), [c[1:] for c in VALUE_OK],
                         ids=[c[0] for c in VALUE_OK])
def test_check_value(prefix, value, stored):
    assert keys.check_value(prefix, value) == stored


@pytest.mark.parametrize(("prefix", "value", "why"), [c[1:] for c in VALUE_BAD],
                         ids=[c[0] for c in VALUE_BAD])
def test_check_value_refuses(prefix, value, why):
    with pytest.raises(ValueError, match=why):
        keys.check_value(prefix, value)


LOOKUP_ORDER = [
    ("vali-ext", keys.address_keys("VALI", "User+Tag@Example.COM"),
     ["VALI:user+tag@example.com", "VALI:user@example.com", "VALI:@example.com"]),
    ("vali-plain", keys.address_keys("VALI", "<a@b.c>"), ["VALI:a@b.c", "VALI:@b.c"]),
    ("recip", keys.recip_keys("a+x@b.c"), ["RECIP:a+x@b.c", "RECIP:b.c"]),
    ("logmap", keys.logmap_keys("a@B.c"), ["LOGMAP:a@b.c", "LOGMAP:@b.c"]),
    ("network-keys-v4", keys.network_keys("PSA", "10.1.2.3")[:4],
     ["PSA:10.1.2.3", "PSA:10.1.2.3/32", "PSA:10.1.2.2/31", "PSA:10.1.2.0/30"]),
    ("network-keys-v4-count", len(keys.network_keys("PSA", "10.1.2.3")), 34),
    ("network-keys-v6-count", len(keys.network_keys("REV", "2001:db8::1")), 130),
]


@pytest.mark.parametrize(("got", "want"), [c[1:] for c in LOOKUP_ORDER],
                         ids=[c[0] for c in LOOKUP_ORDER])
def test_lookup_order(got, want):
    assert got == want


# --- the command against a real Redis ---------------------------------------------------------


@pytest.fixture
def cli(redis_server, redis):
    config = load({"REDIS": redis_server.url, "HOSTNAME": "mx.example.com"})

    def call(*args):
        out, err = io.StringIO(), io.StringIO()
        status = run(list(args), config, stdout=out, stderr=err)
        return status, out.getvalue(), err.getvalue()

    return call


def test_set_get_del(cli, redis):
    assert cli("set", "psa", "192.168.0.0/24", "permit")[0] == 0
    assert redis.get("PSA:192.168.0.0/24") == "permit"
    status, out, _ = cli("get", "PSA", "192.168.0.0/24")
    assert (status, out) == (0, "permit\n")
    assert cli("del", "PSA", "192.168.0.0/24")[0] == 0
    assert redis.get("PSA:192.168.0.0/24") is None
    status, _, err = cli("get", "PSA", "192.168.0.0/24")
    assert status == 1 and "no key PSA:192.168.0.0/24" in err


def test_set_multiword_values(cli, redis):
    status = cli("set", "VALI", "Sales@Example.com", "user1@example.com,", "user2@example.com")[0]
    assert status == 0
    assert redis.get("VALI:sales@example.com") == "user1@example.com user2@example.com"
    assert cli("set", "RECIP", "x@example.com", "REJECT", "send-only")[0] == 0
    assert redis.get("RECIP:x@example.com") == "REJECT send-only"


@pytest.mark.parametrize("args", [
    pytest.param(("set", "PSA", "mail.example.com", "permit"), id="hostname-in-psa"),
    pytest.param(("set", "PSA", "10.0.0.1/8", "permit"), id="host-bits"),
    pytest.param(("set", "PSA", "10.0.0.0/8", "allow"), id="unknown-action"),
    pytest.param(("set", "VDOM", "nodots", "x"), id="vdom-not-domain"),
    pytest.param(("set", "VALI", "a@example.com", "bob"), id="vali-target-not-address"),
])
def test_refused_with_exit_1_and_nothing_written(cli, redis, args):
    status, out, err = cli(*args)
    assert status == 1 and out == ""
    assert err.startswith("smtpgate table set: ") and err.count("\n") == 1
    assert redis.dbsize() == 0


@pytest.mark.parametrize("args", [
    pytest.param((), id="nothing"),
    pytest.param(("frob", "PSA"), id="unknown-command"),
    pytest.param(("get", "PSA"), id="missing-key"),
    pytest.param(("set", "PSA", "1.2.3.4"), id="missing-value"),
    pytest.param(("list", "NOPE"), id="unknown-prefix"),
])
def test_usage_errors_exit_2(cli, args):
    status, _, err = cli(*args)
    assert status == 2
    assert "usage" in err or "unknown prefix" in err


def test_list_uses_scan_and_filters(cli, redis):
    redis.mset({f"VALI:u{i}@example.com": f"u{i}@example.com" for i in range(1200)})
    redis.set("VALI:x@other.example", "x@other.example")
    redis.set("VDOM:example.com", "example.com")
    status, out, err = cli("list", "VALI")
    assert status == 0 and len(out.splitlines()) == 1201
    assert "1201 keys under VALI:*" in err
    assert "u7@example.com u7@example.com" in out.splitlines()
    status, out, _ = cli("list", "vali", "*@other.example")
    assert out == "x@other.example x@other.example\n"


def test_leading_table_word_accepted(cli, redis):
    assert cli("table", "set", "VDOM", "example.com", "example.com")[0] == 0
    assert redis.get("VDOM:example.com") == "example.com"


def test_redis_unreachable_is_a_clear_error():
    config = load({"REDIS": "127.0.0.1:1", "HOSTNAME": "mx.example.com",
                   "SMTPGATE_REDIS_TIMEOUT": "0.5"})
    err = io.StringIO()
    assert run(["get", "PSA", "1.2.3.4"], config, stdout=io.StringIO(), stderr=err) == 1
    assert "Redis at redis://127.0.0.1:1/0 failed" in err.getvalue()


def test_get_names_the_key_that_decides(cli, redis):
    redis.set("PSA:192.0.2.0/24", "reject")
    status, out, err = cli("get", "PSA", "192.0.2.7")
    assert (status, out) == (0, "reject\n"), err
    assert err == "PSA:192.0.2.0/24 decides for 192.0.2.7 (no PSA:192.0.2.7)\n"
    redis.set("PSA:192.0.2.0/25", "permit")  # the longer prefix decides, as in a lookup
    assert cli("get", "PSA", "192.0.2.7")[1:] == (
        "permit\n", "PSA:192.0.2.0/25 decides for 192.0.2.7 (no PSA:192.0.2.7)\n")
    redis.set("PSA:192.0.2.7", "dunno")  # the key itself, when there is one
    assert cli("get", "PSA", "192.0.2.7") == (0, "dunno\n", "")
    redis.set("VALI:user1@example.com", "user1@example.com")
    assert cli("get", "VALI", "user1+tag@example.com")[1:] == (
        "user1@example.com\n",
        "VALI:user1@example.com decides for user1+tag@example.com "
        "(no VALI:user1+tag@example.com)\n")
    status, _, err = cli("get", "PSA", "198.51.100.1")
    assert status == 1
    assert err == "smtpgate table get: no key PSA:198.51.100.1 nor any key that covers it\n"


def test_list_without_a_prefix_lists_every_table(cli, redis):
    redis.mset({"VDOM:example.com": "example.com", "PSA:192.0.2.0/24": "reject",
                "VALI:a@example.com": "a@example.com", "smtpgate:psc:192.0.2.1": "x",
                "other": "y"})
    redis.hset("smtpgate:aliases:x", "a", "b")
    status, out, err = cli("list")
    assert status == 0
    assert out == ("PSA:192.0.2.0/24 reject\nVDOM:example.com example.com\n"
                   "VALI:a@example.com a@example.com\n")
    assert err.startswith("3 keys under PSA:* REV:* HLO:* VDOM:*")


@pytest.mark.parametrize(("prefix", "value", "said"), [
    ("PSA", "rejct", "PSA value 'rejct': unknown action 'rejct' (did you mean reject?); "
                     "PSA takes permit, reject or dunno"),
    ("RECIP", "REJCT no thanks", "RECIP value 'REJCT no thanks': unknown action 'REJCT' (did "
                                 "you mean REJECT?); RECIP takes OK, REJECT [text], DEFER "
                                 "[text], DEFER_IF_PERMIT [text], DEFER_IF_REJECT [text], 4NN "
                                 "text, 5NN text or DUNNO"),
    ("HLO", "frobnicate", "HLO value 'frobnicate': unknown action 'frobnicate'; HLO takes OK, "
                          "REJECT [text]"),
])
def test_a_misspelt_action_is_refused_with_the_valid_ones(cli, redis, prefix, value, said):
    status, out, err = cli("set", prefix, "example.com" if prefix != "PSA" else "192.0.2.1",
                           *value.split())
    assert status == 1 and out == ""
    assert err.startswith(f"smtpgate table set: {said}"), err
    assert redis.dbsize() == 0
