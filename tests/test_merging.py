"""Tests of moe_course.compress.merging (chapter 8)."""

import copy

import pytest
import torch
import torch.nn as nn

from moe_course.compress import merging as M
from moe_course.layers import Experts, SparseMoE, moe_layers
from moe_course.metrics import routing_stats, size_report


class Tiny(nn.Module):
    def __init__(self, activation="swiglu", n=6, k=2):
        super().__init__()
        torch.manual_seed(0)
        self.moe1 = SparseMoE(8, n, 12, k=k, activation=activation)
        self.moe2 = SparseMoE(8, n, 12, k=k, activation=activation)

    def forward(self, x):
        x = x + self.moe1(x)
        return x + self.moe2(x)


@pytest.fixture
def calib():
    torch.manual_seed(1)
    return [torch.randn(64, 8) for _ in range(3)]


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_permuted_expert_same_function(activation):
    e = Experts(3, 8, 12, activation)
    x = torch.randn(20, 8)
    before = e.expert_forward(1, x)
    M.permute_expert(e, 1, torch.randperm(12))
    assert torch.allclose(e.expert_forward(1, x), before, atol=1e-6)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_alignment_recovers_planted_permutation(activation):
    e = Experts(2, 8, 12, activation)
    with torch.no_grad():
        for name in ("w_in", "w_gate", "w_out"):
            if getattr(e, name) is not None:
                getattr(e, name)[1] = getattr(e, name)[0]
    planted = torch.randperm(12)
    M.permute_expert(e, 1, planted)
    g = e.w_gate
    perm = M.match_neurons(e.w_in[0], e.w_out[0], e.w_in[1], e.w_out[1],
                           None if g is None else g[0], None if g is None else g[1])
    assert torch.equal(e.w_in[1][:, perm], e.w_in[0])
    assert torch.equal(e.w_out[1][perm], e.w_out[0])


def test_align_experts_keeps_function_and_input(calib):
    model = Tiny()
    ref = copy.deepcopy(model.state_dict())
    x = torch.randn(10, 8)
    for c in (None, calib):
        aligned = M.align_experts(model, calib=c)
        assert torch.allclose(aligned(x), model(x), atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ref.items())


def test_identity_merge(calib):
    model = Tiny()
    x = torch.randn(10, 8)
    merged = M.merge_experts(model, 6, calib=calib, align=False)
    assert torch.allclose(merged(x), model(x), atol=1e-5)


def test_merge_shrinks_bytes_and_keeps_input(calib):
    model = Tiny()
    ref = copy.deepcopy(model.state_dict())
    for fn in (lambda: M.merge_experts(model, 3, calib=calib), lambda: M.merge_experts(model, [2, 4], calib=calib, similarity="weights"),
               lambda: M.hc_smoe(model, 3, calib=calib), lambda: M.merge_experts(model, 3, calib=calib, similarity="expert-outputs", weighting="uniform")):
        merged = fn()
        for layer in moe_layers(merged):
            assert layer.experts.num_experts in (2, 3, 4)
            assert sorted(i for g in layer.merged_groups for i in g) == list(range(6))
        assert size_report(merged).expert_bytes < size_report(model).expert_bytes
        stats = routing_stats(merged, torch.randn(32, 8))
        assert len(stats.layers) == 2
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ref.items())


