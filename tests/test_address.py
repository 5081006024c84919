"""Envelope address parser: labelled cases, then a fuzz where only AddressError escapes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpgate.address import (
    AddressError,
    client_text,
    is_fqdn,
    is_valid_hostname,
    parse_mail_arg,
    parse_path,
    parse_rcpt_arg,
    plain_ip,
    split,
    valid_address_literal,
)

BAD_SENDER = "501 5.1.7 Bad sender address syntax"
BAD_RCPT = "501 5.1.3 Bad recipient address syntax"
UTF8 = "553 5.6.7 Must declare SMTPUTF8 to send unicode address"

# (text, mail, smtputf8, address, domain, params, route, quoted, routed)
GOOD = [
    ("plain", "<a@b.example>", False, False, "a@b.example", "b.example", {}, (), False, False),
    ("space after colon", "  <a@b.example>", True, False, "a@b.example", "b.example", {}, (),
     False, False),
    ("null sender", "<>", True, False, "", "", {}, (), False, False),
    ("null sender params", "<> BODY=8BITMIME", True, False, "", "", {"BODY": "8BITMIME"}, (),
     False, False),
    ("params upper-cased", "<a@b.example> size=100 body=8BITMIME", True, False, "a@b.example",
     "b.example", {"SIZE": "100", "BODY": "8BITMIME"}, (), False, False),
    ("param without value", "<a@b.example> SMTPUTF8", True, True, "a@b.example", "b.example",
     {"SMTPUTF8": None}, (), False, False),
    ("params split as Postfix splits them", "<a@b.example>\tSIZE=1\x0bBODY=7BIT", True, False,
     "a@b.example", "b.example", {"SIZE": "1", "BODY": "7BIT"}, (), False, False),
    ("no split at \\x1f", "<a@b.example> SIZE=1\x1fBODY=7BIT", True, False, "a@b.example",
     "b.example", {"SIZE": "1\x1fBODY=7BIT"}, (), False, False),
    ("no split at NBSP", "<a@b.example> SIZE=1\xa0BODY=7BIT", True, False, "a@b.example",
     "b.example", {"SIZE": "1\xa0BODY=7BIT"}, (), False, False),
    ("several blanks between params", "<a@b.example>  NOTIFY=NEVER   ORCPT=rfc822;a@b.example",
     False, False, "a@b.example", "b.example",
     {"NOTIFY": "NEVER", "ORCPT": "rfc822;a@b.example"}, (), False, False),
    ("atext specials", "<a.b+c-d_e!f#g$h%i&j'k*l/m=n?o^p`q{r|s}t~u@x.example>", False, False,
     "a.b+c-d_e!f#g$h%i&j'k*l/m=n?o^p`q{r|s}t~u@x.example", "x.example", {}, (), False, True),
    ("plus tag", "<user+tag@dom.example>", False, False, "user+tag@dom.example", "dom.example",
     {}, (), False, False),
    ("quoted plain", '<"john smith"@dom.example>', False, False, "john smith@dom.example",
     "dom.example", {}, (), True, False),
    ("quoted with @", '<"user@other.example"@dom.example>', False, False,
     "user@other.example@dom.example", "dom.example", {}, (), True, True),
    ("quoted with >", '<"a>b"@dom.example> NOTIFY=NEVER', False, False, "a>b@dom.example",
     "dom.example", {"NOTIFY": "NEVER"}, (), True, False),
    ("quoted pair", r'<"a\"b"@dom.example>', False, False, 'a"b@dom.example', "dom.example",
     {}, (), True, False),
    ("percent hack", "<user%other.example@dom.example>", False, False,
     "user%other.example@dom.example", "dom.example", {}, (), False, True),
    ("bang path", "<other!user@dom.example>", False, False, "other!user@dom.example",
     "dom.example", {}, (), False, True),
    ("source route", "<@a.example,@b.example:user@dom.example>", False, False,
     "user@dom.example", "dom.example", {}, ("a.example", "b.example"), False, True),
    ("one-hop source route", "<@a.example:user@dom.example>", False, False, "user@dom.example",
     "dom.example", {}, ("a.example",), False, True),
    ("ipv4 literal", "<u@[192.0.2.1]>", False, False, "u@[192.0.2.1]", "[192.0.2.1]", {}, (),
     False, False),
    ("ipv6 literal", "<u@[IPv6:2001:db8::1]>", False, False, "u@[IPv6:2001:db8::1]",
     "[IPv6:2001:db8::1]", {}, (), False, False),
    ("bare postmaster", "<Postmaster>", False, False, "Postmaster", "", {}, (), False, False),
    ("bare local part", "<user>", True, False, "user", "", {}, (), False, False),
    ("trailing dot dropped", "<a@b.example.>", True, False, "a@b.example", "b.example", {}, (),
     False, False),
    ("underscore domain", "<a@my_host.example>", True, False, "a@my_host.example",
     "my_host.example", {}, (), False, False),
    ("utf8 local with SMTPUTF8", "<jörg@dom.example>", False, True, "jörg@dom.example",
     "dom.example", {}, (), False, False),
    ("utf8 domain with SMTPUTF8", "<a@bücher.example>", False, True, "a@bücher.example",
     "bücher.example", {}, (), False, False),
    ("long VERP local part", f"<{'x' * 200}@dom.example>", True, False,
     f"{'x' * 200}@dom.example", "dom.example", {}, (), False, False),
]


@pytest.mark.parametrize(
    "text,mail,utf8,address,domain,params,route,quoted,routed",
    [case[1:] for case in GOOD], ids=[case[0] for case in GOOD])
def test_parse_good(text, mail, utf8, address, domain, params, route, quoted, routed):
    path = parse_path(text, utf8, mail=mail)
    assert path.address == address
    assert path.domain == domain
    assert path.params == params
    assert path.route == route
    assert path.quoted is quoted
    assert path.routed is routed
    assert path.null is (address == "")


BAD = [
    ("no brackets", "a@b.example", True, False, BAD_SENDER),
    ("no brackets rcpt", "a@b.example", False, False, BAD_RCPT),
    ("no closing bracket", "<a@b.example", True, False, BAD_SENDER),
    ("empty argument", "", True, False, BAD_SENDER),
    ("display name", "Joe <a@b.example>", True, False, BAD_SENDER),
    ("null recipient", "<>", False, False, BAD_RCPT),
    ("junk after bracket", "<a@b.example>junk", True, False, BAD_SENDER),
    ("double at", "<a@b@c.example>", False, False, BAD_RCPT),
    ("empty local part", "<@b.example>", False, False, BAD_RCPT),
    ("empty quoted local part", '<""@b.example>', False, False, BAD_RCPT),
    ("leading dot", "<.a@b.example>", False, False, BAD_RCPT),
    ("double dot", "<a..b@b.example>", False, False, BAD_RCPT),
    ("trailing dot local", "<a.@b.example>", False, False, BAD_RCPT),
    ("space in local part", "<a b@b.example>", False, False, BAD_RCPT),
    ("comma in local part", "<a,b@b.example>", False, False, BAD_RCPT),
    ("comment", "<a(comment)@b.example>", False, False, BAD_RCPT),
    ("empty domain", "<a@>", False, False, BAD_RCPT),
    ("domain leading hyphen", "<a@-b.example>", False, False, BAD_RCPT),
    ("domain trailing hyphen", "<a@b-.example>", False, False, BAD_RCPT),
    ("domain double dot", "<a@b..example>", False, False, BAD_RCPT),
    ("domain two trailing dots", "<a@b.example..>", False, False, BAD_RCPT),
    ("domain label too long", f"<a@{'x' * 64}.example>", False, False, BAD_RCPT),
    ("domain too long", f"<a@{'abcdefghi.' * 26}example>", False, False, BAD_RCPT),
    ("local part too long", f"<{'x' * 257}@b.example>", False, False, BAD_RCPT),
    ("bad ipv4 literal", "<u@[192.0.2]>", False, False, BAD_RCPT),
    ("ipv6 literal without tag", "<u@[2001:db8::1]>", False, False, BAD_RCPT),
    ("ipv4 under IPv6 tag", "<u@[IPv6:192.0.2.1]>", False, False, BAD_RCPT),
    ("general literal", "<u@[x400:foo]>", False, False, BAD_RCPT),
    ("route without colon", "<@a.example,user@dom.example>", False, False, BAD_RCPT),
    ("route bad hop", "<@a.example,b.example:user@dom.example>", False, False, BAD_RCPT),
    ("route to nothing", "<@a.example:>", False, False, BAD_RCPT),
    ("unterminated quote", '<"abc@b.example>', False, False, BAD_RCPT),
    ("junk after quote", '<"abc"x@b.example>', False, False, BAD_RCPT),
    ("control char", "<a\x01b@b.example>", False, False, BAD_RCPT),
    ("tab in quoted", '<"a\tb"@b.example>', False, False, BAD_RCPT),
    ("utf8 without SMTPUTF8", "<jörg@dom.example>", False, False, UTF8),
    # Postfix refuses a non-ASCII domain without SMTPUTF8 as bad syntax (smtpd_check_addr)
    ("utf8 domain without SMTPUTF8", "<a@bücher.example>", True, False, BAD_SENDER),
]


@pytest.mark.parametrize("text,mail,utf8,reply", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_parse_bad(text, mail, utf8, reply):
    with pytest.raises(AddressError) as info:
        parse_path(text, utf8, mail=mail)
    assert str(info.value.reply) == reply


COMMAND_ARGS = [
    ("mail ok", parse_mail_arg, "FROM:<a@b.example>", "a@b.example", None),
    ("mail lower-case", parse_mail_arg, "from:<a@b.example>", "a@b.example", None),
    ("mail space after colon", parse_mail_arg, "FROM: <a@b.example>", "a@b.example", None),
    ("mail null", parse_mail_arg, "FROM:<>", "", None),
    ("mail missing FROM", parse_mail_arg, "<a@b.example>", None,
     "501 5.5.4 Syntax: MAIL FROM:<address>"),
    ("mail space before colon", parse_mail_arg, "FROM :<a@b.example>", None,
     "501 5.5.4 Syntax: MAIL FROM:<address>"),
    ("mail bad address", parse_mail_arg, "FROM:a@b.example", None, BAD_SENDER),
    # SMTPUTF8 counts as a parameter word of its own, never as text elsewhere in the line
    ("mail smtputf8 declared", parse_mail_arg, "FROM:<jörg@b.example> SMTPUTF8",
     "jörg@b.example", None),
    ("mail smtputf8 lower-case", parse_mail_arg, "FROM:<jörg@b.example> smtputf8",
     "jörg@b.example", None),
    ("mail smtputf8 in a value", parse_mail_arg, "FROM:<jörg@b.example> ENVID=SMTPUTF8", None,
     UTF8),
    ("mail smtputf8 in a keyword", parse_mail_arg, "FROM:<jörg@b.example> XSMTPUTF8", None,
     UTF8),
    ("mail smtputf8 behind a non-blank", parse_mail_arg,
     "FROM:<jörg@b.example> BODY=7BIT\x1fSMTPUTF8", None, UTF8),
    ("rcpt ok", parse_rcpt_arg, "TO:<a@b.example>", "a@b.example", None),
    ("rcpt null", parse_rcpt_arg, "TO:<>", None, BAD_RCPT),
    ("rcpt missing TO", parse_rcpt_arg, "a@b.example", None,
     "501 5.5.4 Syntax: RCPT TO:<address>"),
]


@pytest.mark.parametrize("parse,arg,address,reply", [c[1:] for c in COMMAND_ARGS],
                         ids=[c[0] for c in COMMAND_ARGS])
def test_command_args(parse, arg, address, reply):
    if reply is None:
        assert parse(arg).address == address
    else:
        with pytest.raises(AddressError) as info:
            parse(arg)
        assert str(info.value.reply) == reply


@pytest.mark.parametrize("address,expected", [
    ("a@b.example", ("a", "b.example")),
    ("user@other@dom.example", ("user@other", "dom.example")),
    ("postmaster", ("postmaster", "")),
    ("", ("", "")),
], ids=["simple", "last at wins", "no domain", "empty"])
def test_split(address, expected):
    assert split(address) == expected


FQDN = [
    ("two labels", "example.com", False, True),
    ("trailing dot", "example.com.", False, True),
    ("two trailing dots", "example.com..", False, False),
    ("single label", "localhost", False, False),
    ("empty", "", False, False),
    ("numeric", "192.0.2.1", False, False),
    ("numeric label ok", "123.example", False, True),
    ("leading hyphen", "-a.example", False, False),
    ("underscore", "_dmarc.example", False, True),
    ("label 63", f"{'a' * 63}.example", False, True),
    ("label 64", f"{'a' * 64}.example", False, False),
    ("utf8 without flag", "bücher.example", False, False),
    ("utf8 with flag", "bücher.example", True, True),
    ("space", "a b.example", False, False),
]


@pytest.mark.parametrize("domain,utf8,expected", [c[1:] for c in FQDN], ids=[c[0] for c in FQDN])
def test_is_fqdn(domain, utf8, expected):
    assert is_fqdn(domain, utf8) is expected


@pytest.mark.parametrize("name,expected", [
    ("mail.example.com", True), ("localhost", True), ("1.2.3.4", False), ("123", False),
    ("a-.example", False), ("a..example", False), ("", False), ("höst.example", False),
], ids=["fqdn", "single label", "dotted quad", "all digits", "hyphen end", "empty label",
        "empty", "non-ascii"])
def test_is_valid_hostname(name, expected):
    assert is_valid_hostname(name) is expected


@pytest.mark.parametrize("literal,expected", [
    ("[192.0.2.1]", True), ("[IPv6:::1]", True), ("[ipv6:2001:db8::1]", True),
    ("[192.0.2.256]", False), ("[2001:db8::1]", False), ("[IPv6:fe80::1%eth0]", False),
    ("[]", False), ("192.0.2.1", False),
], ids=["ipv4", "ipv6", "ipv6 tag any case", "bad octet", "untagged ipv6", "zone id",
        "empty", "no brackets"])
def test_valid_address_literal(literal, expected):
    assert valid_address_literal(literal) is expected


_PIECES = st.sampled_from([
    "<", ">", "@", ".", ",", ":", '"', "\\", " ", "\t", "=", "%", "!", "[", "]", "IPv6:",
    "a", "b.example", "user", "1.2.3.4", "::1", "-", "é", "\x00", "\x7f", "SIZE=1", "<>",
])
_TEXT = st.one_of(st.text(max_size=80), st.lists(_PIECES, max_size=25).map("".join))


@settings(max_examples=2000, deadline=None)
@given(text=_TEXT, mail=st.booleans(), utf8=st.booleans())
def test_fuzz_only_address_error(text, mail, utf8):
    try:
        path = parse_path(text, utf8, mail=mail)
    except AddressError as exc:
        assert exc.reply.code in (501, 553, 555)
        assert "\n" not in exc.reply.text and "\r" not in exc.reply.text
        return
    # Whatever parses is consistent with itself.
    assert path.address == (f"{path.local}@{path.domain}" if path.domain else path.local)
    assert mail or not path.null
    if not utf8:
        assert path.address.isascii()


@pytest.mark.parametrize(("given", "text"), [
    ("192.0.2.7", "192.0.2.7"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("2001:DB8::1", "2001:db8::1"),
    (" [IPv6:2001:db8::1] ", "2001:db8::1"),
])
def test_a_client_address_as_text(given, text):
    """client_text and plain_ip: the address as the session keeps it, and (plain_ip)
    anything else as it came."""
    assert client_text(given) == text
    assert plain_ip(given) == text
    assert client_text(text) == text
    assert plain_ip("not an address") == "not an address"
    assert plain_ip("") == ""
    with pytest.raises(ValueError):
        client_text("192.0.2.300")
