"""MC-SMoE's adaptive per-layer merging ratio: ``merge_experts(scope="global")`` and
``adaptive_merge_counts`` (chapter 8)."""

import copy
import math

import pytest
import torch
import torch.nn as nn

from moe_course.compress import merging as M
from moe_course.compress.pruning import expert_frequencies
from moe_course.layers import SparseMoE, moe_layers
from moe_course.metrics import size_report


class Tiny(nn.Module):
    """Two stacked MoE layers of ``n`` experts (top-``k``)."""

    def __init__(self, n=6, k=2):
        super().__init__()
        torch.manual_seed(0)
        self.moe1 = SparseMoE(8, n, 12, k=k, activation="swiglu")
        self.moe2 = SparseMoE(8, n, 12, k=k, activation="swiglu")

    def forward(self, x):
        x = x + self.moe1(x)
        return x + self.moe2(x)


class Twins(nn.Module):
    """Two MoE layers that read the same input and hold the same weights: equal frequencies."""

    def __init__(self, n=6, k=2):
        super().__init__()
        torch.manual_seed(0)
        self.moe1 = SparseMoE(8, n, 12, k=k, activation="swiglu")
        self.moe2 = copy.deepcopy(self.moe1)

    def forward(self, x):
        return x + self.moe1(x) + self.moe2(x)


@pytest.fixture
def calib():
    torch.manual_seed(1)
    return [torch.randn(64, 8) for _ in range(3)]


def skewed(calib):
    """Tiny whose first layer sends almost every token to experts 0 and 1 (feature 0 is large and
    only those two router rows read it); the second layer ignores feature 0."""
    model = Tiny()
    with torch.no_grad():
        model.moe1.router.gate.weight[:, 0] = 0.0
        model.moe1.router.gate.weight[:2, 0] = 3.0
        model.moe2.router.gate.weight[:, 0] = 0.0
    cal = [x.clone() for x in calib]
    for x in cal:
        x[:, 0] = 4.0
    return model, cal


def paper_rule(freqs, total):
    """The MC-SMoE code's threshold rule: each layer's top expert counts as 1.0, then
    tau = the (total+1)-th largest value of all frequencies, G_l = #{f > tau}."""
    fs = []
    for f in freqs:
        f = f.double().clone()
        f[f.argmax()] = 1.0
        fs.append(f)
    vals = torch.cat(fs).sort(descending=True).values
    if total >= len(vals):
        return [len(f) for f in fs], True
    tau = vals[total]
    return [int((f > tau).sum()) for f in fs], bool(vals[total - 1] > tau)


@pytest.mark.parametrize("keep", [2, 5, 7, 12, 0.5, 0.25])
def test_budget_respected_exactly(calib, keep):
    model = Tiny()
    total = keep if isinstance(keep, int) else round(keep * 12)
    counts = M.adaptive_merge_counts(model, calib, keep)
    assert sum(counts) == total and all(1 <= c <= 6 for c in counts)
    merged = M.merge_experts(model, keep, calib=calib, scope="global")
    assert merged.merged_counts == counts
    assert [layer.experts.num_experts for layer in moe_layers(merged)] == counts
    assert [len(layer.merged_groups) for layer in moe_layers(merged)] == counts
    x = torch.randn(32, 8)
    with torch.no_grad():
        assert torch.isfinite(merged(x)).all()


def test_counts_differ_when_frequencies_do(calib):
    model, cal = skewed(calib)
    f1, f2 = expert_frequencies(model, cal)
    assert f1[:2].sum() > 0.9                      # the first layer uses two experts
    counts = M.adaptive_merge_counts(model, cal, 6)
    assert sum(counts) == 6 and counts[0] < counts[1]
    expected, unique = paper_rule([f1, f2], 6)
    assert unique and counts == expected
    # the uniform split of the same total keeps 3 groups in each layer
    assert M.merge_experts(model, 3, calib=cal).merged_counts == [3, 3]


