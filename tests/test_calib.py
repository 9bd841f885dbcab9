"""moe_course.calib: batches, the one token count, layer inputs, per-expert capture under every
dispatch strategy (naive, loop, grouped; capacity drops; every-expert mode) and the coverage report."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from moe_course import calib as C
from moe_course.dispatch import STRATEGIES
from moe_course.layers import SparseMoE, moe_layers

pytestmark = pytest.mark.usefixtures("single_thread")

X = torch.randn(96, 16, generator=torch.Generator().manual_seed(1))
POSITIVE = X.abs() + 0.1  # with a router row of -100 * ones, the first layer never chooses that expert


def starve(layer, expert):
    with torch.no_grad():
        layer.router.gate.weight[expert] = -100.0


def make_model(dispatch="loop", capacity_factor=None, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(*(SparseMoE(16, 8, 32, k=2, dispatch=dispatch, capacity_factor=capacity_factor,
                                      activation="swiglu") for _ in range(2))).eval()
    for layer in moe_layers(model):  # spread the router so routing is far from uniform
        nn.init.normal_(layer.router.gate.weight, std=1.0)
    return model


def layer_io(model, data):
    """Each MoE layer's input and output on ``data`` (forward hooks)."""
    io = [([], []) for _ in moe_layers(model)]

    def record(i):
        def hook(module, args, out):
            io[i][0].append(args[0])
            io[i][1].append(out)
        return hook

    hooks = [m.register_forward_hook(record(i)) for i, m in enumerate(moe_layers(model))]
    C.run(model, C.calib_batches(data), hooks)
    return [(torch.cat(xs), torch.cat(ys)) for xs, ys in io]


def reassemble(cap):
    y = cap.inputs[0].new_zeros(cap.num_tokens, 16)
    for t, g, out in zip(cap.tokens, cap.gates, cap.outputs):
        y.index_add_(0, t, g[:, None] * out)
    return y


# ------------------------------------------------------------------------------ batches
def test_count_tokens_is_one_definition():
    assert C.count_tokens({"input_ids": torch.zeros(4, 9, dtype=torch.long)}) == 32   # [B, T+1] predicts B*T
    assert C.count_tokens(torch.zeros(4, 9, dtype=torch.long)) == 36                  # ids fed as they are
    assert C.count_tokens(torch.zeros(5, 40)) == 5                                     # float features: one per row
    assert C.count_tokens({"x": torch.zeros(5, 40), "y": torch.zeros(5)}) == 5
    assert C.count_tokens("text") == 0


def test_iter_batches_reads_every_form_in_order():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"input_ids": [[i] * 5 for i in range(10)]})
    got = list(C.iter_batches(ds, 4))
    assert [len(b["input_ids"]) for b in got] == [4, 4, 2] and int(got[2]["input_ids"][1, 0]) == 9
    assert [len(b) for b in C.iter_batches(X, 40)] == [40, 40, 16]
    assert [len(b["x"]) for b in C.iter_batches({"x": X}, 64)] == [64, 32]
    assert list(C.iter_batches([X[:3]], 64))[0] is not None
    with pytest.raises(TypeError, match="DatasetDict"):
        list(C.iter_batches({"train": ds}, 4))


def test_layer_inputs_shapes():
    xs = C.layer_inputs(make_model(), X)
    assert [tuple(x.shape) for x in xs] == [(96, 16), (96, 16)]


def test_run_restores_every_module_mode_and_removes_hooks():
    model = make_model().train()
    model[1].eval()
    calls = []
    hook = model[0].register_forward_hook(lambda m, a, o: calls.append(m.training))
    C.run(model, [X], [hook])
    assert calls == [False] and model.training and not model[1].training
    model(X)
    assert len(calls) == 1  # the hook is gone


# ------------------------------------------------------------------------------ capture
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_capture_sees_every_routed_token_under_each_dispatch_strategy(strategy):
    model = make_model(strategy)
    caps = C.capture_experts(model, X)
    for cap, (x, y) in zip(caps, layer_io(model, X)):
        assert cap.num_tokens == 96 and sum(len(t) for t in cap.tokens) == 96 * 2   # T * k assignments
        for e, t in enumerate(cap.tokens):
            assert torch.equal(cap.inputs[e], x[t])
        assert torch.allclose(reassemble(cap), y, atol=1e-5)   # the captured pieces ARE the layer's output


def test_capture_is_the_same_whichever_strategy_runs_the_layer():
    caps = {s: C.capture_experts(make_model(s), X) for s in STRATEGIES}
    for s in ("loop", "grouped"):
        for a, b in zip(caps["naive"], caps[s]):
            assert all(torch.equal(ta, tb) for ta, tb in zip(a.tokens, b.tokens))
            assert all(torch.allclose(ga, gb) for ga, gb in zip(a.gates, b.gates))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_capture_leaves_out_assignments_dropped_by_capacity(strategy):
    model = make_model(strategy, capacity_factor=0.5)
    caps = C.capture_experts(model, X)
    for cap, (x, y) in zip(caps, layer_io(model, X)):
        assert sum(len(t) for t in cap.tokens) < 96 * 2
        assert torch.allclose(reassemble(cap), y, atol=1e-5)


def test_every_expert_mode_runs_all_experts_on_all_tokens():
    model = make_model("grouped")
    starved = moe_layers(model)[0]
    starve(starved, 3)
    routed = C.capture_experts(model, POSITIVE)
    every = C.capture_experts(model, POSITIVE, every_expert=True)
    assert len(routed[0].tokens[3]) == 0
    x, y = layer_io(model, POSITIVE)[0]
    assert all(torch.equal(t, torch.arange(96)) for t in every[0].tokens)
    assert torch.allclose(every[0].outputs[3], starved.experts.expert_forward(3, x), atol=1e-5)
    assert float(every[0].gates[3].abs().sum()) == 0.0               # not chosen: gate 0
    assert torch.allclose(reassemble(every[0]), y, atol=1e-5)
    assert C.capture_experts(model, POSITIVE, outputs=False)[0].outputs is None


# ------------------------------------------------------------------------------ coverage
def test_coverage_counts_tokens_and_flags_starved_experts():
    model = make_model()
    starve(moe_layers(model)[0], 5)
    cov = C.coverage(model, POSITIVE)
    caps = C.capture_experts(model, POSITIVE, outputs=False)
    for counts, cap in zip(cov.tokens, caps):
        assert counts.tolist() == [len(t) for t in cap.tokens] and int(counts.sum()) == 96 * 2
    assert cov.min_tokens == [16, 16] and cov.num_tokens == [96, 96]                # default threshold d_model
    assert (0, 5) in cov.flagged and int(cov.tokens[0][5]) == 0
    assert all(int(cov.tokens[l][e]) < 16 for l, e in cov.flagged)
    assert C.coverage(model, POSITIVE, min_tokens=0).flagged == []
    assert "layer 0" in str(cov) and "5 (0)" in str(cov) and "<table>" in cov._repr_html_()


def test_coverage_and_capture_refuse_bad_arguments():
    with pytest.raises(ValueError, match="min_tokens"):
        C.coverage(make_model(), X, min_tokens=-1)
    with pytest.raises(TypeError, match="every_expert"):
        C.capture_experts(make_model(), X, every_expert="yes")
    with pytest.raises(ValueError, match="calib: expected calibration data"):
        C.coverage(make_model(), None)