def test_merged_router_sums_gates_of_same_group(calib):
    model = Tiny(k=2)
    merged = M.merge_experts(model, 2, calib=calib)
    layer, orig = moe_layers(merged)[0], moe_layers(model)[0]
    x = torch.randn(50, 8)
    r0, r = orig.router(x), layer.router(x)
    groups = layer.router.slot_to_group[r0.indices]
    assert torch.allclose(r.weights.sum(-1), r0.weights.sum(-1), atol=1e-6)
    both = groups[:, 0] == groups[:, 1]
    assert both.any()
    assert torch.all(r.weights[both, 1] == 0) and torch.all(~r.keep[both, 1])
    assert torch.allclose(r.probs.sum(-1), torch.ones(50), atol=1e-5)
    assert torch.allclose(torch.softmax(r.logits, -1), r.probs, atol=1e-5)
    # output equals the routed mix computed by hand with the merged experts
    y = sum(r.weights[:, j:j + 1] * torch.stack([layer.experts.expert_forward(int(g), x[t:t + 1])[0]
                                                   for t, g in enumerate(r.indices[:, j])]) for j in range(2))
    assert torch.allclose(layer(x), y, atol=1e-5)


def test_frequency_weighted_merge():
    w = torch.stack([torch.ones(2, 2), 3 * torch.ones(2, 2)])
    assert torch.allclose(M.frequency_weighted_merge(w, torch.tensor([1.0, 3.0])), 2.5 * torch.ones(2, 2))
    assert torch.allclose(M.frequency_weighted_merge(w, torch.tensor([0.0, 0.0])), 2 * torch.ones(2, 2))


def test_mc_smoe_smaller_and_exact_at_full(calib):
    model = Tiny()
    merged = M.merge_experts(model, 3, calib=calib)
    mc = M.mc_smoe(model, 3, calib=calib, rank=2, keep_sparse=0.1)
    assert size_report(mc).expert_bytes < size_report(merged).expert_bytes
    assert size_report(mc).flops_per_token < size_report(merged).flops_per_token
    x = torch.randn(10, 8)
    full = M.mc_smoe(model, 3, calib=calib, rank=8, keep_sparse=0.0)   # rank = min(d, h): exact
    assert torch.allclose(full(x), merged(x), atol=1e-4)
    assert isinstance(moe_layers(mc)[0].experts, M.LowRankSparseExperts)
    assert moe_layers(mc)[0].experts.in_idx.dtype == torch.int32


def test_stable_rank():
    assert torch.isclose(M.stable_rank(torch.eye(4)), torch.tensor(4.0))
    assert torch.isclose(M.stable_rank(torch.ones(3, 5)), torch.tensor(1.0))
    assert len(M.expert_stable_ranks(Tiny())) == 2


def test_bad_arguments(calib):
    model = Tiny()
    for bad in (0, 7, 1, 1.5, 0.1, [3], "3"):           # 1 < k = 2; 0.1 of 6 experts -> 1
        with pytest.raises(ValueError, match="keep"):
            M.merge_experts(model, bad, calib=calib)
    half = M.merge_experts(model, 0.5, calib=calib)      # a fraction of the 6 experts
    assert all(layer.experts.num_experts == 3 for layer in moe_layers(half))
    with pytest.raises(ValueError, match="calib"):
        M.merge_experts(model, 3, calib=[])
    with pytest.raises(ValueError, match="calib"):
        M.hc_smoe(model, 3, calib=None)
    with pytest.raises(ValueError, match="model"):
        M.merge_experts(nn.Linear(8, 8), 3, calib=calib)
    with pytest.raises(ValueError, match="similarity"):
        M.merge_experts(model, 3, calib=calib, similarity="cosine")
    with pytest.raises(ValueError, match="weighting"):
        M.merge_experts(model, 3, calib=calib, weighting="fisher")
    with pytest.raises(ValueError, match="keep_sparse"):
        M.mc_smoe(model, 3, calib=calib, rank=2, keep_sparse=1.0)
    with pytest.raises(ValueError, match="rank"):
        M.mc_smoe(model, 3, calib=calib, rank=0, keep_sparse=0.1)
    with pytest.raises(ValueError, match="model"):
        M.align_experts(nn.Linear(8, 8))


def test_already_compressed_rejected(calib):
    merged = M.merge_experts(Tiny(), 3, calib=calib)
    with pytest.raises(TypeError, match="model"):
        M.merge_experts(merged, 2, calib=calib)
