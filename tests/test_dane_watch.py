"""The DANE watch of one worker, in process: real certificate files, a real TlsProvider, and a
validating unbound over a signed zone (conftest's signed_zone) answering with the AD bit."""

from __future__ import annotations

import dataclasses
import datetime
import logging
from types import SimpleNamespace

import pytest
from dane_certs import Issuer
from services.ports import free_port

from smtpgate.config import Config, HostPort
from smtpgate.lookups.tlsa import lookup_tlsa
from smtpgate.service.dane_watch import TEMPFAIL_RETRY, DaneWatch
from smtpgate.smtp.tls import TlsProvider

NAME = "_25._tcp.mx.example.test"
ISSUER = Issuer()


@pytest.fixture
def zone(signed_zone):
    yield signed_zone
    signed_zone.set([])
    signed_zone.set_plain([])


def watch_over(directory, pair, zone, hostname="mx.example.test", **settings):
    """A DaneWatch over a provider serving pair's files, asking zone's resolver."""
    provider = TlsProvider(*pair.write(directory))
    config = dataclasses.replace(
        Config(), hostname=hostname, nameservers=(HostPort(zone.host, zone.port),),
        dns_timeout=2.0, **settings)
    return DaneWatch(SimpleNamespace(tls=provider, config=config)), provider


def serial(provider) -> int:
    return provider.info.chain[0].serial_number


async def test_lookup_reads_the_ad_bit(zone):
    old = ISSUER.issue()
    zone.set([(NAME, "TLSA", old.tlsa(3, 1, 1), 120)])
    zone.set_plain([("_25._tcp.mx.plain.test", "TLSA", old.tlsa(3, 1, 1), 120)])
    servers = (HostPort(zone.host, zone.port),)
    signed = await lookup_tlsa("mx.example.test", servers, 2.0)
    assert (signed.status, signed.values, signed.ttl, signed.validated) == (
        "ok", (old.tlsa(3, 1, 1),), 120, True)
    plain = await lookup_tlsa("MX.plain.test.", servers, 2.0)
    assert (plain.name, plain.status, plain.validated) == ("_25._tcp.mx.plain.test", "ok", False)
    missing = await lookup_tlsa("other.example.test", servers, 2.0)
    assert (missing.status, missing.validated) == ("nxdomain", True)
    no_tlsa = await lookup_tlsa("mx.example.test", servers, 2.0, port=587)
    assert no_tlsa.status in ("nxdomain", "nodata") and no_tlsa.values == ()


async def test_a_renewal_is_held_until_its_record_is_published(zone, tmp_path, caplog):
    old, new = ISSUER.issue(), ISSUER.issue()
    zone.set([(NAME, "TLSA", old.tlsa(3, 1, 1), 30)])
    watch, provider = watch_over(tmp_path, old, zone, dane_recheck_time=3600.0)
    assert await watch.check() == 30  # the records' TTL, shorter than the recheck time
    assert provider.dane.state == "match"

    new.write(tmp_path)
    caplog.set_level(logging.INFO, "smtpgate")
    assert provider.reload_if_changed()  # read, hooked to the watch, not served yet
    assert watch._wake.is_set() and serial(provider) == old.serial
    await watch.check()
    assert provider.dane.state == "held" and serial(provider) == old.serial
    assert provider.renewed.chain[0].serial_number == new.serial
    held = [r for r in caplog.records if r.levelno == logging.WARNING and "DANE" in r.message]
    assert len(held) == 1
    assert f"publish beside the current record: {NAME}. IN TLSA 3 1 1 {new.spki_sha256}" \
        in held[0].message

    await watch.check()  # the same again: not logged again (until an hour has passed)
    assert len([r for r in caplog.records if "DANE" in r.message]) == 1

    zone.set([(NAME, "TLSA", old.tlsa(3, 1, 1), 30), (NAME, "TLSA", new.tlsa(3, 1, 1), 30)])
    await watch.check()
    assert provider.dane.state == "match" and serial(provider) == new.serial
    assert provider.renewed is None
    assert "matches a TLSA record" in caplog.records[-1].message


