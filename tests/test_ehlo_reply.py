"""EHLO's answer (Dialogue.ehlo_reply) follows the session's state, made once per state."""

from __future__ import annotations

from smtpgate.policy.state import MX, SUBMISSION
from smtpgate.smtp.dialogue import Dialogue

TAIL = ("ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8")


def lines(reply: str) -> list[str]:
    assert all(line.startswith("250-") for line in reply.split("\r\n")[:-1])
    assert reply.split("\r\n")[-1].startswith("250 ")
    return [line[4:] for line in reply.split("\r\n")]


def test_each_state_gets_its_own_keywords_asked_in_any_order():
    mx = Dialogue(MX, offers_tls=True, offers_auth=True)
    submission = Dialogue(SUBMISSION, offers_tls=True, offers_auth=True)
    # asked twice, in turns: an answer made for one state is never given to another
    for _ in range(2):
        assert lines(mx.ehlo_reply("mx.example", 1000, TAIL)) == [
            "mx.example", "PIPELINING", "SIZE 1000", "STARTTLS", *TAIL]
        assert lines(mx.ehlo_reply("mx.example", 0, TAIL)) == [
            "mx.example", "PIPELINING", "STARTTLS", *TAIL]
        assert lines(mx.ehlo_reply("other.example", 1000, TAIL[:1])) == [
            "other.example", "PIPELINING", "SIZE 1000", "STARTTLS", "ENHANCEDSTATUSCODES"]
        assert lines(submission.ehlo_reply("mx.example", 1000, TAIL)) == [
            "mx.example", "PIPELINING", "SIZE 1000", "STARTTLS", *TAIL]
    submission.tls_started()
    assert lines(submission.ehlo_reply("mx.example", 1000, TAIL)) == [
        "mx.example", "PIPELINING", "SIZE 1000", "AUTH PLAIN LOGIN", *TAIL]
    submission.authenticated("user")
    assert lines(submission.ehlo_reply("mx.example", 1000, TAIL)) == [
        "mx.example", "PIPELINING", "SIZE 1000", *TAIL]
    mx.tls_started()  # no AUTH on port 25, TLS or not
    assert lines(mx.ehlo_reply("mx.example", 1000, TAIL)) == [
        "mx.example", "PIPELINING", "SIZE 1000", *TAIL]
    plain = Dialogue(MX)
    assert lines(plain.ehlo_reply("mx.example", 1000, TAIL)) == [
        "mx.example", "PIPELINING", "SIZE 1000", *TAIL]
