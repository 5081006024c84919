"""REDIS naming a Redis Cluster: the e2e checks that touch Redis, again, on three masters.

The Cluster (services.redis_ha.RedisClusterSet, three masters, no replicas) holds the
image's keys spread over its slots and smtpgate's own state. The checks below are the
existing e2e tests, imported from their modules and run here with `redis` (and so
`world`) pointing at the Cluster and each module's gate started with
REDIS=redis+cluster://...: the access tables (PSA, REV, HLO, RECIP) through the table
cache and its invalidation, recipient validation (VALI, through the socketmap too, and
delivered), the screening cache, the per-client connection limit, the AUTH failure limit
and LOGMAP. Then what only a Cluster has: keys on every master tracked by the cache, and
`smtpgate table` over every master.
"""

from __future__ import annotations

import asyncio
import io
import re

import pytest
import test_restrictions_e2e as restrictions
import test_screening_e2e as screening
import test_submission_e2e as submission
from services.ports import free_port
from test_restrictions_e2e import (  # noqa: F401  (collected here, run on the Cluster)
    test_alias_extension_and_catch_all_are_delivered,
    test_hlo_reject,
    test_recip_send_only_account,
    test_rev_permit_by_ip_or_network_excuses_missing_dns,
    test_rev_reject,
    test_unknown_user_is_rejected_by_smtpgate,
)
from test_screening_e2e import (  # noqa: F401
    screened,
    test_most_specific_psa_key_wins,
    test_patient_client_passes_and_is_remembered,
    test_per_client_connection_limit,
    test_psa_reject_network_is_dropped_with_521,
)
from test_submission_e2e import (  # noqa: F401
    logins,
    test_good_login_over_starttls_is_delivered_as_authenticated,
    test_wrong_password_then_the_limit,
)

from smtpgate.cli.table import run as table_run
from smtpgate.config import load
from smtpgate.lookups.tables import Tables

pytestmark = pytest.mark.slow


@pytest.fixture
def redis(cluster_redis):
    return cluster_redis


@pytest.fixture(scope="module")
def restrictions_gate(start_gate, postfix_server, redis_cluster):
    with restrictions.socketmap_gate(start_gate, postfix_server,
                                     REDIS=redis_cluster.url) as process:
        yield process


@pytest.fixture(scope="module")
def screening_gate(start_gate, redis_cluster):
    process = start_gate(REDIS=redis_cluster.url, **screening.GATE_ENV)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def submission_gate(start_gate, redis_cluster):
    process = start_gate(listeners=submission.LISTENERS, REDIS=redis_cluster.url,
                         **submission.GATE_ENV)
    yield process
    process.stop()


@pytest.fixture
def gate(request):
    """The gate of the module the test comes from, on the Cluster."""
    name = request.function.__module__.removeprefix("test_").removesuffix("_e2e")
    process = request.getfixturevalue(f"{name}_gate")
    yield process
    # the table cache must have been fed by every master, never fallen back to plain reads
    log = process.log_text()
    assert "table cache: loaded" in log
    assert "invalidation stream down" not in log and "Traceback" not in log


def test_the_image_keys_are_spread_over_masters(world):
    """The checks above are worth something only if the keys really are spread out (the
    world's five keys hash to two of the three masters; the tests below use all three)."""
    owners = {redis_cluster_node(world, key) for key in world.scan_iter()}
    assert len(owners) >= 2, owners


def redis_cluster_node(client, key: str) -> str:
    return client.get_node_from_key(key).name


def keys_on_each_master(client, prefix: str, make) -> list[str]:
    """One key per master: make(n) for n = 0, 1, ... until every master has one."""
    found: dict[str, str] = {}
    n = 0
    while len(found) < len(client.get_primaries()):
        key = f"{prefix}:{make(n)}"
        found.setdefault(redis_cluster_node(client, key), key)
        n += 1
    return list(found.values())


def test_table_cache_tracks_every_master(redis_cluster, redis):
    """Scanned tables load from every master and follow changes on each by invalidation,
    answering with no Redis round trip; point tables drop a changed key wherever it is."""
    psa = keys_on_each_master(redis, "PSA", lambda n: f"192.0.2.{n}")
    vali = keys_on_each_master(redis, "VALI", lambda n: f"u{n}@example.com")
    redis.set(psa[0], "reject")  # there before the cache loads

    async def scenario() -> None:
        tables = Tables(redis_cluster.url, timeout=2.0)
        try:
            await tables.start(wait_for_cache=10.0)
            assert tables.cache_ready
            ip = psa[0].partition(":")[2]
            assert (await tables.connect_facts(ip)).psa.value == "reject"
            for key in vali:
                assert await tables.lookup("VALI", key.partition(":")[2]) is None  # cached
            trips = tables.stats.round_trips
            for key in psa:
                redis.set(key, "permit")
            for key in vali:
                redis.set(key, "user1@example.com")
            for key in psa:
                ip = key.partition(":")[2]
                async with asyncio.timeout(5):
                    while (hit := (await tables.connect_facts(ip)).psa) is None or \
                            hit.value != "permit":
                        await asyncio.sleep(0.01)
            assert tables.stats.round_trips == trips  # all from the cache
            for key in vali:
                async with asyncio.timeout(5):
                    while await tables.get("VALI", key.partition(":")[2]) is None:
                        await asyncio.sleep(0.01)
            redis.delete(*psa)  # one DEL per slot; each master tells its own tracker
            for key in psa:
                async with asyncio.timeout(5):
                    while (await tables.connect_facts(key.partition(":")[2])).psa is not None:
                        await asyncio.sleep(0.01)
            assert tables.health.cache_ready
        finally:
            await tables.close()

    asyncio.run(scenario())


def table(config, *words: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = table_run(list(words), config, stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def test_table_cli_on_the_cluster(redis_cluster, redis):
    config = load({"REDIS": redis_cluster.url})
    names = [k.partition(":")[2] for k in
             keys_on_each_master(redis, "VALI", lambda n: f"user{n}@example.com")]
    for name in names:
        assert table(config, "set", "VALI", name, name)[0] == 0
    assert table(config, "set", "PSA", "192.0.2.0/24", "reject")[0] == 0
    assert table(config, "get", "VALI", names[-1]) == (0, f"{names[-1]}\n", "")
    status, out, err = table(config, "list", "VALI")  # SCAN on every master
    assert status == 0, err
    assert out.splitlines() == sorted(f"{n} {n}" for n in names)
    assert err == f"{len(names)} keys under VALI:*\n"
    assert table(config, "del", "VALI", names[0]) == (0, f"deleted VALI:{names[0]}\n", "")
    assert table(config, "get", "VALI", names[0])[0] == 1
    assert redis.get("PSA:192.0.2.0/24") == "reject"


def test_cluster_down_is_a_clear_error_not_a_traceback():
    url = f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/"  # nobody there
    status, out, err = table(load({"REDIS": url}), "get", "VALI", "user1@example.com")
    assert status == 1 and out == ""
    assert re.match(rf"smtpgate table: Redis at {re.escape(url)} failed: .+\n$", err), err
    assert "Traceback" not in err