async def test_a_renewal_is_served_when_the_old_one_has_a_week_left(zone, tmp_path, caplog):
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=6)
    old, new = ISSUER.issue(not_after=soon), ISSUER.issue()
    zone.set([(NAME, "TLSA", old.tlsa(3, 0, 1), 300)])
    watch, provider = watch_over(tmp_path, old, zone)
    await watch.check()  # at start
    new.write(tmp_path)
    provider.reload_if_changed()
    await watch.check()
    assert serial(provider) == new.serial and provider.dane.state == "mismatch"
    error = next(r for r in caplog.records if r.levelno == logging.ERROR)
    assert "switching to the renewed TLS certificate" in error.message
    assert new.spki_sha256 in error.message


async def test_the_hold_ends_when_the_old_one_nears_its_end(zone, tmp_path):
    """dane_hold_time decides: a hold of 90 days is more than the old one has left."""
    old, new = ISSUER.issue(), ISSUER.issue()
    zone.set([(NAME, "TLSA", old.tlsa(3, 1, 1), 300)])
    watch, provider = watch_over(tmp_path, old, zone, dane_hold_time=89 * 86400.0)
    await watch.check()
    new.write(tmp_path)
    provider.reload_if_changed()
    await watch.check()
    assert provider.dane.state == "held"
    watch.gate.config = dataclasses.replace(watch.gate.config, dane_hold_time=90 * 86400.0)
    await watch.check()
    assert serial(provider) == new.serial and provider.dane.state == "mismatch"


@pytest.mark.parametrize(("label", "hostname", "records", "state"), [
    ("an answer without AD: cannot tell", "mx.plain.test", "plain", "unknown"),
    ("no TLSA records: nothing to do", "mx.example.test", None, "no_records"),
])
async def test_renewals_served_at_once_when_dane_is_not_in_use(zone, tmp_path, label, hostname,
                                                                records, state):
    old, new = ISSUER.issue(hostname), ISSUER.issue(hostname)
    if records == "plain":
        zone.set_plain([(f"_25._tcp.{hostname}", "TLSA", old.tlsa(3, 1, 1), 300)])
    watch, provider = watch_over(tmp_path, old, zone, hostname=hostname)
    await watch.check()
    assert provider.dane.state == state
    new.write(tmp_path)
    provider.reload_if_changed()
    await watch.check()
    assert serial(provider) == new.serial and provider.dane.state == state


async def test_a_failed_lookup_decides_on_the_last_answer(zone, tmp_path, caplog):
    old, new = ISSUER.issue(), ISSUER.issue()
    zone.set([(NAME, "TLSA", old.tlsa(3, 1, 1), 300)])
    watch, provider = watch_over(tmp_path, old, zone)
    await watch.check()
    new.write(tmp_path)
    provider.reload_if_changed()
    silent = HostPort("127.0.0.1", free_port(udp=True))  # no server there: a timeout
    watch.gate.config = dataclasses.replace(watch.gate.config, nameservers=(silent,),
                                            dns_timeout=0.5)
    assert await watch.check() == TEMPFAIL_RETRY
    assert provider.dane.state == "held" and serial(provider) == old.serial
    assert "deciding on the last answer" in caplog.text


async def test_dane_check_off_serves_renewals_at_once(zone, tmp_path):
    old, new = ISSUER.issue(), ISSUER.issue()
    zone.set([(NAME, "TLSA", old.tlsa(3, 1, 1), 300)])
    watch, provider = watch_over(tmp_path, old, zone, dane_check=False)
    await watch.check()
    assert provider.on_renewal is None and provider.dane is None
    new.write(tmp_path)
    provider.reload_if_changed()
    assert serial(provider) == new.serial

