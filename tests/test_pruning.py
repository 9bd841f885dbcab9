"""compress.pruning: magnitude pruning, expert pruning with physical removal, dynamic skipping."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from moe_course.compress import pruning as P
from moe_course.dispatch import dispatch
from moe_course.layers import SoftMoE, SparseMoE, moe_layers
from moe_course.metrics import size_report


def make_model(seed=0, E=8, k=2, activation="swiglu"):
    torch.manual_seed(seed)
    model = nn.Sequential(SparseMoE(16, E, 32, k=k, activation=activation),
                          SparseMoE(16, E, 32, k=k, activation=activation)).eval()
    for layer in moe_layers(model):  # spread the router so routing is not near-uniform
        nn.init.normal_(layer.router.gate.weight, std=1.0)
    return model


CALIB = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------- magnitude
def test_magnitude_mask_count_and_order():
    w = torch.randn(40, 30)
    m = P.magnitude_mask(w, 0.3)
    assert int((~m).sum()) == round(0.3 * w.numel())
    assert w[~m].abs().max() <= w[m].abs().min()


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_prune_magnitude_sparsity_and_copy(scope):
    model = make_model()
    before = [p.clone() for p in model.parameters()]
    pruned = P.prune_magnitude(model, 0.5, scope=scope)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "input must be untouched"
    rep = P.sparsity_report(pruned)
    assert abs(rep["zeros"] - 0.5) < 1e-3
    if scope == "layer":
        for layer in moe_layers(pruned):
            ws = torch.cat([w.reshape(-1) for w in (layer.experts.w_in, layer.experts.w_gate, layer.experts.w_out)])
            assert abs(float((ws == 0).float().mean()) - 0.5) < 1e-3
    # zeros in dense tensors: no bytes saved, and CSR with int64 indices is larger at 50%
    assert size_report(pruned).bytes == size_report(model).bytes
    assert rep["csr bytes"] > rep["dense bytes"]


def test_prune_magnitude_inplace():
    model = make_model()
    out = P.prune_magnitude(model, 0.75, inplace=True)
    assert out is model and P.sparsity_report(model)["zeros"] > 0.2


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_csr_bytes_formula_and_torch():
    d = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 3.0]])
    assert P.csr_bytes(d, index_bytes=8) == 3 * (4 + 8) + 3 * 8
    s = d.to_sparse_csr()
    torch_bytes = sum(t.numel() * t.element_size() for t in (s.crow_indices(), s.col_indices(), s.values()))
    assert P.csr_bytes(d) == torch_bytes


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.1, 0, 10**9, "half", True])
def test_bad_keep(bad):
    with pytest.raises(ValueError, match="keep"):
        P.prune_magnitude(make_model(), bad)


def test_keep_counts_or_fractions_of_expert_weights():
    model = make_model()
    n = sum(p.numel() for layer in moe_layers(model) for p in (layer.experts.w_in, layer.experts.w_gate, layer.experts.w_out))
    by_count = P.prune_magnitude(model, n // 4)
    by_fraction = P.prune_magnitude(model, 0.25)
    assert all(torch.equal(a, b) for a, b in zip(by_count.parameters(), by_fraction.parameters()))
    assert abs(P.sparsity_report(by_fraction)["zeros"] - 0.75) < 1e-3


def test_no_moe_layers():
    with pytest.raises(ValueError, match="model"):
        P.prune_magnitude(nn.Linear(4, 4), 0.5)
    with pytest.raises(ValueError, match="model"):
        P.prune_experts(nn.Linear(4, 4), 4, calib=CALIB)
    with pytest.raises(ValueError, match="model"):
        P.skip_experts(nn.Linear(4, 4), calib=CALIB)


# ---------------------------------------------------------------------------- expert pruning
def test_restrict_router_all_experts_is_router():
    layer = make_model()[0]
    r = layer.router(CALIB)
    w, i = P.restrict_router(r.logits, list(range(8)), 2)
    assert torch.equal(i, r.indices) and torch.allclose(w, r.weights)
    w, i = P.restrict_router(r.logits, [1, 4, 6], 2)
    assert set(i.unique().tolist()) <= {1, 4, 6}
    assert torch.allclose(w.sum(-1), torch.ones(len(CALIB)))


@pytest.mark.parametrize("method", ["frequency", "naee"])
def test_prune_experts_physically_shrinks(method):
    model = make_model()
    pruned = P.prune_experts(model, 6, calib=CALIB, method=method)
    assert [l.num_experts for l in moe_layers(model)] == [8, 8]
    for layer in moe_layers(pruned):
        assert layer.experts.w_in.shape[0] == 6 and layer.experts.w_out.shape[0] == 6
        assert layer.router.gate.weight.shape == (6, 16)
    assert size_report(pruned).bytes < size_report(model).bytes
    # the pruned layer computes exactly the original layer with the router restricted to the kept experts
    orig, new = moe_layers(model)[0], moe_layers(pruned)[0]
    kept = new.pruned_experts
    w, i = P.restrict_router(orig.router(CALIB).logits, kept, 2)
    expect = dispatch(CALIB, w, i, orig.experts, "loop")
    assert torch.allclose(new(CALIB), expect, atol=1e-5)


def test_frequency_keeps_busiest():
    model = make_model()
    freqs = P.expert_frequencies(model, CALIB)
    pruned = P.prune_experts(model, 4, calib=CALIB, method="frequency")
    top = sorted(freqs[0].argsort(descending=True, stable=True)[:4].tolist())
    assert moe_layers(pruned)[0].pruned_experts == top


def test_naee_enumeration_is_optimal_and_greedy_fallback():
    layer = make_model()[0]
    with torch.no_grad():
        kept, how = P.naee_select(layer, CALIB, 6)
        assert how == "enumerate" and len(kept) == 6
        kept_g, how_g = P.naee_select(layer, CALIB, 6, max_subsets=5)
        assert how_g == "greedy" and len(kept_g) == 6
        ref = layer(CALIB)

        def err(s):
            w, i = P.restrict_router(layer.router(CALIB).logits, s, 2)
            return float(torch.linalg.norm(ref - dispatch(CALIB, w, i, layer.experts, "loop")))
        assert err(kept) <= min(err(kept_g), err([0, 1, 2, 3, 4, 5])) + 1e-6
    assert math.comb(8, 6) == 28


def test_naee_reconstructs_better_than_frequency():
    model = make_model(seed=3)
    errs = {}
    for method in ("frequency", "naee"):
        pruned = P.prune_experts(model, 5, calib=CALIB, method=method)
        with torch.no_grad():
            errs[method] = float(torch.linalg.norm(moe_layers(model)[0](CALIB) - moe_layers(pruned)[0](CALIB)))
    assert errs["naee"] <= errs["frequency"] + 1e-6


@pytest.mark.parametrize("keep", [1, 9, 0.0, 1.5, "four", None])
def test_bad_keep(keep):
    with pytest.raises(ValueError, match="keep"):
        P.prune_experts(make_model(), keep, calib=CALIB)


def test_keep_fraction_and_errors():
    pruned = P.prune_experts(make_model(), 0.75, calib=CALIB, method="frequency")
    assert [l.num_experts for l in moe_layers(pruned)] == [6, 6]
    with pytest.raises(ValueError, match="method"):
        P.prune_experts(make_model(), 4, calib=CALIB, method="random")
    with pytest.raises(ValueError, match="calib"):
        P.prune_experts(make_model(), 4, calib=[])
    with pytest.raises(TypeError, match="model"):
        P.prune_experts(nn.Sequential(SoftMoE(16, 4, 8)), 2, calib=CALIB)


# ------------------------------------------------------------------------------- skipping
def test_skip_experts_median_and_real_skipping():
    model = make_model()
    skip = P.skip_experts(model, calib=CALIB)
    assert not isinstance(moe_layers(model)[0].router, P.SkippingRouter)
    P.skip_fraction(skip, reset=True)
    with torch.no_grad():
        skip(CALIB)
    # beta = median ratio: about half the second choices (a quarter of all assignments) skipped
    assert 0.2 <= P.skip_fraction(skip) <= 0.3
    layer = moe_layers(skip)[0]
    r = layer.last_routing
    assert r.keep is not None and bool(r.keep[:, 0].all())
    # skipped assignments never reach the experts: a dispatch without them gives the same output
    with torch.no_grad():
        x = CALIB
        out = layer(x)
        r = layer.last_routing
        drop_all = dispatch(x, r.weights, r.indices, layer.experts, "loop", r.keep)
    assert torch.allclose(out, drop_all, atol=1e-6)
    assert torch.allclose(r.weights.sum(-1), torch.ones(len(x)))
    assert torch.all(r.weights[~r.keep] == 0)


def test_skip_experts_errors():
    with pytest.raises(ValueError, match="calib"):
        P.skip_experts(make_model(), calib=None)
    with pytest.raises(ValueError, match="model"):
        P.skip_experts(make_model(k=1), calib=CALIB)
    with pytest.raises(ValueError, match="quantile"):
        P.skip_experts(make_model(), calib=CALIB, quantile=1.0)
