"""Checkers for chapter 13, serving: Belady's optimal expert cache, how far LRU is from it on the
trained model, and a cache policy of the learner's own that beats LRU.

An expert cache sees one *access* per (token, distinct expert) in decode order: a token that chose
experts ``[3, 5]`` accesses 3, then 5. Belady's MIN policy (1966) evicts, on a miss with a full
cache, the cached expert whose next access is furthest in the future (never = infinitely far); no
policy that sees only the past can have more hits. The checkers compare with a reference on hand-made
and random traces and recognise the usual wrong answers so that the hint names the mistake.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from functools import lru_cache

import torch

from .core import CheckFailed, checker, expect

__all__ = ["check_belady_hit_rate", "check_ceiling_gap", "check_cache_policy", "zoo_model",
           "accesses", "lru_hit_rate", "belady_reference", "zoo_traces", "TARGET_MARGIN",
           "POLICY_CAPACITY"]

TARGET_MARGIN = 0.02  # exercise 13.3: beat LRU's hit rate by this much (absolute)
POLICY_CAPACITY = 2


def accesses(trace) -> list[int]:
    """The access sequence of one layer: each token's distinct experts, in order."""
    out = []
    for token in trace:
        out += list(dict.fromkeys(int(e) for e in token))
    return out


def belady_reference(trace, capacity: int, *, dedup=True, reverse=False, never_first=True,
                     cold_hits=False, per_token=False, slots=None) -> float:
    """Belady's MIN hit rate (keywords produce the usual mistakes for diagnosis)."""
    seq = accesses(trace) if dedup else [int(e) for t in trace for e in t]
    slots = capacity if slots is None else slots
    nxt, last = [0] * len(seq), {}
    for i in range(len(seq) - 1, -1, -1):
        nxt[i] = last.get(seq[i], float("inf"))
        last[seq[i]] = i
    cache, hits, seen = {}, 0, set()
    for i, e in enumerate(seq):
        if e in cache:
            hits += 1
        else:
            if cold_hits and e not in seen:
                hits += 1
            if slots > 0:
                if len(cache) >= slots:
                    def key(x):
                        d = cache[x]
                        if not never_first and d == float("inf"):
                            d = -1.0
                        return -d if reverse else d
                    del cache[max(cache, key=key)]
            seen.add(e)
        if slots > 0:
            cache[e] = nxt[i]
    return hits / (len(trace) if per_token else len(seq))


def lru_hit_rate(trace, capacity: int) -> float:
    """LRU's hit rate on the access sequence of one layer."""
    seq, cache, hits = accesses(trace), OrderedDict(), 0
    for e in seq:
        if e in cache:
            hits += 1
            cache.move_to_end(e)
        else:
            if len(cache) >= capacity:
                cache.popitem(last=False)
            cache[e] = True
    return hits / len(seq)


def _lfu_hit_rate(trace, capacity: int) -> float:
    seq, cache, uses, hits = accesses(trace), OrderedDict(), {}, 0
    for e in seq:
        uses[e] = uses.get(e, 0) + 1
        if e in cache:
            hits += 1
            cache.move_to_end(e)
        else:
            if len(cache) >= capacity:
                del cache[min(cache, key=lambda x: uses[x])]
            cache[e] = True
    return hits / len(seq)


# --------------------------------------------------------------------------------------------
# Exercise 13.1: Belady's optimal hit rate
# --------------------------------------------------------------------------------------------
_HINTS = {
    "lru": "that is LRU's hit rate: Belady's policy evicts the cached expert whose NEXT use is furthest in "
           "the future (look ahead in the trace), not the least recently used one",
    "lfu": "that is LFU's hit rate (evict the least frequently used so far): Belady's policy evicts the cached "
           "expert whose next use is furthest in the future",
    "reverse": "you evicted the expert needed SOONEST: evict the one whose next use is furthest in the future",
    "never_first": "an expert that is never used again has its next use infinitely far away: it is the first "
                   "one to evict, not the last",
    "dup": "a token needs each of its distinct experts once: count one access per (token, distinct expert), "
           "so a token listing expert 3 twice accesses it once",
    "cold": "the first access to an expert is a miss (the cache starts empty): count it as a miss",
    "per_token": "divide the hits by the number of ACCESSES (one per token and distinct expert), not by the "
                 "number of tokens",
    "small": "your cache holds one expert too few: it holds `capacity` experts",
    "big": "your cache holds one expert too many: it holds `capacity` experts",
}


