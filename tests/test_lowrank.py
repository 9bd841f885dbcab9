"""compress.lowrank: truncated SVD, energy ranks, LowRankExperts, weight sharing."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from moe_course.compress.lowrank import (
    LowRankExperts, SharedExperts, lowrank_experts, rank_for_energy, share_experts, singular_values, truncated_svd,
)
from moe_course.dispatch import STRATEGIES
from moe_course.layers import SparseMoE, moe_layers
from moe_course.metrics import size_report


class Tiny(nn.Module):
    def __init__(self, d=32, h=48, e=4, activation="swiglu"):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(16, d)
        self.moe = SparseMoE(d, e, h, k=2, activation=activation)
        self.head = nn.Linear(d, 16)

    def forward(self, idx):
        x = self.emb(idx)
        return self.head(x + self.moe(x))


def test_truncated_svd_is_best_and_balanced():
    w = torch.randn(20, 12)
    s = torch.linalg.svdvals(w)
    for r in (1, 5, 12):
        left, right = truncated_svd(w, r)
        assert left.shape == (20, r) and right.shape == (r, 12)
        err = (w - left @ right).norm() ** 2
        assert torch.allclose(err, s[r:].square().sum(), atol=1e-3)  # Eckart-Young
        assert torch.allclose(left.norm(), right.norm(), rtol=1e-4)
    batch = torch.randn(3, 8, 6)
    left, right = truncated_svd(batch, 6)
    assert torch.allclose(left @ right, batch, atol=1e-5)
    with pytest.raises(ValueError, match="rank"):
        truncated_svd(w, 13)
    with pytest.raises(ValueError, match="rank"):
        truncated_svd(w, -1)


def test_rank_for_energy():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])
    assert [rank_for_energy(s, e) for e in (0.5, 0.9, 0.95, 1.0)] == [1, 2, 3, 4]
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="energy"):
            rank_for_energy(s, bad)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_full_rank_is_exact_and_input_untouched(activation):
    m = Tiny(activation=activation)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    idx = torch.randint(0, 16, (3, 10))
    ref = m(idx)
    c = lowrank_experts(m, keep=32)
    assert isinstance(c.moe.experts, LowRankExperts)
    assert c.moe.experts.num_experts == 4 and c.moe.experts.d_hidden == 48
    for s in STRATEGIES:
        c.moe.dispatch = s
        assert torch.allclose(c(idx), ref, atol=1e-4), s
    x = torch.randn(5, 32)
    e = c.moe.experts
    assert torch.allclose(e.forward_all(x), m.moe.experts.forward_all(x), atol=1e-4)
    assert torch.allclose(e[1](x), m.moe.experts[1](x), atol=1e-4)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_low_rank_shrinks_and_reports_true_size():
    m = Tiny()
    c = lowrank_experts(m, keep=4)
    e = c.moe.experts
    stored = sum(p.numel() for p in e.parameters())
    assert stored == 4 * 3 * 4 * (32 + 48)
    assert e.params_per_expert == 3 * 4 * (32 + 48)
    r0, r1 = size_report(m), size_report(c)
    assert r1.expert_params == stored and r1.bytes < r0.bytes
    assert r1.flops_per_token < r0.flops_per_token
    c.moe.dispatch = "loop"
    c(torch.randint(0, 16, (2, 5))).sum().backward()  # factors are trainable
    assert e.in_L[0].grad is not None


def test_energy_ranks_per_matrix():
    m = Tiny()
    c = lowrank_experts(m, keep=0.8)
    sv = singular_values(m)[0]
    for name, ranks in c.moe.experts.ranks.items():
        assert ranks == [rank_for_energy(sv[name][i], 0.8) for i in range(4)]
    full = lowrank_experts(m, keep=1.0)
    idx = torch.randint(0, 16, (2, 6))
    assert torch.allclose(full(idx), m(idx), atol=1e-4)


def test_random_init_differs_svd_does_not():
    m = Tiny()
    idx = torch.randint(0, 16, (2, 6))
    rnd = lowrank_experts(m, keep=32, init="random")
    assert not torch.allclose(rnd(idx), m(idx), atol=1e-2)


def test_share_experts():
    m = Tiny()
    idx = torch.randint(0, 16, (2, 6))
    c = share_experts(m, keep=32)
    assert isinstance(c.moe.experts, SharedExperts)
    assert torch.allclose(c(idx), m(idx), atol=1e-4)  # full-rank deltas: exact
    c0 = share_experts(m, keep=0, mode="first_layer")
    e = c0.moe.experts
    w_in, w_gate, w_out = e.weights()
    assert torch.allclose(w_in[0], w_in[3]) and torch.allclose(w_gate[1], w_gate[2])
    assert torch.allclose(w_in[0], m.moe.experts.w_in.mean(0), atol=1e-6)
    assert torch.equal(w_out, m.moe.experts.w_out)
    assert size_report(c0).expert_params == 2 * 32 * 48 + 4 * 48 * 32
    c4 = share_experts(m, keep=4)
    assert size_report(c4).expert_params == 3 * (32 * 48 + 4 * 4 * (32 + 48))
    x = torch.randn(3, 32)
    assert torch.allclose(c4.moe.experts.forward_all(x)[2], c4.moe.experts[2](x), atol=1e-5)


def test_bad_arguments():
    m = Tiny()
    for bad in (0, 33, 0.0, 1.01, None, "8", True):   # a rank in [1, min(d, h)] or an energy in (0, 1]
        with pytest.raises(ValueError, match="keep: expected a rank"):
            lowrank_experts(m, bad)
    with pytest.raises(ValueError, match="model"):
        lowrank_experts(nn.Linear(3, 3), keep=1)
    with pytest.raises(ValueError, match="model"):
        share_experts(nn.Linear(3, 3), keep=1)
    with pytest.raises(ValueError, match="keep: expected a rank"):
        share_experts(m, keep=-1)
    with pytest.raises(ValueError, match="mode"):
        share_experts(m, keep=1, mode="second_layer")
    with pytest.raises(ValueError, match="init"):
        lowrank_experts(m, keep=1, init="zeros")


def test_inplace():
    m = Tiny()
    out = lowrank_experts(m, keep=2, inplace=True)
    assert out is m and isinstance(moe_layers(m)[0].experts, LowRankExperts)
