"""`smtpgate explain`: the policy as a dry run, against the real Redis and DNS."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from smtpgate.lookups import keys


def explain(redis_server, dns_server, *args: str, **settings: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "REDIS": redis_server.url, "SMTPGATE_NAMESERVERS": dns_server.nameserver,
           "SMTPGATE_MYNETWORKS": "", "HOSTNAME": "mx.example.test", "SMTPGATE_ENV_FILE": "",
           **settings}
    return subprocess.run([sys.executable, "-m", "smtpgate", "explain", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_a_good_client_and_its_evidence(world, redis_server, dns_server):
    result = explain(redis_server, dns_server, "--ip", "127.0.0.77", "--helo",
                     "client.example.test", "--from", "a@example.net", "--rcpt",
                     "user1@example.com")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "client_fcrdns" in result.stdout and "host77.clients.example.test" in result.stdout
    assert "(accepted; Postfix has the last word" in result.stdout


def test_refusals_name_the_key_and_the_reply(world, redis_server, dns_server):
    world.set("PSA:127.0.9.0/24", "reject")
    result = explain(redis_server, dns_server, "--ip", "127.0.9.9", "--rcpt", "x@example.com")
    assert result.returncode == 1
    assert "PSA:127.0.9.0/24" in result.stdout
    assert "reply: 521 5.3.2 Service currently unavailable" in result.stdout


@pytest.mark.parametrize("args", [["--ip", "not-an-ip"], ["--ip", "127.0.0.1", "--from", "a@@b"]],
                         ids=["bad-ip", "bad-sender"])
def test_bad_arguments_are_clear_errors(redis_server, dns_server, args):
    result = explain(redis_server, dns_server, *args)
    assert result.returncode in (1, 2)
    assert "Traceback" not in result.stderr + result.stdout


def test_client_is_judged_once_however_many_recipients(world, redis_server, dns_server):
    result = explain(redis_server, dns_server, "--ip", "127.0.0.77", "--helo",
                     "client.example.test", "--from", "a@example.net",
                     "--rcpt", "user1@example.com", "--rcpt", "user2@example.com")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("client_fcrdns") == 1


def test_a_dry_run_counts_nothing_and_caches_nothing(world, redis_server, dns_server):
    """explain reads the live counters as if the client connected once more, and writes none:
    run as often as one likes, it neither uses up the client's rate nor leaves a pass."""
    redis = world
    ip = "127.0.0.88"
    args = ("--ip", ip, "--helo", "client.example.test", "--from", "a@example.net",
            "--rcpt", "user1@example.com")
    limits = {"SMTPGATE_CLIENT_MESSAGE_RATE_LIMIT": "2",
              "SMTPGATE_CLIENT_RECIPIENT_RATE_LIMIT": "2"}
    for _ in range(3):
        result = explain(redis_server, dns_server, *args,
                         SMTPGATE_CLIENT_CONNECTION_RATE_LIMIT="2", **limits)
        assert result.returncode == 0, result.stdout + result.stderr
    assert redis.keys("smtpgate:*") == [], redis.keys("smtpgate:*")
    # what the live gate counted is read: two connects this minute, the dry run the third
    redis.set(keys.rate_key(ip), 2, ex=60)
    result = explain(redis_server, dns_server, *args, SMTPGATE_CLIENT_CONNECTION_RATE_LIMIT="2")
    assert result.returncode == 1, result.stdout
    assert "reply: 421 4.7.0" in result.stdout, result.stdout
    assert redis.get(keys.rate_key(ip)) == "2"


def test_a_dry_run_reads_the_message_rate_as_one_more(world, redis_server, dns_server):
    ip = "127.0.0.89"
    key = keys.event_rate_key("message", ip)
    world.set(key, 2, ex=60)  # two messages this minute, counted by a live gate
    result = explain(redis_server, dns_server, "--ip", ip, "--helo", "client.example.test",
                     "--from", "a@example.net", "--rcpt", "user1@example.com",
                     SMTPGATE_CLIENT_MESSAGE_RATE_LIMIT="2")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "message_rate_limit" in result.stdout
    assert "reply: 450 4.7.1 Error: too much mail from 127.0.0.89" in result.stdout
    assert world.get(key) == "2"
