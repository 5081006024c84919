"""The worker's spool budget: taken as spools grow, given back when they close."""

from __future__ import annotations

from smtpgate.smtp.spool import Spool
from smtpgate.smtp.spool_budget import SpoolBudget


def test_spools_take_from_the_budget_and_give_back_on_close():
    budget = SpoolBudget(1000)
    first, second = Spool(100, budget), Spool(100, budget)
    first.write(b"x" * 400)  # past memory_limit: a file, counted all the same
    second.write(b"y" * 500)
    assert (budget.used, budget.room(), budget.spent) == (900, 100, False)
    first.close()
    assert budget.room() == 500
    second.close()
    assert budget.used == 0


def test_a_spool_that_outgrows_the_budget_is_full_and_spends_the_rest():
    budget = SpoolBudget(1000)
    spool = Spool(100, budget)
    spool.write(b"x" * 600)
    spool.write(b"y" * 600)
    assert spool.full and spool.size == 600
    assert budget.spent and budget.refused == 1
    spool.write(b"z")  # the rest of the message is dropped
    assert spool.size == 600
    assert b"".join(spool.chunks()) == b"x" * 600
    spool.close()
    assert budget.used == 0 and not budget.spent


def test_no_limit_is_no_bound():
    budget = SpoolBudget(0)
    spool = Spool(10, budget)
    spool.write(b"x" * 10_000)
    assert budget.room() is None and not budget.spent and not spool.full
    spool.close()
    assert budget.used == 0
