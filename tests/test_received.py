"""The Received header smtpgate writes, as labelled cases."""

from __future__ import annotations

import datetime
import email.utils

import pytest

from smtpgate.smtp.received import received_header

WHEN = datetime.datetime(2026, 11, 29, 12, 0, 0, tzinfo=datetime.UTC)
TLS = ("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256)

CASES = [
    ("plain-esmtp", dict(esmtp=True, tls=None, login=False, recipients=("u@example.com",)),
     "Received: from client.example.org (host.example.org [192.0.2.1])\r\n"
     "\tby mx.example.com (smtpgate) with ESMTP\r\n"
     "\tfor <u@example.com>; Sun, 29 Nov 2026 12:00:00 +0000\r\n"),
    ("tls-and-auth", dict(esmtp=True, tls=TLS, login=True, recipients=("u@example.com",)),
     "Received: from client.example.org (host.example.org [192.0.2.1])\r\n"
     "\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\r\n"
     "\tby mx.example.com (smtpgate) with ESMTPSA\r\n"
     "\tfor <u@example.com>; Sun, 29 Nov 2026 12:00:00 +0000\r\n"),
    ("helo-smtp-two-recipients-not-listed",
     dict(esmtp=False, tls=None, login=False, recipients=("a@example.com", "b@example.com")),
     "Received: from client.example.org (host.example.org [192.0.2.1])\r\n"
     "\tby mx.example.com (smtpgate) with SMTP; Sun, 29 Nov 2026 12:00:00 +0000\r\n"),
]


@pytest.mark.parametrize(("facts", "header"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_received_header(facts, header):
    got = received_header("client.example.org", "host.example.org", "192.0.2.1",
                          "mx.example.com", when=WHEN, **facts)
    assert got.decode() == header


def test_ipv6_client_and_hostile_helo_stay_one_header():
    got = received_header("evil\r\nX-Injected: yes", "unknown", "2001:db8::1", "mx.example.com",
                          esmtp=True, tls=None, login=False, recipients=(), when=WHEN)
    assert got.startswith(b"Received: from evil??X-Injected: yes (unknown [IPv6:2001:db8::1])")
    assert got.count(b"\r\n") == 2 and b"\r\nX-Injected" not in got


def test_the_date_made_once_a_second_is_the_date_of_each_message():
    plus2 = datetime.timezone(datetime.timedelta(hours=2))
    times = [WHEN, WHEN.astimezone(plus2), WHEN.replace(microsecond=999_999),
             WHEN + datetime.timedelta(seconds=1),
             WHEN.replace(tzinfo=plus2), WHEN.replace(tzinfo=plus2, microsecond=5), WHEN]
    for when in times:
        header = received_header("h.example", "n.example", "192.0.2.1", "mx.example.com",
                                 esmtp=True, tls=None, login=False, recipients=(),
                                 when=when)
        date = email.utils.format_datetime(when.replace(microsecond=0))
        assert header.endswith(f"; {date}\r\n".encode()), (when, header)
