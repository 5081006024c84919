"""table_cache: the CIDR and name indexes, and the cache's invalidation rules (pure)."""

import ipaddress

import pytest

from smtpgate.lookups.table_cache import (
    MISS,
    NameIndex,
    NetworkIndex,
    TableCache,
    loaded_text,
)

NETS = {
    "PSA:0.0.0.0/0": "dunno",
    "PSA:10.0.0.0/8": "permit",
    "PSA:10.1.0.0/16": "reject",
    "PSA:10.1.2.3": "permit",
    "PSA:10.1.2.3/32": "dunno",
    "PSA:2001:db8::/32": "reject",
    "PSA:2001:db8:ab::/48": "permit",
    "PSA:2001:db8:ab::1": "dunno",
}

LOOKUPS = [
    ("default-route", "192.0.2.1", "PSA:0.0.0.0/0"),
    ("slash8", "10.9.9.9", "PSA:10.0.0.0/8"),
    ("slash16-over-slash8", "10.1.9.9", "PSA:10.1.0.0/16"),
    ("two-spellings-of-a-host-pick-one-stably", "10.1.2.3", "PSA:10.1.2.3"),
    ("ipv6-slash32", "2001:db8:1::1", "PSA:2001:db8::/32"),
    ("ipv6-slash48", "2001:db8:ab::2", "PSA:2001:db8:ab::/48"),
    ("ipv6-host", "2001:db8:ab::1", "PSA:2001:db8:ab::1"),
    ("ipv6-outside", "2001:db9::1", None),
]


def _index():
    index = NetworkIndex()
    for key, value in NETS.items():
        index.put(key, ipaddress.ip_network(key[4:], strict=False), value)
    return index


@pytest.mark.parametrize(("ip", "key"), [c[1:] for c in LOOKUPS], ids=[c[0] for c in LOOKUPS])
def test_most_specific(ip, key):
    found = _index().lookup(ipaddress.ip_address(ip))
    assert (found[0] if found else None) == key


def test_discard_falls_back_to_shorter_prefix():
    index = _index()
    index.discard("PSA:10.1.0.0/16")
    assert index.lookup(ipaddress.ip_address("10.1.9.9"))[0] == "PSA:10.0.0.0/8"
    index.discard("PSA:10.0.0.0/8")
    index.discard("PSA:0.0.0.0/0")
    assert index.lookup(ipaddress.ip_address("10.1.9.9")) is None
    assert len(index) == len(NETS) - 3


def test_discard_one_spelling_keeps_the_other():
    index = _index()
    index.discard("PSA:10.1.2.3")
    assert index.lookup(ipaddress.ip_address("10.1.2.3")) == ("PSA:10.1.2.3/32", "dunno")


def test_name_index_is_case_insensitive():
    names = NameIndex()
    names.put("HLO:REJECTEDMESSAGE", "REJECTEDMESSAGE", "permit")
    names.put("REV:mail.example.net.", "mail.example.net.", "permit")
    assert names.lookup("RejectedMessage") == ("HLO:REJECTEDMESSAGE", "permit")
    assert names.lookup("MAIL.example.net") == ("REV:mail.example.net.", "permit")
    names.discard("HLO:REJECTEDMESSAGE")
    assert names.lookup("rejectedmessage") is None


def test_cache_apply_routes_networks_and_names():
    cache = TableCache()
    cache.load([("PSA:192.0.2.0/24", "reject"), ("REV:host.example", "permit"),
                ("VDOM:Example.COM", "x"), ("VALI:a@b.c", "ignored: not scanned")])
    assert cache.lookup_ip("PSA", ipaddress.ip_address("192.0.2.5"))[1] == "reject"
    assert cache.lookup_name("REV", "HOST.example")[1] == "permit"
    assert cache.lookup_name("VDOM", "example.com")[1] == "x"
    cache.apply("PSA:192.0.2.0/24", None)
    assert cache.lookup_ip("PSA", ipaddress.ip_address("192.0.2.5")) is None


def test_point_cache_needs_ready_and_current_generation():
    cache = TableCache()
    cache.put("VALI:a@b.c", "x@b.c", cache.generation)
    assert cache.get("VALI:a@b.c") is MISS  # not ready: nothing is kept
    cache.ready = True
    gen = cache.generation
    cache.put("VALI:a@b.c", "x@b.c", gen)
    cache.put("VALI:none@b.c", None, gen)  # absent keys are cached too
    assert cache.get("VALI:a@b.c") == "x@b.c"
    assert cache.get("VALI:none@b.c") is None
    stale = cache.generation
    cache.invalidate(["VALI:a@b.c"])
    assert cache.get("VALI:a@b.c") is MISS
    cache.put("VALI:a@b.c", "old@b.c", stale)  # read before the invalidation: dropped
    assert cache.get("VALI:a@b.c") is MISS
    cache.invalidate(None)
    assert cache.get("VALI:none@b.c") is MISS


def test_point_cache_is_bounded_lru():
    cache = TableCache(max_entries=2)
    cache.ready = True
    for name in ("a", "b"):
        cache.put(f"VALI:{name}@x.y", name, cache.generation)
    cache.get("VALI:a@x.y")  # a is now the most recent
    cache.put("VALI:c@x.y", "c", cache.generation)
    assert cache.get("VALI:b@x.y") is MISS
    assert cache.get("VALI:a@x.y") == "a"


def test_clear_makes_not_ready():
    cache = TableCache()
    cache.ready = True
    cache.load([("PSA:10.0.0.0/8", "permit")])
    cache.clear()
    assert not cache.ready
    assert cache.lookup_ip("PSA", ipaddress.ip_address("10.0.0.1")) is None


def test_the_load_is_logged_in_words_not_as_a_dict():
    assert loaded_text({"PSA": 2, "REV": 0, "HLO": 1, "VDOM": 1, "point": 0}) == (
        "PSA 2 keys, REV 0 keys, HLO 1 key, VDOM 1 key, 0 point lookups remembered")
