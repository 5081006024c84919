"""The choice of next hop: turns, skipping a hop that failed, its retry and backoff."""

from __future__ import annotations

import pytest

from smtpgate.relay.hop_choice import HopChoice


def test_one_hop_is_always_the_one_even_when_down():
    choice = HopChoice(1, 10)
    assert choice.order(0) == (0,)
    assert choice.failed(0, 0) == 10
    assert choice.order(1) == (0,) and choice.down(0)
    assert choice.worked(0) is True and not choice.down(0)


def test_hops_that_are_up_take_turns():
    choice = HopChoice(3, 10)
    firsts = [choice.order(0)[0] for _ in range(6)]
    assert firsts == [0, 1, 2, 0, 1, 2]
    assert sorted(choice.order(0)) == [0, 1, 2]  # the others follow, to move on to


def test_a_failed_hop_is_skipped_until_its_retry_then_one_message_tries_it():
    choice = HopChoice(2, 10)
    assert choice.failed(0, 100) == 10
    assert choice.order(105) == (1, 0)  # last resort only
    assert choice.order(105) == (1, 0)  # not its turn either
    assert choice.order(110) == (0, 1)  # due: this message tries it first
    assert choice.on_trial(0)
    assert choice.order(110.5) == (1, 0)  # the next one does not: the trial is under way
    assert choice.worked(0) is True
    assert not choice.down(0) and choice.retry_in(0, 111) == 0
    assert {choice.order(111)[0], choice.order(111)[0]} == {0, 1}  # in turn again


def test_each_failed_retry_doubles_the_wait_up_to_the_limit():
    choice = HopChoice(2, 10, retry_limit=35)
    now = 0.0
    waits = [choice.failed(0, now)]
    for _ in range(4):
        now += waits[-1]
        assert choice.order(now)[0] == 0
        waits.append(choice.failed(0, now))
    assert waits == [10, 20, 35, 35, 35]
    assert choice.retry_in(0, now + 5) == pytest.approx(30)


def test_failures_of_messages_already_under_way_do_not_lengthen_the_wait():
    choice = HopChoice(2, 10)
    assert [choice.failed(0, 100 + i / 10) for i in range(5)] == [10, 10, 10, 10, 10]
    assert choice.retry_in(0, 100.4) == pytest.approx(10)


def test_when_every_hop_is_down_the_one_that_failed_longest_ago_comes_first():
    choice = HopChoice(3, 10)
    choice.failed(2, 100)
    choice.failed(0, 101)
    choice.failed(1, 102)
    assert choice.order(103) == (2, 0, 1)


def test_no_hop_is_an_error():
    with pytest.raises(ValueError):
        HopChoice(0, 10)