def _belady_variants(trace, c):
    return {"lru": lru_hit_rate(trace, c), "lfu": _lfu_hit_rate(trace, c),
            "reverse": belady_reference(trace, c, reverse=True),
            "never_first": belady_reference(trace, c, never_first=False),
            "dup": belady_reference(trace, c, dedup=False),
            "cold": belady_reference(trace, c, cold_hits=True),
            "per_token": belady_reference(trace, c, per_token=True),
            "small": belady_reference(trace, c, slots=c - 1),
            "big": belady_reference(trace, c, slots=c + 1)}


def _matches(out: float, trace, c) -> list[str]:
    ref = belady_reference(trace, c)
    return [name for name, v in _belady_variants(trace, c).items() if abs(v - ref) > 1e-9 and abs(out - v) < 1e-9]


_GENERIC = ("compare with Belady's rule: walk the accesses in order; a hit when the expert is cached; on a miss "
            "with a full cache evict the cached expert whose next access is furthest away (never = infinity), "
            "then insert it; hit rate = hits / accesses")


def _random_trace(seed: int, tokens: int, n: int, k: int, dup: bool = False):
    rng = random.Random(seed)
    out = []
    for _ in range(tokens):
        row = rng.sample(range(n), k)
        if dup and rng.random() < 0.3:
            row[-1] = row[0]
        out.append(row)
    return out


def _cases():
    hand = [[0, 1], [2, 0], [1, 3], [0, 2], [3, 1], [2, 0]]
    ones = [[e] for e in (0, 1, 2, 0, 1, 3, 0, 1, 2, 3, 3, 2)]
    dups = [[1, 1], [2, 1], [3, 3], [1, 2], [2, 2], [3, 1]]
    cases = [(hand, 2), (ones, 2), (ones, 3), (dups, 2), (hand, 1)]
    cases += [(_random_trace(s, 60, n, k, dup=s % 2 == 0), c)
              for s, (n, k, c) in enumerate([(8, 2, 2), (8, 2, 4), (16, 4, 6), (6, 1, 3), (8, 2, 3)])]
    return cases


@checker("Exercise 13.1: Belady's optimal expert cache")
def check_belady_hit_rate(belady_hit_rate) -> None:
    first_failure, candidates = None, None
    for trace, c in _cases():
        desc = f"(a trace of {len(trace)} tokens starting {trace[:3]}, capacity={c})"
        out = belady_hit_rate([list(t) for t in trace], c)
        if isinstance(out, torch.Tensor) and out.numel() == 1:
            out = out.item()
        if isinstance(out, bool) or not isinstance(out, (int, float)):
            raise CheckFailed(f"return the hit rate as a float in [0, 1], got {type(out).__name__} {desc}")
        out = float(out)
        if abs(out - belady_reference(trace, c)) <= 1e-9:
            continue
        if out > 1 + 1e-9 and abs(out / 100 - belady_reference(trace, c)) < 1e-9:
            raise CheckFailed(f"return a fraction in [0, 1], not a percentage {desc}")
        found = _matches(out, trace, c)
        # a case may not tell two mistakes apart: keep the names every failing case agrees on
        candidates = found if not candidates else ([n for n in candidates if n in found] or candidates)
        first_failure = first_failure or desc
        if len(candidates) == 1:
            raise CheckFailed(f"{_HINTS[candidates[0]]} {desc}")
    if first_failure is not None:
        hint = _HINTS[candidates[0]] if candidates else _GENERIC
        raise CheckFailed(f"{hint} {first_failure}")


# --------------------------------------------------------------------------------------------
# Exercise 13.2 (use it): how far is LRU from the ceiling on the trained model?
# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def zoo_model():
    """The trained Shakespeare model and 32 validation blocks (the chapter's trace)."""
    from moe_course import zoo

    model = zoo.pretrained("shakespeare-moe", progress=False).eval()
    val = zoo.data("shakespeare-moe")["validation"].select(range(32))
    return model, val


@lru_cache(maxsize=2)
def zoo_traces(split: str = "validation") -> tuple:
    """Per MoE layer, the trained model's ``[[e1, e2], ...]`` routing over 32 blocks of ``split``."""
    from moe_course import zoo
    from moe_course.metrics import routing_stats

    model, val = zoo_model()
    data = val if split == "validation" else zoo.data("shakespeare-moe")["train"].shuffle(seed=0).select(range(32))
    stats = routing_stats(model, data, batch_size=16, max_tokens=2048)
    return tuple(tuple(tuple(row) for row in layer.indices.tolist()) for layer in stats.layers)


def _gap_reference(layer: int = 0, c: int = 2) -> float:
    trace = zoo_traces()[layer]
    return belady_reference(trace, c) - lru_hit_rate(trace, c)


