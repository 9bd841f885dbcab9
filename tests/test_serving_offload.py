"""Expert offloading: outputs unchanged, bytes counted, cache policies behave as defined."""

from __future__ import annotations

import pytest
import torch

from moe_course.layers import SparseMoE
from moe_course.models import LMConfig, MoETransformerLM
from moe_course.serving.offload import ExpertCache, cache_stats, offload, simulate


def _lm():
    torch.manual_seed(0)
    return MoETransformerLM(LMConfig(vocab_size=13, d_model=16, n_layers=3, n_heads=2, num_experts=6, k=2,
                                     d_hidden=24, context_length=16, activation="swiglu", num_shared_experts=1)).eval()


@pytest.mark.parametrize("policy, prefetch", [("lru", False), ("lfu", False), ("lru", True)])
def test_offloaded_model_gives_the_same_logits_and_counts_bytes(tmp_path, policy, prefetch):
    model = _lm()
    ids = torch.randint(0, 13, (2, 10))
    with torch.no_grad():
        want = model(ids)
        off = offload(model, tmp_path / "experts.safetensors", cache_size=2, policy=policy, prefetch=prefetch)
        got = torch.cat([off(ids[:, : t + 1])[:, -1:] for t in range(10)], dim=1)  # token by token, as decoding
        full = off(ids)
    torch.testing.assert_close(full, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, torch.stack([model(ids[:, : t + 1])[:, -1] for t in range(10)], 1),
                               rtol=1e-5, atol=1e-5)
    stats = cache_stats(off)
    assert len(stats) == 3 and all(s.misses > 0 for s in stats)
    expert_bytes = 3 * 16 * 24 * 4  # w_in, w_gate, w_out in fp32
    for s in stats:
        assert s.bytes_moved == (s.misses + s.prefetched) * expert_bytes
    assert all(p.numel() < 6 * expert_bytes // 4 for p in off.parameters())  # no full expert stack left in memory
    assert isinstance(next(m for m in model.modules() if isinstance(m, SparseMoE)), SparseMoE)  # original untouched
    if prefetch:
        assert sum(s.prefetched for s in stats) > 0


def test_cache_policies_on_a_hand_trace():
    lru, lfu = ExpertCache(2, "lru"), ExpertCache(2, "lfu")
    for e in [0, 0, 0, 1, 2, 0, 1]:  # expert 0 is popular; 1 and 2 compete
        lru.get(e, lambda: e, 10)
        lfu.get(e, lambda: e, 10)
    # LRU: 0m 0h 0h 1m 2m(evict 0) 0m(evict 1) 1m(evict 2) -> 2 hits
    assert (lru.stats.hits, lru.stats.misses, lru.stats.bytes_moved) == (2, 5, 50)
    # LFU keeps 0 (3 uses): 0m 0h 0h 1m 2m(evict 1) 0h 1m(evict 2) -> 3 hits
    assert (lfu.stats.hits, lfu.stats.misses) == (3, 4)


def test_simulate_matches_the_cache_and_more_cache_never_hurts_lru():
    torch.manual_seed(0)
    trace = [torch.randint(0, 8, (200, 2)) for _ in range(3)]
    rates = [simulate(trace, c, "lru", expert_bytes=100)["hit_rate"] for c in (1, 2, 4, 8)]
    assert rates == sorted(rates) and rates[-1] > 0.95  # with every expert cached only first uses miss
    one = simulate([torch.tensor([[0], [0], [1], [0]])], 1)
    assert one["hit_rate"] == 0.25 and one["misses_per_token"] == 0.75 and one["bytes_per_token"] == 0.75


def test_offload_bad_input(tmp_path):
    with pytest.raises(ValueError, match="capacity: expected an int >= 1"):
        ExpertCache(0)
    with pytest.raises(ValueError, match="policy: expected one of"):
        ExpertCache(2, "fifo")
    with pytest.raises(ValueError, match="no SparseMoE layer"):
        offload(torch.nn.Linear(2, 2), tmp_path / "x.safetensors", 2)
    with pytest.raises(ValueError, match="trace"):
        simulate([], 2)
