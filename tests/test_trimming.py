"""Trimming (He et al. 2024): expert, layer and block drop on small trained-shape models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from moe_course import metrics
from moe_course.compress import trimming as T
from moe_course.layers import moe_layers
from moe_course.zoo import pretrained, data


@pytest.fixture(scope="module")
def setup():
    model = pretrained("mnist1d-moe")
    d = data("mnist1d-moe")
    return model, d["train"].shuffle(seed=0).select(range(32))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    sd = model.state_dict()
    return sd.keys() == state.keys() and all(torch.equal(sd[k], state[k]) for k in state)


def test_residual_similarity_constructed():
    h = torch.randn(10, 8)
    assert T.residual_similarity(h, torch.zeros_like(h)) == pytest.approx(1.0)
    assert T.residual_similarity(h, -2 * h) == pytest.approx(-1.0)
    assert T.residual_similarity(h, h) == pytest.approx(1.0)  # h + h is parallel to h


def test_zero_ffn_layer_is_dropped_first(setup):
    model, calib = setup
    m = copy.deepcopy(model)
    with torch.no_grad():
        moe_layers(m)[1].experts.w_out.zero_()  # this MoE layer outputs exactly zero
    sims = T.layer_similarities(m, calib)
    assert sims[1] == pytest.approx(1.0)
    out = T.drop_layers(m, keep=len(moe_layers(m)) - 1, calib=calib)
    assert out.dropped_layers == [1]
    assert isinstance(out.blocks[1].ffn, T.Skipped) and isinstance(out.blocks[1].ln_ffn, nn.Identity)


def test_drop_layers_shrinks_and_keeps_input(setup):
    model, calib = setup
    state = _state(model)
    before = metrics.size_report(model)
    out = T.drop_layers(model, keep=len(moe_layers(model)) - 2, calib=calib)
    assert _same(model, state)
    assert len(moe_layers(out)) == len(moe_layers(model)) - 2
    after = metrics.size_report(out)
    assert after.bytes < before.bytes and after.flops_per_token < before.flops_per_token


def test_drop_blocks(setup):
    model, calib = setup
    state = _state(model)
    L = len(model.blocks)
    out = T.drop_blocks(model, keep=L - 1, calib=calib)
    assert _same(model, state) and len(out.blocks) == L - 1 and len(model.blocks) == L
    out2 = T.drop_blocks(model, keep=L - 2, calib=calib, contiguous=True)
    assert len(out2.blocks) == L - 2
    b = out2.dropped_blocks
    assert b == list(range(b[0], b[0] + 2))
    assert metrics.size_report(out2).bytes < metrics.size_report(out).bytes < metrics.size_report(model).bytes


def test_best_contiguous_run():
    h = torch.randn(20, 6)
    hidden = [torch.randn(20, 6), h, h + 1e-3 * torch.randn(20, 6), h + 2e-3, torch.randn(20, 6)]
    assert T.best_contiguous_run(hidden, 2)[0] == 1
    assert T.best_contiguous_run(hidden, 1)[0] in (1, 2)
    with pytest.raises(ValueError, match="n"):
        T.best_contiguous_run(hidden, 5)


def test_drop_experts(setup):
    model, calib = setup
    state = _state(model)
    scores = T.expert_scores(model, calib)
    out = T.drop_experts(model, 4, calib=calib)
    assert _same(model, state)
    for layer, s in zip(moe_layers(out), scores):
        assert layer.num_experts == 4 and layer.router.gate.out_features == 4
        assert sorted(layer.pruned_experts) == sorted(s.argsort(descending=True)[:4].tolist())
    g = T.drop_experts(model, 12, calib=calib, scope="global")
    assert sum(l.num_experts for l in moe_layers(g)) == 12
    assert all(l.num_experts >= l.k for l in moe_layers(g))
    assert metrics.size_report(out).bytes < metrics.size_report(model).bytes


def test_expert_scores_match_routing_stats(setup):
    model, calib = setup
    stats = metrics.routing_stats(model, calib)
    for s, layer in zip(T.expert_scores(model, calib), stats.layers):
        assert torch.allclose(s, layer.mean_prob.to(s), atol=1e-4)


def test_bad_arguments(setup):
    model, calib = setup
    L = len(model.blocks)
    for bad in (0, -1, L + 1, 1.5, 0.0, True, "2"):
        with pytest.raises(ValueError, match="keep"):
            T.drop_layers(model, bad, calib=calib)
        with pytest.raises(ValueError, match="keep"):
            T.drop_blocks(model, bad, calib=calib)
    assert T.drop_layers(model, 1.0, calib=calib).dropped_layers == []          # a fraction: all of them kept
    assert len(T.drop_blocks(model, 0.5, calib=calib).blocks) == round(0.5 * L)
    for bad in (0, 1, 9, 0.0, 1.5, "4"):
        with pytest.raises(ValueError, match="keep"):
            T.drop_experts(model, bad, calib=calib)
    with pytest.raises(ValueError, match="scope"):
        T.drop_experts(model, 4, calib=calib, scope="block")
    for fn in (lambda c: T.drop_layers(model, 1, calib=c), lambda c: T.drop_blocks(model, 1, calib=c),
               lambda c: T.drop_experts(model, 4, calib=c)):
        with pytest.raises(ValueError, match="calib"):
            fn([])
        with pytest.raises(ValueError, match="calib"):
            fn(None)
    dense = nn.Sequential(nn.Linear(4, 4))
    for fn in (lambda: T.drop_layers(dense, 1, calib=calib), lambda: T.drop_blocks(dense, 1, calib=calib),
               lambda: T.drop_experts(dense, 4, calib=calib)):
        with pytest.raises((ValueError, TypeError), match="MoE"):
            fn()


def test_dropped_layer_equals_zero_output(setup):
    """A dropped MoE sub-layer computes exactly what a layer with zero output would, without running it."""
    model, calib = setup
    out = T.drop_layers(model, keep=len(moe_layers(model)) - 1, calib=calib)
    i = out.dropped_layers[0]
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.blocks[i].ffn.experts.w_out.zero_()
        x = calib[:8]["x"]
        assert torch.allclose(out(x), ref(x), atol=1e-5)
    calls = []
    h = out.blocks[i].register_forward_hook(lambda m, a, o: calls.append(1))
    out(x)
    h.remove()
    assert calls and not any(isinstance(m, type(model.blocks[i].ffn)) for m in out.blocks[i].modules())
