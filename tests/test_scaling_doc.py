"""docs/scaling.md's process arithmetic follows the configuration's real defaults."""

import dataclasses
import re
from pathlib import Path

from smtpgate.config import Config

DOC = " ".join((Path(__file__).resolve().parent.parent / "docs" / "scaling.md").read_text().split())
DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config)}
SUM = re.compile(r"(\d+)(?: in flight)? \+ (\d+)(?: workers)? × (\d+)(?: pooled)? = (\d+)")


def test_the_worker_count_is_the_cpu_count_by_default():
    assert DEFAULTS["workers"] == 0  # 0: one per CPU
    assert "defaults to the node's CPU count" in DOC


def test_each_sum_of_smtpd_processes_uses_the_defaults_and_adds_up():
    sums = SUM.findall(DOC)
    assert len(sums) >= 2
    for limit, workers, pool, total in sums:
        assert int(limit) == DEFAULTS["next_hop_transaction_limit"]
        assert int(pool) == DEFAULTS["next_hop_pool"]
        assert int(limit) + int(workers) * int(pool) == int(total)
    # the case that breaks Postfix's default_process_limit of 100 on one node is shown
    assert any(int(total) > 100 for *_, total in sums)
