"""The pure DANE parts: which TLSA records a chain matches, and which certificate to serve."""

from __future__ import annotations

import datetime

import pytest
from dane_certs import Issuer

from smtpgate.lookups.tlsa import TlsaAnswer
from smtpgate.smtp.certificate import CertificateInfo
from smtpgate.smtp.dane import TlsaRecord, chain_matches, choose, publish_line, record_matches

UTC = datetime.UTC
NOW = datetime.datetime.now(UTC)
DAY = datetime.timedelta(days=1)
WEEK = 7 * 86400.0
NAME = "_25._tcp.mx.example.test"

ISSUER = Issuer()
OTHER_ISSUER = Issuer("Another CA")
OLD = ISSUER.issue()
SAME_KEY = ISSUER.issue(key=OLD.key)  # a renewal that kept the key
NEW_KEY = ISSUER.issue()  # a renewal with a new key, same CA
ELSEWHERE = OTHER_ISSUER.issue()  # a new key from another CA


def record(pair, usage, selector, matching) -> TlsaRecord:
    return TlsaRecord.parse(pair.tlsa(usage, selector, matching))


MATCHING = [
    # label, record, chain, matches
    ("3 1 1 of the key", record(OLD, 3, 1, 1), OLD, True),
    ("3 1 1 survives a renewal with the same key", record(OLD, 3, 1, 1), SAME_KEY, True),
    ("3 1 1 misses a new key", record(OLD, 3, 1, 1), NEW_KEY, False),
    ("3 0 1 of the certificate", record(OLD, 3, 0, 1), OLD, True),
    ("3 0 1 misses the renewal even with the same key", record(OLD, 3, 0, 1), SAME_KEY, False),
    ("3 1 2 (SHA-512)", record(OLD, 3, 1, 2), OLD, True),
    ("3 0 0 (the whole certificate)", record(OLD, 3, 0, 0), OLD, True),
    ("3 1 0 (the whole key)", record(OLD, 3, 1, 0), SAME_KEY, True),
    ("2 0 1 of the CA matches any leaf it issued", record(OLD, 2, 0, 1), NEW_KEY, True),
    ("2 1 1 of the CA's key", record(OLD, 2, 1, 1), NEW_KEY, True),
    ("2 1 1 misses a leaf from another CA", record(OLD, 2, 1, 1), ELSEWHERE, False),
    ("2 x x is not matched against the leaf", TlsaRecord.parse(OLD.tlsa(3, 1, 1).replace(
        "3", "2", 1)), OLD, False),
    ("1 1 1 (PKIX-EE) is not usable in SMTP", TlsaRecord.parse(OLD.tlsa(3, 1, 1).replace(
        "3", "1", 1)), OLD, False),
    ("an unknown matching type", TlsaRecord(3, 1, 7, b"\0"), OLD, False),
]


@pytest.mark.parametrize(("label", "tlsa", "pair", "expected"), MATCHING,
                         ids=[row[0] for row in MATCHING])
def test_record_matches(label, tlsa, pair, expected):
    assert record_matches(tlsa, pair.chain) is expected


def test_record_parse():
    parsed = TlsaRecord.parse("3 1 1 AB CD ef")
    assert (parsed.usage, parsed.selector, parsed.matching, parsed.data) == (3, 1, 1,
                                                                              b"\xab\xcd\xef")
    assert str(parsed) == "3 1 1 abcdef"
    for bad in ("", "3 1 1", "3 1 x ab", "3 1 1 abc", "three 1 1 ab"):
        with pytest.raises(ValueError, match="not a TLSA record"):
            TlsaRecord.parse(bad)


def test_publish_line_is_the_keys_3_1_1_record():
    line = publish_line(NAME, NEW_KEY.chain)
    assert line == f"_25._tcp.mx.example.test. IN TLSA 3 1 1 {NEW_KEY.spki_sha256}"
    assert chain_matches((TlsaRecord.parse(line.split(" TLSA ")[1]),), NEW_KEY.chain)


def info(pair, days_left: float = 60, started: bool = True) -> CertificateInfo:
    """What read_certificate would say of the pair, with its times set relative to NOW."""
    return CertificateInfo(
        names=("mx.example.test",), not_after=NOW + days_left * DAY, key_matches=True,
        cert_path=f"/etc/letsencrypt/live/mx/{id(pair)}.pem", key_path="privkey.pem",
        not_before=NOW - DAY if started else NOW + DAY, chain=pair.chain)


