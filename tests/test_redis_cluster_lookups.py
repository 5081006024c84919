"""The screening cache, the connection, AUTH failure and event counters on a Cluster.

The tests of test_screening_cache.py, test_auth_limits.py and test_event_rates.py that talk
to Redis, imported and run here with their clients pointing at the three-master Redis
Cluster (services.redis_ha): the per-client sessions and rate keys meet in one script under
the client's hash tag, the global count and the screening hash go to whichever master holds
them, releases and renewals go per count hash, an IP's and a login's failure counters (two
slots) are read together, and a client's and a login's event counters (two slots) are
counted in one pipeline.
"""

from __future__ import annotations

import pytest
from test_auth_limits import (  # noqa: F401  (collected here, run on the Cluster)
    test_counters_expire_after_the_window,
    test_each_failure_restarts_the_window,
    test_failures_up_to_the_limit_lock_the_client_out,
    test_ipv6_clients_are_counted_per_64,
    test_one_login_attacked_from_many_addresses_is_locked,
    test_success_clears_the_login_but_not_the_client,
)
from test_event_rates import (  # noqa: F401
    test_a_counter_that_lost_its_expiry_gets_it_back_at_the_next_event,
    test_counts_go_up_together_in_one_call_and_each_key_gets_its_window,
    test_the_window_is_fixed_from_the_first_event_then_starts_again,
)
from test_screening_cache import (  # noqa: F401
    test_a_lost_release_heals_at_the_next_write,
    test_counts_per_client_and_global_across_processes,
    test_crashed_process_sessions_fall_out_and_live_ones_are_renewed,
    test_entries_vanish_by_themselves,
    test_failure_removes_passes_and_is_never_allowlisted,
    test_ipv6_client,
    test_ipv6_counted_per_64,
    test_key_expires_with_the_longest_pass,
    test_pass_is_read_back_with_its_expiry,
    test_rate_counts_for_a_minute_from_the_first_connect,
)

from smtpgate.lookups import redis_client
from smtpgate.lookups.keys import COUNT_ALL, count_key, rate_key


@pytest.fixture
def redis(cluster_redis):
    return cluster_redis


@pytest.fixture
async def aredis(redis, redis_cluster):
    client = redis_client.connect(redis_cluster.url, 5.0)
    assert redis_client.is_cluster(client)
    yield client
    await client.aclose()


@pytest.fixture
async def client(aredis):
    return aredis


def test_a_clients_keys_share_a_slot_and_clients_spread_over_masters(redis):
    slot = redis.keyslot
    for client in ("192.0.2.1", "2001:db8:1:2::/64"):
        assert slot(count_key(client)) == slot(rate_key(client))
    slots = {slot(count_key(f"192.0.2.{n}")) for n in range(20)} | {slot(COUNT_ALL)}
    assert len({redis.nodes_manager.get_node_from_slot(s).name for s in slots}) == 3
