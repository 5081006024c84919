"""AUTH's responses as Postfix's smtpd reads them: a table of cases, no session."""

from __future__ import annotations

import base64

import pytest

from smtpgate import replies
from smtpgate.smtp.sasl import MECHANISMS, as_plain, decode_response, login_of


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize(("text", "meant"), [
    pytest.param(b64(b"\0user1@example.com\0secret1"), b"\0user1@example.com\0secret1",
                 id="base64"),
    pytest.param("=", b"", id="empty-initial-response"),
    pytest.param("*", replies.AUTH_CANCELLED, id="cancelled"),
    pytest.param("not base64!", replies.AUTH_BAD_BASE64, id="not-base64"),
    pytest.param("dXNlcg", replies.AUTH_BAD_BASE64, id="unpadded"),
])
def test_a_response(text, meant):
    assert decode_response(text) == meant


@pytest.mark.parametrize(("mechanism", "responses", "plain", "login"), [
    pytest.param("PLAIN", [b"\0u@example.com\0pw"], b"\0u@example.com\0pw", "u@example.com",
                 id="plain"),
    pytest.param("PLAIN", [b"admin\0u@example.com\0pw"], b"admin\0u@example.com\0pw",
                 "u@example.com", id="plain-with-authzid"),
    pytest.param("LOGIN", [b"u@example.com", b"pw"], b"\0u@example.com\0pw", "u@example.com",
                 id="login"),
    pytest.param("PLAIN", [b"no separators"], b"no separators", "", id="malformed"),
])
def test_what_the_authenticator_is_given(mechanism, responses, plain, login):
    assert len(responses) == len(MECHANISMS[mechanism])
    assert as_plain(mechanism, responses) == plain
    assert login_of(plain) == login
