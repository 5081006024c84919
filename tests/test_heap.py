"""A worker's collector settings: the heap it holds at start frozen, young objects left to
reference counting longer (smtpgate.service.heap)."""

from __future__ import annotations

import gc
import weakref

import pytest

from smtpgate.service.heap import GEN0, before_fork, settle_heap


@pytest.fixture
def restored_gc():
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_settle_heap_freezes_what_is_held_and_raises_the_young_threshold(restored_gc):
    held = [[n] for n in range(1000)]  # containers the collector tracks
    gc.unfreeze()
    settle_heap()
    assert gc.get_threshold()[0] == GEN0 > 700
    assert gc.get_freeze_count() >= len(held)
    tracked = {id(obj) for obj in gc.get_objects()}  # frozen objects are not walked
    assert not any(id(obj) in tracked for obj in held)


def test_cycles_made_after_settling_are_still_collected(restored_gc):
    settle_heap()

    class Node:
        pass

    node = Node()
    node.self = node  # a cycle only the collector frees
    ref = weakref.ref(node)
    del node
    gc.collect()
    assert ref() is None


def test_before_fork_freezes_the_supervisors_heap(restored_gc):
    gc.unfreeze()
    held = [[n] for n in range(100)]
    before_fork()
    assert gc.get_freeze_count() >= len(held)