def test_one_group_layer_routes(calib):
    """A layer that keeps a single group (fewer than k) still runs: both choices land in it."""
    model, cal = skewed(calib)
    merged = M.merge_experts(model, 2, calib=cal, scope="global")
    assert merged.merged_counts == [1, 1]
    layer = moe_layers(merged)[0]
    with torch.no_grad():
        r = layer.router(cal[0])
        assert torch.allclose(r.weights.sum(1), torch.ones(len(cal[0])), atol=1e-5)
        assert torch.isfinite(merged(cal[0])).all()


def test_uniform_frequencies_give_uniform_merge(calib):
    model = Twins()
    f1, f2 = expert_frequencies(model, calib)
    assert torch.equal(f1, f2)
    for g in (2, 3, 5):
        assert M.adaptive_merge_counts(model, calib, 2 * g) == [g, g]
        glob = M.merge_experts(model, 2 * g, calib=calib, scope="global")
        uni = M.merge_experts(model, g, calib=calib)
        a, b = glob.state_dict(), uni.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_input_model_unchanged(calib):
    model = Tiny()
    before = copy.deepcopy(model.state_dict())
    M.merge_experts(model, 5, calib=calib, scope="global")
    M.adaptive_merge_counts(model, calib, 5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(type(layer.experts).__name__ == "Experts" for layer in moe_layers(model))
    assert not hasattr(model, "merged_counts")


def test_mc_smoe_global(calib):
    model, cal = skewed(calib)
    m = M.mc_smoe(model, 6, calib=cal, rank=4, keep_sparse=0.1, scope="global")
    assert m.merged_counts == M.adaptive_merge_counts(model, cal, 6)
    assert isinstance(moe_layers(m)[0].experts, M.LowRankSparseExperts)


@pytest.mark.parametrize("kwargs, match", [
    (dict(keep=6, scope="both"), r"scope: expected one of \('layer', 'global'\)"),
    (dict(keep=[3, 3], scope="global"), r"keep: with scope='global' expected one total"),
    (dict(keep=1, scope="global"), r"keep: expected between 2 \(one per layer\) and 12"),
    (dict(keep=13, scope="global"), r"keep: expected between 2 \(one per layer\) and 12"),
    (dict(keep=0.0, scope="global"), r"keep: a fraction must be in \(0, 1\]"),
    (dict(keep="6", scope="global"), r"keep: expected an int number of merged experts in total"),
])
def test_bad_input_names_the_argument(calib, kwargs, match):
    with pytest.raises(ValueError, match=match):
        M.merge_experts(Tiny(), calib=calib, **kwargs)


def test_adaptive_counts_bad_keep(calib):
    with pytest.raises(ValueError, match=r"keep: expected between 2 \(one per layer\) and 12"):
        M.adaptive_merge_counts(Tiny(), calib, 20)


@pytest.mark.slow
def test_global_against_uniform_on_the_zoo_lm():
    """Measured, not assumed: global against uniform merging at the same total on the trained
    Shakespeare model. Only what must hold is asserted (budget, equal stored bytes, finite
    perplexity); the numbers are printed (pytest -s)."""
    from moe_course import zoo
    from moe_course.train import evaluate

    lm = zoo.pretrained("shakespeare-moe", progress=False)
    data = zoo.data("shakespeare-moe")
    cal = data["train"].shuffle(seed=0).select(range(32))
    val = data["validation"].select(range(64))
    layers = moe_layers(lm)
    L, n = len(layers), layers[0].num_experts
    base = evaluate(lm, val, batch_size=64)["perplexity"]
    print(f"\noriginal perplexity (64 validation blocks) {base:.3f}")
    for g in (2, 3):
        uni = M.merge_experts(lm, g, calib=cal)
        glob = M.merge_experts(lm, g * L, calib=cal, scope="global")
        assert sum(glob.merged_counts) == g * L == sum(uni.merged_counts)
        assert all(1 <= c <= n for c in glob.merged_counts)
        assert size_report(glob).expert_bytes == size_report(uni).expert_bytes
        pu, pg = (evaluate(m, val, batch_size=64)["perplexity"] for m in (uni, glob))
        assert math.isfinite(pu) and math.isfinite(pg)
        print(f"{g * L} groups: uniform {uni.merged_counts} perplexity {pu:.3f} | "
              f"global {glob.merged_counts} perplexity {pg:.3f}")
