"""redis_url: the grammar of REDIS (one server, Sentinel, Cluster) and password masking (pure)."""

import pytest

from smtpgate.redis_url import mask, parse

GOOD = [
    ("bare-host", "redis", "single", "redis://redis:6379/0", (), "", 0, None),
    ("host-port", "redis:6380", "single", "redis://redis:6380/0", (), "", 0, None),
    ("url-kept", "rediss://:pw@r.example:6380/2", "single", "rediss://:pw@r.example:6380/2", (),
     "", 0, None),
    ("sentinel", "redis+sentinel://:pw@s1:26379,s2:26380/mymaster/3", "sentinel", None,
     (("s1", 26379), ("s2", 26380)), "mymaster", 3, "pw"),
    ("sentinel-default-port-and-db", "redis+sentinel://s1,[2001:db8::1]/mx", "sentinel", None,
     (("s1", 26379), ("2001:db8::1", 26379)), "mx", 0, None),
    ("cluster", "redis+cluster://u:pw@c1:7000,c2:7001/", "cluster", None,
     (("c1", 7000), ("c2", 7001)), "", 0, "pw"),
    ("cluster-no-path", "redis+cluster://c1", "cluster", None, (("c1", 6379),), "", 0, None),
]


@pytest.mark.parametrize(("value", "kind", "url", "nodes", "service", "db", "password"),
                         [g[1:] for g in GOOD], ids=[g[0] for g in GOOD])
def test_parse(value, kind, url, nodes, service, db, password):
    target = parse(value)
    assert (target.kind, target.url, target.nodes, target.service, target.db, target.password) \
        == (kind, url or value, nodes, service, db, password)


def test_sentinel_password_of_its_own():
    target = parse("redis+sentinel://app:pw@s1/mx?sentinel_password=s%20pw")
    assert (target.username, target.password, target.sentinel_password) == ("app", "pw", "s pw")


BAD = [
    ("empty", " ", "is empty"),
    ("scheme", "http://r:6379", "scheme 'http' is not one of"),
    ("no-server", "redis+cluster://", "names no server"),
    ("no-hosts", "redis+cluster:///", "names no server"),
    ("sentinel-no-master", "redis+sentinel://s1:26379", "the path must be /mastername"),
    ("sentinel-bad-db", "redis+sentinel://s1/mx/one", "database 'one' is not a number"),
    ("cluster-db", "redis+cluster://c1:7000/1", "only database 0"),
    ("bad-port", "redis+cluster://c1:0/", "'c1:0' is not host:port"),
    ("unknown-parameter", "redis+cluster://c1/?sentinel_password=x", "unknown parameter"),
    ("password-not-echoed", "redis+sentinel://:hunter2@s1/mx/x", "redis+sentinel://:***@"),
]


@pytest.mark.parametrize(("value", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_refused(value, message):
    with pytest.raises(ValueError) as caught:
        parse(value)
    assert message in str(caught.value)
    assert "hunter2" not in str(caught.value)


MASKS = [
    ("no-password", "redis://r:6379/0", "redis://r:6379/0"),
    ("password", "redis://:pw@r:6379/0", "redis://:***@r:6379/0"),
    ("user-password", "redis://u:pw@r/0", "redis://u:***@r/0"),
    ("unix", "unix://:p/w@/run/redis.sock?db=1", "unix://:***@/run/redis.sock?db=1"),
    ("sentinel-both", "redis+sentinel://:pw@s1,s2/mx/0?sentinel_password=spw",
     "redis+sentinel://:***@s1,s2/mx/0?sentinel_password=***"),
    ("cluster", "redis+cluster://u:pw@c1:7000,c2:7001/", "redis+cluster://u:***@c1:7000,c2:7001/"),
    # generated passwords: "/", "?" and "#" must not end the masking early
    ("slash", "redis://:ab/cd@h:6379/0", "redis://:***@h:6379/0"),
    ("question-hash", "redis://user:p?w#x@h/0", "redis://user:***@h/0"),
    ("at-in-a-query-value", "redis+sentinel://s1/mx/0?sentinel_password=a@b",
     "redis+sentinel://:***@b"),  # more hidden than needed, never less
]


@pytest.mark.parametrize("url", ["redis+sentinel://:se/cret@h1:26379/m",
                                 "redis+cluster://:p?x@h1:7000/"])
def test_an_unencoded_password_is_never_in_the_error(url):
    with pytest.raises(ValueError) as refused:
        parse(url)
    assert "cret" not in str(refused.value) and "p?x" not in str(refused.value)
    assert "percent-encoded" in str(refused.value)


@pytest.mark.parametrize(("url", "shown"), [m[1:] for m in MASKS], ids=[m[0] for m in MASKS])
def test_mask(url, shown):
    assert mask(url) == shown
