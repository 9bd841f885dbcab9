"""Chapter 13: Belady's optimal expert cache, LRU's distance from it on the trained model, an online
cache policy that beats LRU."""

from __future__ import annotations

import heapq
from collections import Counter, OrderedDict, defaultdict

from moe_course.grading import ch13 as G

from . import Chapter

M = Chapter("ch13")


# ------------------------------------------------------------------ 13.1 belady_hit_rate
@M.right("check_belady_hit_rate")
def belady_heap(trace, capacity):
    """A max-heap of next uses with lazy deletion instead of a scan of the cache."""
    seq = []
    for token in trace:
        seq += list(dict.fromkeys(token))
    nxt, last = [0] * len(seq), {}
    for i in range(len(seq) - 1, -1, -1):
        nxt[i] = last.get(seq[i], len(seq) + 1)
        last[seq[i]] = i
    cached, heap, hits = {}, [], 0
    for i, e in enumerate(seq):
        if e in cached:
            hits += 1
        elif len(cached) >= capacity:
            while True:
                neg, x = heapq.heappop(heap)
                if cached.get(x) == -neg:
                    del cached[x]
                    break
        cached[e] = nxt[i]
        heapq.heappush(heap, (-nxt[i], e))
    return hits / len(seq)


@M.wrong("check_belady_hit_rate", "least recently used")
def belady_is_lru(trace, capacity):
    """LRU instead of looking ahead."""
    return G.lru_hit_rate(trace, capacity)


@M.wrong("check_belady_hit_rate", "soonest")
def belady_reversed(trace, capacity):
    """Evicts the expert needed soonest."""
    return G.belady_reference(trace, capacity, reverse=True)


@M.wrong("check_belady_hit_rate", "infinitely far")
def belady_never_last(trace, capacity):
    """Experts never used again are kept (next use taken as -1)."""
    return G.belady_reference(trace, capacity, never_first=False)


@M.wrong("check_belady_hit_rate", "distinct experts once")
def belady_duplicates(trace, capacity):
    """Counts an expert listed twice by one token as two accesses."""
    return G.belady_reference(trace, capacity, dedup=False)


@M.wrong("check_belady_hit_rate", "first access")
def belady_cold_hits(trace, capacity):
    """The first access to an expert counted as a hit."""
    return G.belady_reference(trace, capacity, cold_hits=True)


@M.wrong("check_belady_hit_rate", "accesses")
def belady_per_token(trace, capacity):
    """Hits divided by tokens."""
    return G.belady_reference(trace, capacity, per_token=True)


@M.wrong("check_belady_hit_rate", "one expert too few")
def belady_off_by_one(trace, capacity):
    """Evicts when the cache holds capacity - 1 experts."""
    return G.belady_reference(trace, capacity, slots=capacity - 1)


@M.wrong("check_belady_hit_rate", "percentage")
def belady_percent(trace, capacity):
    """Returns percent."""
    return 100 * G.belady_reference(trace, capacity)


# ------------------------------------------------------------------ 13.2 ceiling_gap
def _layer_traces(model, data):
    from moe_course.metrics import routing_stats

    stats = routing_stats(model, data, batch_size=16, max_tokens=2048)
    return [layer.indices.tolist() for layer in stats.layers]


@M.right("check_ceiling_gap")
def gap_by_hand(model, data):
    """LRU replayed by hand with an OrderedDict, Belady from the heap version."""
    trace = _layer_traces(model, data)[0]
    cache, hits, seq = OrderedDict(), 0, G.accesses(trace)
    for e in seq:
        if e in cache:
            hits += 1
            cache.move_to_end(e)
        else:
            if len(cache) >= 2:
                cache.popitem(last=False)
            cache[e] = True
    return belady_heap(trace, 2) - hits / len(seq)


@M.wrong("check_ceiling_gap", "sign is reversed")
def gap_reversed(model, data):
    """LRU minus Belady."""
    t = _layer_traces(model, data)[0]
    return G.lru_hit_rate(t, 2) - G.belady_reference(t, 2)