def answer(*values, validated=True, status=None) -> TlsaAnswer:
    return TlsaAnswer(NAME, status or ("ok" if values else "nxdomain"), tuple(values), 300,
                      validated)


OLD_311 = OLD.tlsa(3, 1, 1)
CHOICES = [
    # label, answer, serving, renewed, (serve, state, level)
    ("no records: the renewal is served", answer(), info(OLD), info(NEW_KEY),
     ("renewed", "no_records", "info")),
    ("no data: the same", answer(status="nodata"), info(OLD), info(NEW_KEY),
     ("renewed", "no_records", "info")),
    ("only PKIX records: none usable, DANE not in use", answer(OLD_311.replace("3", "1", 1)),
     info(OLD), info(NEW_KEY), ("renewed", "no_records", "info")),
    ("not validated: cannot tell, the renewal is served", answer(OLD_311, validated=False),
     info(OLD), info(NEW_KEY), ("renewed", "unknown", "warning")),
    ("lookup failed: cannot tell", answer(status="tempfail"), info(OLD), info(NEW_KEY),
     ("renewed", "unknown", "warning")),
    ("the renewal matches: served", answer(OLD_311), info(OLD), info(SAME_KEY),
     ("renewed", "match", "info")),
    ("the renewal matches a record published beside the old one",
     answer(OLD_311, NEW_KEY.tlsa(3, 1, 1)), info(OLD), info(NEW_KEY),
     ("renewed", "match", "info")),
    ("the renewal matches the CA's 2 1 1", answer(OLD.tlsa(2, 1, 1)), info(OLD),
     info(NEW_KEY), ("renewed", "match", "info")),
    ("a new key matching nothing: held while the old one has 30 days",
     answer(OLD_311), info(OLD, 30), info(NEW_KEY), ("serving", "held", "warning")),
    ("held by a 3 0 1 record too", answer(OLD.tlsa(3, 0, 1)), info(OLD, 30), info(SAME_KEY),
     ("serving", "held", "warning")),
    ("held by 2 1 1 when the renewal comes from another CA", answer(OLD.tlsa(2, 1, 1)),
     info(OLD, 30), info(ELSEWHERE), ("serving", "held", "warning")),
    ("7 days or less left: switched, loudly", answer(OLD_311), info(OLD, 6.9),
     info(NEW_KEY), ("renewed", "mismatch", "error")),
    ("the old one expired: switched", answer(OLD_311), info(OLD, -1), info(NEW_KEY),
     ("renewed", "mismatch", "error")),
    ("the old one not valid yet: not held", answer(OLD_311), info(OLD, 30, started=False),
     info(NEW_KEY), ("renewed", "mismatch", "error")),
    ("neither matches: nothing to keep, the renewal is served",
     answer(ELSEWHERE.tlsa(3, 1, 1)), info(OLD), info(NEW_KEY),
     ("renewed", "mismatch", "warning")),
    ("no renewal, matching", answer(OLD_311), info(OLD), None, ("serving", "match", "info")),
    ("no renewal, matching nothing", answer(NEW_KEY.tlsa(3, 1, 1)), info(OLD), None,
     ("serving", "mismatch", "warning")),
]


@pytest.mark.parametrize(("label", "tlsa", "serving", "renewed", "expected"), CHOICES,
                         ids=[row[0] for row in CHOICES])
def test_choose(label, tlsa, serving, renewed, expected):
    choice = choose(tlsa, serving, renewed, NOW, WEEK)
    assert (choice.serve, choice.state, choice.level) == expected
    assert NAME in choice.text
    if choice.state in ("held", "mismatch"):
        served_next = renewed if renewed is not None else serving
        key = served_next.chain[0].public_key()
        wanted = next(p for p in (OLD, NEW_KEY, SAME_KEY, ELSEWHERE)
                      if p.chain[0].public_key() == key)
        assert choice.publish == f"{NAME}. IN TLSA 3 1 1 {wanted.spki_sha256}"
        assert choice.publish in choice.text
    else:
        assert choice.publish == ""


def test_held_text_says_what_to_do():
    choice = choose(answer(OLD_311), info(OLD, 30), info(NEW_KEY), NOW, WEEK)
    assert "30.0 days left" in choice.text and "7 days are left" in choice.text
    assert f"publish beside the current record: {NAME}. IN TLSA 3 1 1" in choice.text
