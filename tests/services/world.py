"""world - the test world's DNS records and Redis keys: who the loopback clients are.

SYNOPSIS
    populate(redis_client, dns_server)
    KEYS, GOOD_CLIENTS

DESCRIPTION
    127.0.0.70 .. 127.0.0.99 are well-behaved clients: each has a PTR
    hostNN.clients.example.test whose A record points back (FCrDNS passes),
    and client.example.test (the HELO the tests use) resolves. Other
    addresses have no PTR unless a test gives them one. The keys are the
    seed image README's examples.
"""

from __future__ import annotations

from .dns_server import reverse_name

GOOD_CLIENTS = [f"127.0.0.{n}" for n in range(70, 100)]

KEYS = {
    "VDOM:example.com": "example.com",
    "VALI:user1@example.com": "user1@example.com",
    "VALI:user2@example.com": "user2@example.com",
    "VALI:postmaster@example.com": "user1@example.com",
    "VALI:sales@example.com": "user1@example.com user2@example.com",
}


def populate(redis_client, dns_server) -> None:
    with redis_client.pipeline(transaction=False) as pipe:  # not MSET: a Cluster's keys
        for key, value in KEYS.items():                     # live in different slots
            pipe.set(key, value)
        pipe.execute()
    records = [("client.example.test", "A", "127.0.0.77")]
    for ip in GOOD_CLIENTS:
        name = f"host{ip.rsplit('.', 1)[1]}.clients.example.test"
        records += [(name, "A", ip), (reverse_name(ip), "PTR", name)]
    dns_server.set(records)  # one call: each change is a reload of the DNS server


def gate_in_world(start_gate, redis_server, dns_server, **options):
    """A module's gate (start_gate's options) with the README's keys and the clients' DNS in
    place, as a fixture's body: `yield from gate_in_world(...)`; stopped afterwards."""
    populate(redis_server.client(), dns_server)
    process = start_gate(**options)
    try:
        yield process
    finally:
        process.stop()