@checker("Exercise 13.2: LRU against the ceiling on the trained model", timeout=180)
def check_ceiling_gap(ceiling_gap) -> None:
    model, val = zoo_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = ceiling_gap(model, val)
    if isinstance(out, torch.Tensor) and out.numel() == 1:
        out = out.item()
    if isinstance(out, bool) or not isinstance(out, (int, float)):
        raise CheckFailed(f"return the gap as a float (Belady's hit rate minus LRU's), got {type(out).__name__}")
    expect(all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()),
           "your function changed the model's weights: only read its routing")
    out, ref = float(out), _gap_reference()
    print(f"Belady - LRU hit rate, layer 0, C = 2: yours {out:.4f}, reference {ref:.4f}")
    if abs(out - ref) <= 2e-3:
        return
    traces = zoo_traces()
    tr0 = traces[0]
    wrong = {
        "the sign is reversed: the gap is Belady's hit rate MINUS LRU's (the ceiling is higher)": -ref,
        "return a fraction of accesses (e.g. 0.05), not percentage points": ref * 100,
        "that is the gap at C = 4: the exercise asks for C = 2 experts per layer":
            belady_reference(tr0, 4) - lru_hit_rate(tr0, 4),
        "that is averaged over all layers: the exercise asks for layer 0 (the first MoE layer)":
            sum(belady_reference(t, 2) - lru_hit_rate(t, 2) for t in traces) / len(traces),
        "that is Belady against LFU: compare with LRU (package: simulate(..., policy='lru'))":
            belady_reference(tr0, 2) - _lfu_hit_rate(tr0, 2),
        "that is Belady's hit rate itself: subtract LRU's hit rate": belady_reference(tr0, 2),
        "you used the last MoE layer: the exercise asks for layer 0":
            belady_reference(traces[-1], 2) - lru_hit_rate(traces[-1], 2),
    }
    for hint, value in wrong.items():
        if abs(out - value) <= 2e-3:
            raise CheckFailed(hint)
    raise CheckFailed(f"expected about {ref:.4f} (within 0.002); record layer 0's routing with "
                      "metrics.routing_stats(model, data, batch_size=16, max_tokens=2048), replay "
                      "`.layers[0].indices` with your Belady function and with LRU at C = 2, subtract")


# --------------------------------------------------------------------------------------------
# Exercise 13.3 (whole method): an online cache policy that beats LRU
# --------------------------------------------------------------------------------------------
def _replay(cache, seq, capacity: int) -> float:
    hits = 0
    for i, e in enumerate(seq):
        before = set(cache.contents())
        hit = cache.access(e)
        if not isinstance(hit, bool):
            raise CheckFailed(f"access() must return a bool (hit or miss), got {type(hit).__name__}")
        if hit != (e in before):
            raise CheckFailed(f"access({e}) returned {hit} but expert {e} was {'' if e in before else 'not '}"
                              f"in contents() before the access (access {i})")
        after = set(cache.contents())
        if e not in after:
            raise CheckFailed(f"after access({e}) the expert must be in the cache (access {i})")
        if len(after) > capacity:
            raise CheckFailed(f"the cache holds {len(after)} experts after access {i}, more than its capacity "
                              f"{capacity}")
        if not after - {e} <= before:
            raise CheckFailed(f"access({e}) brought in other experts {sorted(after - before - {e})}: a prefetch "
                              "also costs bytes and is not allowed in this exercise")
        hits += hit
    return hits / len(seq)


@checker("Exercise 13.3: an online cache policy that beats LRU", timeout=240)
def check_cache_policy(make_cache) -> None:
    train = zoo_traces("train")
    val = zoo_traces()
    c = POLICY_CAPACITY
    ours, lrus = [], []
    for layer, trace in enumerate(val):
        calib = [list(t) for t in train[layer]]
        n = 1 + max(max(t) for t in train[layer] + trace)
        cache = make_cache(c, n, calib)
        for name in ("access", "contents"):
            if not callable(getattr(cache, name, None)):
                raise CheckFailed(f"make_cache must return an object with .access(expert) -> bool and "
                                  f".contents() -> the cached experts; {name} is missing")
        ours.append(_replay(cache, accesses(trace), c))
        lrus.append(lru_hit_rate(trace, c))
    mine, lru = sum(ours) / len(ours), sum(lrus) / len(lrus)
    print(f"hit rate at C = {c}, mean over {len(val)} layers: yours {mine:.4f}, LRU {lru:.4f}, "
          f"target {lru + TARGET_MARGIN:.4f}")
    if abs(mine - lru) < 1e-9:
        raise CheckFailed("your policy has exactly LRU's hit rate: change what it evicts (e.g. protect experts "
                          "that are used often in the calibration trace, or that came back after an eviction)")
    expect(mine >= lru + TARGET_MARGIN,
           f"your hit rate {mine:.4f} does not beat LRU ({lru:.4f}) by {TARGET_MARGIN}: the target is "
           f"{lru + TARGET_MARGIN:.4f}")
