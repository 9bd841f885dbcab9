"""Numerical edge cases: routers in float32 under autocast, zero and huge inputs, zero quantization
groups, extreme gate logits, merging unused experts, and SVD of rank-deficient weights."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from moe_course.compress import lowrank as LR
from moe_course.compress import merging as M
from moe_course.compress import quantization as Q
from moe_course.factorized import MuMoE, MuMoEBlock, MuMoEGate, entmax15
from moe_course.layers import Experts, SoftMoE, SparseMoE, TopKRouter, moe_layers
from moe_course.losses import coefficient_of_variation_sq, load_balancing_loss, router_z_loss
from moe_course.models import ClassifierConfig, model_from_config

pytestmark = pytest.mark.usefixtures("single_thread")

HALF = [torch.bfloat16, torch.float16]


def _seeded(fn, seed=0):
    torch.manual_seed(seed)
    return fn()


# --------------------------------------------------------------------------------------------
# routers compute in float32 under autocast
# --------------------------------------------------------------------------------------------
ROUTED = {
    "soft": lambda: SoftMoE(32, 4, 32),
    "sparse-loop": lambda: SparseMoE(32, 8, 32, k=2, dispatch="loop"),
    "sparse-grouped": lambda: SparseMoE(32, 8, 32, k=2, dispatch="grouped", activation="swiglu"),
    "sparse-capacity-shared": lambda: SparseMoE(32, 8, 32, k=2, capacity_factor=1.0, num_shared_experts=1),
}


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", list(ROUTED))
def test_router_is_float32_under_autocast_and_chooses_like_fp32(name, dtype):
    layer = _seeded(ROUTED[name]).eval()
    with torch.no_grad():
        layer.router.gate.weight.normal_(0, 1.0)  # spread logits: many near-ties for bf16 to flip
    x = torch.randn(256, 32)
    with torch.no_grad():
        layer(x)
        ref = layer.last_routing
        with torch.autocast("cpu", dtype=dtype):
            y = layer(x)
        r = layer.last_routing
    for t in (r.logits, r.probs, r.weights):
        assert t.dtype == torch.float32
    assert torch.equal(r.logits, ref.logits) and torch.equal(r.indices, ref.indices)
    assert torch.equal(r.weights, ref.weights)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in layer.aux_losses.values())
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("dtype", HALF)
def test_router_on_half_inputs_returns_float32_and_fp32_choices(dtype):
    router = _seeded(lambda: TopKRouter(32, 8, k=2))
    with torch.no_grad():
        router.gate.weight.normal_(0, 1.0)
    x = torch.randn(512, 32).to(dtype)
    r = router(x)
    ref = router(x.float())  # the same (rounded) tokens, routed in fp32
    assert r.logits.dtype == r.weights.dtype == torch.float32
    assert torch.equal(r.indices, ref.indices) and torch.equal(r.logits, ref.logits)
    # what the float32 guard prevents: routing in half precision flips top-k choices
    half_logits = nn.functional.linear(x, router.gate.weight.to(dtype)).float()
    flipped = (half_logits.topk(2, dim=-1).indices != ref.indices).any(-1).float().mean()
    assert flipped > 0


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("gate", ["entmax15", "softmax"])
@pytest.mark.parametrize("normalization", ["ln", "none"])
def test_mumoe_gate_is_float32_under_autocast(dtype, gate, normalization):
    g = MuMoEGate(32, 16, normalization=normalization, activation=gate)
    with torch.no_grad():
        for w in g.weights:
            w.normal_(0, 1.0)
    x = torch.randn(256, 32)
    ref = g(x)[0]
    with torch.autocast("cpu", dtype=dtype):
        coef, logits = g(x)[0], g.logits(x)[0]
    assert coef.dtype == logits.dtype == torch.float32
    assert torch.equal(coef, ref)
    assert torch.equal(coef > 0, ref > 0)  # entmax's sparse support (the chosen experts) is unchanged


@pytest.mark.parametrize("factorization", ["cp", "tr", "none"])
def test_mumoe_runs_in_bfloat16_with_float32_gates(factorization):
    kw = {"rank": 8} if factorization == "cp" else {"ranks": (4, 4, 4, 4)} if factorization == "tr" else {}
    layer = _seeded(lambda: MuMoE(16, 8, (4, 2), factorization, **kw))
    with torch.no_grad():
        for w in layer.gate.weights:
            w.normal_(0, 0.3)
    x = torch.randn(10, 16)
    ref = layer(x)
    half = copy.deepcopy(layer).to(torch.bfloat16)  # a model cast to bf16 (no autocast)
    y = half(x.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert torch.allclose(y.float(), ref, atol=0.1, rtol=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y2 = layer(x)
    assert torch.isfinite(y2).all() and torch.allclose(y2.float(), ref, atol=0.1, rtol=0.05)


def test_classifier_under_autocast_routes_like_fp32():
    cfg = ClassifierConfig(d_model=32, n_layers=2, n_heads=2, num_experts=8, k=2, d_hidden=32)
    model = _seeded(lambda: model_from_config(cfg)).eval()
    x = torch.randn(64, cfg.input_length)
    with torch.no_grad():
        out32 = model(x)
        ref = [l.last_routing.indices.sort(-1).values for l in moe_layers(model)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out16 = model(x)
        got = [l.last_routing for l in moe_layers(model)]
    assert all(r.logits.dtype == torch.float32 for r in got)
    # the layer inputs differ by bf16 rounding, so only near-ties may flip
    agree = torch.cat([(r.indices.sort(-1).values == i).all(-1) for r, i in zip(got, ref)]).float().mean()
    assert agree > 0.9
    assert torch.isfinite(out16).all() and (out16.float().argmax(-1) == out32.argmax(-1)).float().mean() > 0.9


# --------------------------------------------------------------------------------------------
# zero and very large inputs
# --------------------------------------------------------------------------------------------
# Layers that are degree 1 in x (GELU experts, LayerNorm / no-norm gates) must stay finite up to
# 1e30. SwiGLU multiplies two projections of x (degree 2), so 1e30 inputs overflow float32 by
# construction (1e60); they are checked up to 1e15. BatchNorm's batch statistics square x too.
LINEAR_SCALE = [0.0, 1e4, -1e4, 1e30, -1e30]
QUADRATIC_SCALE = [0.0, 1e4, -1e4, 1e15]
LAYERS = {
    "soft-gelu": (lambda: SoftMoE(16, 4, 32), LINEAR_SCALE),
    "soft-swiglu-proj": (lambda: SoftMoE(16, 4, 32, activation="swiglu", output_proj=True), QUADRATIC_SCALE),
    "sparse-naive": (lambda: SparseMoE(16, 4, 32, k=2, dispatch="naive"), LINEAR_SCALE),
    "sparse-loop-capacity": (lambda: SparseMoE(16, 4, 32, k=2, dispatch="loop", capacity_factor=0.5), LINEAR_SCALE),
    "sparse-grouped-shared": (lambda: SparseMoE(16, 4, 32, k=2, dispatch="grouped", num_shared_experts=1),
                              LINEAR_SCALE),
    "sparse-noisy-top1": (lambda: SparseMoE(16, 4, 32, k=1, noisy=True, renormalize=False), LINEAR_SCALE),
    "sparse-swiglu": (lambda: SparseMoE(16, 4, 32, k=2, activation="swiglu"), QUADRATIC_SCALE),
    "mumoe-cp-ln-entmax": (lambda: MuMoEBlock(16, 32, 8, "cp"), LINEAR_SCALE),
    "mumoe-tr-ln-entmax": (lambda: MuMoEBlock(16, 32, 8, "tr"), LINEAR_SCALE),
    "mumoe-cp-softmax-hier": (lambda: MuMoEBlock(16, 32, (4, 2), "cp", gate="softmax"), LINEAR_SCALE),
    "mumoe-none-norm": (lambda: MuMoEBlock(16, 32, 8, "cp", normalization="none"), LINEAR_SCALE),
    "mumoe-unfactorized": (lambda: MuMoE(16, 8, 6, "none"), LINEAR_SCALE),
    "mumoe-bn": (lambda: MuMoEBlock(16, 32, 8, "cp", normalization="bn"), [0.0, 1e4, -1e4]),
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_zero_and_huge_inputs_give_finite_outputs_losses_and_gradients(name, training):
    make, scales = LAYERS[name]
    layer = _seeded(make).train(training)
    gate = getattr(layer, "gate", None)
    if isinstance(gate, MuMoEGate):  # zero-initialised gates would hide the gate's numerics
        with torch.no_grad():
            for w in gate.weights:
                w.normal_(0, 0.3)
    for scale in scales:
        torch.manual_seed(1)
        x = (torch.randn(3, 7, 16) * scale).requires_grad_(True)
        y = layer(x)
        assert y.shape == x.shape[:-1] + (y.shape[-1],)
        assert torch.isfinite(y).all(), (name, scale)
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        assert torch.isfinite(x.grad).all(), (name, scale)
        for key, loss in getattr(layer, "aux_losses", {}).items():
            assert not torch.isnan(loss) and loss >= 0, (name, scale, key)
            # ST-MoE's z-loss squares logsumexp(logits): logits of ~1e29 give 1e58, beyond float32
            assert torch.isfinite(loss) or (key == "z" and abs(scale) > 1e18), (name, scale, key)
        if scale == 0 and isinstance(layer, SparseMoE) and layer.shared is None:
            assert torch.equal(y, torch.zeros_like(y))  # bias-free experts map 0 to 0


def test_losses_on_extreme_logits():
    E = 8
    for logits in (torch.zeros(5, E), torch.full((5, E), 1e4), torch.full((5, E), -1e4),
                   torch.tensor([[1e4] + [-1e4] * (E - 1)] * 5)):
        probs = torch.softmax(logits, -1)
        idx = probs.topk(2, -1).indices
        bal, z = load_balancing_loss(probs, idx, E), router_z_loss(logits)
        assert torch.isfinite(bal) and torch.isfinite(z)
    assert router_z_loss(torch.zeros(5, E)) == pytest.approx(math.log(E) ** 2)  # lse of equal logits
    assert router_z_loss(torch.full((3, E), 1e4)) == pytest.approx((1e4 + math.log(E)) ** 2, rel=1e-6)
    one_expert = torch.zeros(6, E)
    one_expert[:, 0] = 1.0
    assert load_balancing_loss(one_expert, torch.zeros(6, 1, dtype=torch.long), E) == pytest.approx(E)
    assert load_balancing_loss(torch.zeros(0, E), torch.zeros(0, 2, dtype=torch.long), E) == 0
    assert router_z_loss(torch.zeros(0, E)) == 0
    assert coefficient_of_variation_sq(torch.zeros(E)) == 0


# --------------------------------------------------------------------------------------------
# quantization: a group of zeros (scale 0), scales that float16 cannot hold
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", Q.SUPPORTED_BITS)
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_all_zero_group_round_trips_to_exact_zeros(bits, symmetric, scale_dtype):
    torch.manual_seed(0)
    w = torch.randn(4, 16)
    w[1] = 0.0            # a zero row (channel)
    w[2, 8:] = 0.0        # a zero group inside a non-zero row
    for gran, gs in (("channel", None), ("group", 8)):
        codes, scale, zero = Q.quantize_tensor(w, bits, symmetric, gran, gs, scale_dtype)
        back = Q.dequantize_tensor(codes, scale, zero)
        groups = back.reshape(scale.shape[0], -1)
        src = w.reshape(scale.shape[0], -1)
        empty = (src == 0).all(dim=1)
        assert empty.any()
        assert torch.equal(scale[empty].float(), torch.zeros_like(scale[empty].float()))
        assert torch.equal(groups[empty], torch.zeros_like(groups[empty]))  # exact, not just close
        assert (groups[empty] == 0).all() and not torch.signbit(groups[empty]).any()  # no -0.0 either
        assert torch.isfinite(back).all()
        # and the packed round trip keeps them
        packed = Q.pack_codes(codes, bits)
        assert torch.equal(Q.unpack_codes(packed, bits, codes.shape), codes)
    zeros = torch.zeros(3, 8)
    for gran in Q.GRANULARITIES:
        c, s, z = Q.quantize_tensor(zeros, bits, symmetric, gran, 4 if gran == "group" else None, scale_dtype)
        assert torch.equal(Q.dequantize_tensor(c, s, z), zeros)
        assert torch.equal(Q.fake_quantize(zeros, bits, symmetric, gran, 4 if gran == "group" else None), zeros)


def test_quantized_experts_with_an_all_zero_expert():
    ex = _seeded(lambda: Experts(3, 16, 32, "swiglu"))
    with torch.no_grad():
        for w in (ex.w_in, ex.w_gate, ex.w_out):
            w[1] = 0.0
    for bits in Q.SUPPORTED_BITS:
        q = Q.QuantizedExperts(ex, bits, group_size=8)
        w_in, w_gate, w_out = q.weights()
        assert all(torch.equal(w[1], torch.zeros_like(w[1])) for w in (w_in, w_gate, w_out))
        assert torch.equal(q.expert_forward(1, torch.randn(5, 16)), torch.zeros(5, 16))


@pytest.mark.parametrize("bits", Q.SUPPORTED_BITS)
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [1e-8, 1e-3, 1.0, 3e3])
def test_half_precision_scales_keep_the_rounding_bound(bits, symmetric, scale_dtype, magnitude):
    """The stored (rounded) scale is rounded up, so |w - w_hat| <= s/2 holds with the stored s;
    float16 used to flush scales of tiny weights to 0 (every weight lost) and bf16 rounding down
    pushed extreme weights out of the code range."""
    torch.manual_seed(0)
    w = torch.randn(64, 32) * magnitude
    codes, scale, zero = Q.quantize_tensor(w, bits, symmetric, "group", 8, scale_dtype)
    back = Q.dequantize_tensor(codes, scale, zero)
    s = scale.float().reshape(-1, 1)
    err = (back - w).reshape(-1, 8).abs()
    assert (err <= s / 2).all()
    assert (scale.float() > 0).all()


@pytest.mark.parametrize("scale_dtype", [torch.float16])
def test_scale_beyond_the_scale_dtype_is_a_clear_error_not_nan(scale_dtype):
    w = torch.randn(4, 8) * 1e8  # 8-bit scale ~1e6 > float16 max 65504
    with pytest.raises(ValueError, match="scale_dtype"):
        Q.quantize_tensor(w, 8, False, "channel", None, scale_dtype)
    codes, scale, zero = Q.quantize_tensor(w, 8, False, "channel", None, torch.float32)
    assert torch.isfinite(Q.dequantize_tensor(codes, scale, zero)).all()


# --------------------------------------------------------------------------------------------
# entmax-1.5 and softmax gates on extreme logits
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("phi", [entmax15, lambda z: torch.softmax(z, -1)], ids=["entmax15", "softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gates_stable_for_large_logits(phi, dtype):
    n = 6
    cases = {
        "one huge": (torch.tensor([1e4, -1e4, 0, 0, 0, 0]), torch.tensor([1.0, 0, 0, 0, 0, 0])),
        "one tiny": (torch.tensor([-1e4, 0, 0, 0, 0, 0]), torch.tensor([0, 0.2, 0.2, 0.2, 0.2, 0.2])),
        "equal": (torch.zeros(n), torch.full((n,), 1 / n)),
        "equal huge": (torch.full((n,), 1e4), torch.full((n,), 1 / n)),
        "equal very negative": (torch.full((n,), -1e4), torch.full((n,), 1 / n)),
        "two tied maxima": (torch.tensor([1e4, 1e4, -1e4, 0, 0, -1e4]), torch.tensor([0.5, 0.5, 0, 0, 0, 0])),
    }
    for name, (z, expected) in cases.items():
        zz = z.to(dtype).repeat(3, 1).requires_grad_(True)
        p = phi(zz)
        assert p.dtype == dtype and torch.isfinite(p).all(), name
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
        assert torch.allclose(p.double(), expected.double().expand(3, -1), atol=tol), (name, p)
        (p * torch.arange(n, dtype=dtype)).sum().backward()
        assert torch.isfinite(zz.grad).all(), name


def test_entmax_is_sparse_where_softmax_is_not_and_nan_propagates():
    z = torch.tensor([[3.0, 2.9, -1e4, 0.0]])
    assert (entmax15(z) == 0).sum() >= 2 and (torch.softmax(z, -1) > 0).sum() >= 3
    for bad in (torch.tensor([[float("nan"), 1.0, 2.0]]), torch.full((1, 40), float("nan"))):
        assert torch.isnan(entmax15(bad)).all()  # NaN in, NaN out (like softmax), not an IndexError
    assert torch.equal(entmax15(torch.tensor([[float("-inf"), 0.0]])), torch.tensor([[0.0, 1.0]]))


# --------------------------------------------------------------------------------------------
# merging experts nobody uses
# --------------------------------------------------------------------------------------------
def test_frequency_weighted_merge_with_zero_frequencies():
    w = torch.randn(3, 4, 5)
    assert torch.allclose(M.frequency_weighted_merge(w, torch.zeros(3)), w.mean(0), atol=1e-6)
    assert torch.allclose(M.frequency_weighted_merge(w, torch.tensor([0.0, 2.0, 0.0])), w[1], atol=1e-6)
    assert torch.allclose(M.frequency_weighted_merge(w, torch.tensor([1.0, 3.0, 0.0])), 0.25 * w[0] + 0.75 * w[1],
                          atol=1e-6)
    tiny = M.frequency_weighted_merge(w, torch.tensor([1e-300, 0.0, 0.0], dtype=torch.float64))  # tiny total
    assert torch.isfinite(tiny).all() and torch.allclose(tiny, w[0], atol=1e-6)


class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.moe1 = SparseMoE(8, 6, 12, k=2)
        self.moe2 = SparseMoE(8, 6, 12, k=2, activation="swiglu")

    def forward(self, x):
        x = x + self.moe1(x)
        return x + self.moe2(x)


def _model_with_unused_experts(unused=(3, 4, 5)):
    model = _seeded(_TwoLayers)
    with torch.no_grad():
        for layer in moe_layers(model):
            g = layer.router.gate.weight
            g.abs_()                    # positive tokens -> positive logits for the used experts
            g[list(unused)] = -10.0     # and very negative ones for these: never chosen
    return model


@pytest.mark.parametrize("method", ["m-smoe", "hc-smoe", "mc-smoe"])
def test_merging_with_unused_experts_is_finite(method):
    model = _model_with_unused_experts()
    torch.manual_seed(2)
    calib = [torch.randn(64, 8).abs() + 0.1 for _ in range(2)]  # positive tokens
    freq = M._frequencies(model.moe1, calib[0])
    assert (freq[[3, 4, 5]] == 0).all() and freq.sum() == pytest.approx(1)
    # 4 groups from 3 used experts: a group made only of unused experts (frequency 0 everywhere)
    if method == "m-smoe":
        merged = M.merge_experts(model, 4, calib=calib)
    elif method == "hc-smoe":
        merged = M.hc_smoe(model, 4, calib=calib)
    else:
        merged = M.mc_smoe(model, 4, calib=calib, rank=2, keep_sparse=0.1)
    for layer in moe_layers(merged):
        for w in layer.experts.weights():
            if w is not None:
                assert torch.isfinite(w).all()
    y = merged(torch.randn(32, 8).abs())
    assert torch.isfinite(y).all()

    # without alignment the merge is checkable exactly: a group nobody uses gets the plain average,
    # a group with users the frequency-weighted average (its unused members weigh 0)
    plain = M.merge_experts(model, 4, calib=calib, align=False)
    layer, src = moe_layers(plain)[0], moe_layers(model)[0]
    freq = M._frequencies(src, torch.cat(calib))
    assert any(all(m in (3, 4, 5) for m in members) for members in layer.merged_groups)
    for grp, members in enumerate(layer.merged_groups):
        f = freq[members]
        f = torch.ones_like(f) if f.sum() == 0 else f
        want = sum(fi * src.experts.w_in[m].double() for fi, m in zip(f / f.sum(), members))
        assert torch.allclose(layer.experts.w_in[grp].double(), want, atol=1e-6)


def test_merged_router_with_huge_logits_is_finite():
    model = _model_with_unused_experts(unused=())
    merged = M.merge_experts(model, 3, calib=[torch.randn(64, 8).abs()])
    router = moe_layers(merged)[0].router
    r = router(torch.randn(16, 8) * 1e4)
    assert torch.isfinite(r.logits).all() and torch.isfinite(r.weights).all() and torch.isfinite(r.probs).all()
    assert torch.allclose(r.probs.sum(-1), torch.ones(16))


def test_stable_rank_of_a_zero_matrix_is_zero():
    assert torch.equal(M.stable_rank(torch.zeros(2, 4, 5)), torch.zeros(2))
    assert M.stable_rank(torch.eye(4)) == pytest.approx(4.0)


# --------------------------------------------------------------------------------------------
# SVD of rank-deficient weights
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (3, 5, 4)])
def test_truncated_svd_of_zeros_is_exactly_zero(shape):
    z = torch.zeros(*shape)
    for rank in range(0, min(shape[-2:]) + 1):
        left, right = LR.truncated_svd(z, rank)
        assert left.shape == (*shape[:-1], rank) and right.shape == (*shape[:-2], rank, shape[-1])
        assert torch.isfinite(left).all() and torch.isfinite(right).all()
        assert torch.equal(left @ right, z)


@pytest.mark.parametrize("true_rank", [1, 2])
def test_truncated_svd_of_rank_deficient_matrix_is_exact_beyond_its_rank(true_rank):
    torch.manual_seed(0)
    w = torch.randn(10, true_rank) @ torch.randn(true_rank, 7)
    for rank in range(true_rank, 8):
        left, right = LR.truncated_svd(w, rank)
        assert torch.isfinite(left).all() and torch.isfinite(right).all()
        assert torch.allclose(left @ right, w, atol=1e-5)
    if true_rank > 1:
        l1, r1 = LR.truncated_svd(w, true_rank - 1)
        assert (l1 @ r1 - w).norm() > 1e-3  # below the rank it cannot be exact (the test can fail)


def test_lowrank_and_shared_experts_with_zero_and_identical_experts():
    ex = _seeded(lambda: Experts(3, 8, 12, "swiglu"))
    with torch.no_grad():
        for w in (ex.w_in, ex.w_gate, ex.w_out):
            w[0] = 0.0          # an all-zero expert (rank 0)
            w[2] = w[1]         # two identical experts: W_i - mean is rank deficient
    for rank in (1, 4, 8):
        le = LR.LowRankExperts(ex, rank)
        assert all(torch.equal(w[0], torch.zeros_like(w[0])) for w in le.weights())
        assert all(torch.isfinite(w).all() for w in le.weights())
    assert LR.rank_for_energy(torch.zeros(5), 0.9) == 1
    # identical experts: every delta W_i - mean is a zero matrix (rank 0), whatever rank is asked
    same = _seeded(lambda: Experts(3, 8, 12, "swiglu"))
    with torch.no_grad():
        for w in (same.w_in, same.w_gate, same.w_out):
            w[1:] = w[0]
    for rank in (0, 2, 8):
        se = LR.SharedExperts(same, rank)
        for got, want in zip(se.weights(), same.weights()):
            assert torch.isfinite(got).all() and torch.allclose(got, want, atol=1e-6)
    full = LR.SharedExperts(ex, 8)  # full-rank deltas: exact, with a zero expert among them
    for got, want in zip(full.weights(), ex.weights()):
        assert torch.isfinite(got).all() and torch.allclose(got, want, atol=1e-5)
    model = _TwoLayers()
    with torch.no_grad():
        for layer in moe_layers(model):
            layer.experts.w_in[0] = 0.0
    for out in (LR.lowrank_experts(model, keep=0.9), LR.lowrank_experts(model, keep=3),
                LR.share_experts(model, keep=0)):
        assert torch.isfinite(out(torch.randn(5, 8))).all()