@M.wrong("check_ceiling_gap", "percentage points")
def gap_percent(model, data):
    """In percentage points."""
    t = _layer_traces(model, data)[0]
    return 100 * (G.belady_reference(t, 2) - G.lru_hit_rate(t, 2))


@M.wrong("check_ceiling_gap", "c = 4")
def gap_c4(model, data):
    """Cache of 4 experts."""
    t = _layer_traces(model, data)[0]
    return G.belady_reference(t, 4) - G.lru_hit_rate(t, 4)


@M.wrong("check_ceiling_gap", "all layers")
def gap_all_layers(model, data):
    """Averaged over the layers."""
    ts = _layer_traces(model, data)
    return sum(G.belady_reference(t, 2) - G.lru_hit_rate(t, 2) for t in ts) / len(ts)


@M.wrong("check_ceiling_gap", "subtract lru")
def gap_no_subtraction(model, data):
    """Belady's hit rate alone."""
    return G.belady_reference(_layer_traces(model, data)[0], 2)


@M.wrong("check_ceiling_gap", "last moe layer")
def gap_last_layer(model, data):
    """The last layer's trace."""
    t = _layer_traces(model, data)[-1]
    return G.belady_reference(t, 2) - G.lru_hit_rate(t, 2)


# ------------------------------------------------------------------ 13.3 make_cache
class _Cache:
    def __init__(self, capacity):
        self.capacity, self.slots = capacity, OrderedDict()

    def contents(self):
        return list(self.slots)

    def victim(self, expert):
        return next(iter(self.slots))

    def access(self, expert):
        hit = expert in self.slots
        if hit:
            self.slots.move_to_end(expert)
        else:
            if len(self.slots) >= self.capacity:
                del self.slots[self.victim(expert)]
            self.slots[expert] = True
        return hit


@M.right("check_cache_policy")
def cache_first_order(capacity, num_experts, calib):
    """Evict the expert least likely to follow the one being loaded (one access ahead only)."""
    seq = G.accesses(calib)
    follow = defaultdict(Counter)
    for a, b in zip(seq, seq[1:]):
        follow[a][b] += 1

    class C(_Cache):
        def victim(self, expert):
            return min(self.slots, key=lambda x: follow[expert][x])

    return C(capacity)


@M.wrong("check_cache_policy", "exactly lru")
def cache_lru(capacity, num_experts, calib):
    """Plain LRU."""
    return _Cache(capacity)


@M.wrong("check_cache_policy", "does not beat lru")
def cache_calib_frequency(capacity, num_experts, calib):
    """Evict the expert least used in calibration (a static LFU): better than LRU, below the target."""
    freq = Counter(G.accesses(calib))

    class C(_Cache):
        def victim(self, expert):
            return min(self.slots, key=lambda x: freq[x])

    return C(capacity)


@M.wrong("check_cache_policy", "more than its capacity")
def cache_too_big(capacity, num_experts, calib):
    """Holds one expert more than allowed."""
    return _Cache(capacity + 1)


@M.wrong("check_cache_policy", "returned")
def cache_wrong_hit(capacity, num_experts, calib):
    """Reports a hit before checking the cache."""
    class C(_Cache):
        def access(self, expert):
            super().access(expert)
            return True

    return C(capacity)


@M.wrong("check_cache_policy", "prefetch")
def cache_prefetch(capacity, num_experts, calib):
    """Loads the most likely next expert after every access."""
    seq = G.accesses(calib)
    follow = defaultdict(Counter)
    for a, b in zip(seq, seq[1:]):
        follow[a][b] += 1

    class C(_Cache):
        def access(self, expert):
            hit = super().access(expert)
            guess = max(range(num_experts), key=lambda x: follow[expert][x])
            if guess not in self.slots:
                if len(self.slots) >= self.capacity:
                    del self.slots[next(x for x in self.slots if x != expert)]
                self.slots[guess] = True
            return hit

    return C(capacity)


@M.wrong("check_cache_policy", "must be in the cache")
def cache_bypass(capacity, num_experts, calib):
    """Never stores a missed expert."""
    class C(_Cache):
        def access(self, expert):
            return expert in self.slots

    return C(capacity)
