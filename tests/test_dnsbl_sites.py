"""The postscreen_dnsbl_sites grammar: parse, match, and say which item is bad."""

import pytest

from smtpgate.dnsbl_sites import DnsblSite, is_error_answer, parse_site, parse_sites


@pytest.mark.parametrize(
    ("item", "zone", "filter_text", "weight"),
    [
        ("zen.spamhaus.org", "zen.spamhaus.org", None, 1),
        ("zen.spamhaus.org*3", "zen.spamhaus.org", None, 3),
        ("zen.spamhaus.org=127.0.0.[2..11]*3", "zen.spamhaus.org", "127.0.0.[2..11]", 3),
        ("list.dnswl.org=127.0.[0..255].[1..3]*-2", "list.dnswl.org", "127.0.[0..255].[1..3]", -2),
        ("wl.mailspike.net=127.0.0.[17;18]*-1", "wl.mailspike.net", "127.0.0.[17;18]", -1),
        ("Bl.Example.ORG.=127.0.0.2", "bl.example.org", "127.0.0.2", 1),
        ("b.org=[127.0.0.2]*+2", "b.org", "[127.0.0.2]", 2),
        ("key_1.zen.dq.spamhaus.net*0", "key_1.zen.dq.spamhaus.net", None, 0),
    ],
    ids=["bare", "weight", "range+weight", "dnswl-negative", "list", "case-dot", "bracketed",
         "underscore-zero"],
)
def test_parse_site(item, zone, filter_text, weight):
    site = parse_site(item)
    assert (site.zone, site.filter, site.weight) == (zone, filter_text, weight)


def test_parse_sites_splits_on_commas_and_space_and_keeps_order():
    sites = parse_sites(" a.org=127.0.0.2, b.org*2\n\tc.org=127.0.0.[1;3]*-1 ,")
    assert [str(s) for s in sites] == ["a.org=127.0.0.2", "b.org*2", "c.org=127.0.0.[1;3]*-1"]
    assert parse_sites("") == ()


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("zen.spamhaus.org=127.0.0.[2..x]",
         "'zen.spamhaus.org=127.0.0.[2..x]': bad filter: numeric range error"),
        ("a.org=127.0.0", "'a.org=127.0.0': bad filter: need \".\""),
        ("a.org=127.0.0.256", "bad filter: need decimal number 0..255"),
        ("a.org=127.0.0.2.3", "bad filter: garbage after pattern"),
        ("a.org=127.0.0.[5..2]", "bad filter: numeric range error"),
        ("a.org=127.0.0.[]", "bad filter: need decimal number 0..255"),
        ("a.org=127.0.0.[2", "bad filter: need \";\" or \"]\""),
        ("a.org=[127.0.0.2", "bad filter: missing \"]\" character"),
        ("a.org=127.0.[1.2].3", "bad filter"),
        ("a.org=", "bad filter: empty address pattern"),
        ("a.org*x", "'a.org*x': bad weight 'x'"),
        ("a.org*", "bad weight ''"),
        ("a.org*1.5", "bad weight '1.5'"),
        ("=127.0.0.2", "bad DNSBL domain name ''"),
        ("1.2.3.4", "bad DNSBL domain name '1.2.3.4'"),
        ("a..org", "bad DNSBL domain name 'a..org'"),
        ("-a.org", "bad DNSBL domain name '-a.org'"),
    ],
    ids=["bad-range-bound", "three-fields", "octet-256", "five-fields", "reversed-range",
         "empty-list", "unclosed-list", "unclosed-outer", "list-spans-fields", "empty-filter",
         "weight-word", "weight-empty", "weight-fraction", "no-zone", "numeric-zone",
         "empty-label", "leading-hyphen"],
)
def test_bad_item_is_named(item, message):
    with pytest.raises(ValueError) as info:
        parse_sites(f"good.org {item}")
    assert message in str(info.value)
    assert repr(item) in str(info.value)


def test_error_points_at_the_bad_spot():
    with pytest.raises(ValueError, match=r'at "127\.0\.0\.\[2\.\.>x<\]"'):
        parse_site("zen.spamhaus.org=127.0.0.[2..x]")


@pytest.mark.parametrize(
    ("item", "answer", "expected"),
    [
        ("z.org", "127.0.0.2", True),
        ("z.org", "127.0.0.200", True),
        ("z.org=127.0.0.2", "127.0.0.2", True),
        ("z.org=127.0.0.2", "127.0.0.3", False),
        ("z.org=127.0.0.[2..11]", "127.0.0.11", True),
        ("z.org=127.0.0.[2..11]", "127.0.0.12", False),
        ("z.org=127.0.0.[2..11]", "127.0.0.1", False),
        ("z.org=127.0.[0..255].[1;3..5]", "127.0.7.4", True),
        ("z.org=127.0.[0..255].[1;3..5]", "127.0.7.2", False),
        ("z.org=127.0.[0..255].[1;3..5]", "127.1.7.1", False),
        ("z.org=[127.0.0.2]", "127.0.0.2", True),
        ("z.org=127.0.0.2", "not-an-address", False),
        ("z.org", "::1", False),
    ],
    ids=["no-filter", "no-filter-any", "exact", "exact-miss", "range-top", "range-above",
         "range-below", "mixed-hit", "mixed-gap", "mixed-other-octet", "bracketed",
         "junk-answer", "ipv6-answer"],
)
def test_matches(item, answer, expected):
    assert parse_site(item).matches(answer) is expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("127.0.0.2", False),
        ("127.0.0.10", False),
        ("127.0.11.3", False),
        ("127.255.255.252", True),
        ("127.255.255.254", True),
        ("127.255.255.255", True),
        ("10.0.0.1", True),
        ("0.0.0.0", True),
        ("junk", True),
    ],
    ids=["listed", "listed-pbl", "dnswl", "spamhaus-typo", "spamhaus-public-resolver",
         "spamhaus-volume", "outside-127", "zero", "junk"],
)
def test_is_error_answer(answer, expected):
    assert is_error_answer(answer) is expected


def test_site_is_a_value():
    assert parse_site("a.org=127.0.0.2*2") == DnsblSite("a.org", "127.0.0.2", 2)
