"""Chapter 13 checkers: the reference passes, typical mistakes are caught, and the whole-method
exercise is graded both ways (a transition-aware policy passes, calibrated LFU does not)."""

from __future__ import annotations

from collections import Counter, OrderedDict

import pytest
from conftest import run

from moe_course.grading import ch13
from moe_course.grading.core import FAIL, PASS


def belady(trace, capacity):
    seq = ch13.accesses(trace)
    nxt, last = [0.0] * len(seq), {}
    for i in range(len(seq) - 1, -1, -1):
        nxt[i] = last.get(seq[i], float("inf"))
        last[seq[i]] = i
    cache, hits = {}, 0
    for i, e in enumerate(seq):
        if e in cache:
            hits += 1
        elif len(cache) >= capacity:
            del cache[max(cache, key=cache.get)]
        cache[e] = nxt[i]
    return hits / len(seq)


def test_belady_hand_case():
    # accesses 0 1 2 0 1 3 0 1 with 2 slots: MIN keeps 0 where LRU thrashes
    trace = [[0], [1], [2], [0], [1], [3], [0], [1]]
    assert belady(trace, 2) == pytest.approx(2 / 8)
    assert ch13.lru_hit_rate(trace, 2) == 0.0
    assert ch13.belady_reference(trace, 2) == pytest.approx(2 / 8)


def test_belady_reference_passes():
    assert run(ch13.check_belady_hit_rate, belady).status == PASS


def test_belady_lru_caught():
    r = run(ch13.check_belady_hit_rate, ch13.lru_hit_rate)
    assert r.status == FAIL and "least recently used" in r.message


def test_belady_per_token_caught():
    r = run(ch13.check_belady_hit_rate, lambda t, c: ch13.belady_reference(t, c, per_token=True))
    assert r.status == FAIL and "accesses" in r.message.lower()


def test_belady_duplicates_caught():
    r = run(ch13.check_belady_hit_rate, lambda t, c: ch13.belady_reference(t, c, dedup=False))
    assert r.status == FAIL and "distinct experts once" in r.message


class _Cache:
    def __init__(self, capacity, victim=None):
        self.capacity, self.slots, self.victim = capacity, OrderedDict(), victim

    def contents(self):
        return list(self.slots)

    def access(self, e):
        hit = e in self.slots
        if hit:
            self.slots.move_to_end(e)
        else:
            if len(self.slots) >= self.capacity:
                v = self.victim(self.slots, e) if self.victim else next(iter(self.slots))
                del self.slots[v]
            self.slots[e] = True
        return hit


def test_policy_lfu_on_calibration_is_too_weak():
    def make(capacity, n, calib):
        freq = Counter(ch13.accesses(calib))
        return _Cache(capacity, lambda slots, e: min(slots, key=lambda x: freq[x]))

    r = run(ch13.check_cache_policy, make)
    assert r.status == FAIL and "does not beat lru" in r.message.lower()


def test_policy_transition_passes():
    def make(capacity, n, calib):
        seq = ch13.accesses(calib)
        follow = Counter(zip(seq, seq[1:]))
        return _Cache(capacity, lambda slots, e: min(slots, key=lambda x: follow[(e, x)]))

    assert run(ch13.check_cache_policy, make).status == PASS


def test_policy_lru_named():
    r = run(ch13.check_cache_policy, lambda c, n, calib: _Cache(c))
    assert r.status == FAIL and "exactly lru" in r.message.lower()
