"""Property-based tests (hypothesis) of the layers, the dispatch strategies and the quantizers.

Every test is derandomized (the same examples on every run and machine) and kept small, so CI is
reproducible and fast. Tensors are drawn from a seeded torch generator whose seed hypothesis picks;
shrinking still works on the sizes (tokens, d_model, experts, k, capacity factor, bits, ...).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_course.compress import quantization as Q
from moe_course.dispatch import STRATEGIES, capacity_mask, dispatch
from moe_course.factorized import CPMuMoE, MuMoEBlock, TRMuMoE, UnfactorizedMuMoE, entmax15
from moe_course.layers import Experts, SoftMoE, SparseMoE, TopKRouter

pytestmark = pytest.mark.usefixtures("single_thread")

FAST = settings(max_examples=40, deadline=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(FAST, max_examples=25)

seeds = st.integers(0, 2**31 - 1)
tokens = st.integers(0, 24)            # 0 and 1 token included
dims = st.integers(1, 20)              # odd sizes too: grouped_mm falls back when unaligned
activations = st.sampled_from(["gelu", "swiglu"])
capacity_factors = st.one_of(st.none(), st.floats(0.01, 3.0))  # tiny ones drop most assignments


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _experts(seed: int, E: int, d: int, h: int, activation: str) -> Experts:
    torch.manual_seed(seed)
    return Experts(E, d, h, activation)


def _reference(x, weights, indices, experts, keep):
    """``y_t = sum_j keep_tj w_tj E_{i_tj}(x_t)`` from every expert on every token (no dispatch)."""
    dense = experts.forward_all(x)                                   # [E, T, d]
    t = torch.arange(x.shape[0])[:, None].expand_as(indices)
    contrib = dense[indices, t] * weights[..., None]                  # [T, k, d]
    if keep is not None:
        contrib = contrib * keep[..., None]
    return contrib.sum(1)


# --------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------
@FAST
@given(seed=seeds, T=tokens, d=dims, h=dims, E=st.integers(1, 8), data=st.data(), activation=activations,
       mask=st.sampled_from(["none", "random", "all dropped"]), duplicates=st.booleans(),
       quantized=st.sampled_from([None, 4, 8]))
def test_dispatch_strategies_equal_the_dense_reference(seed, T, d, h, E, data, activation, mask, duplicates,
                                                        quantized):
    k = data.draw(st.integers(1, E), label="k")
    g = _gen(seed)
    experts = _experts(seed, E, d, h, activation)
    if quantized:  # packed experts dequantize in weights(): every strategy must still agree
        experts = Q.QuantizedExperts(experts, quantized)
    x = torch.randn(T, d, generator=g)
    if duplicates:  # several slots of a token on one expert (a merged router produces these)
        indices = torch.randint(0, E, (T, k), generator=g)
    else:
        indices = torch.rand(T, E, generator=g).argsort(dim=1)[:, :k]
    weights = torch.rand(T, k, generator=g) * 2 - 0.5
    keep = {"none": None, "random": torch.rand(T, k, generator=g) < 0.5,
            "all dropped": torch.zeros(T, k, dtype=torch.bool)}[mask]
    ref = _reference(x, weights, indices, experts, keep)
    outs = {s: dispatch(x, weights, indices, experts, s, keep) for s in STRATEGIES}
    for s, y in outs.items():
        assert y.shape == (T, d) and y.dtype == x.dtype and torch.isfinite(y).all(), s
        assert torch.allclose(y, ref, atol=1e-5, rtol=1e-4), (s, (y - ref).abs().max())
    if mask == "all dropped":
        assert all(torch.equal(y, torch.zeros(T, d)) for y in outs.values())


@FAST
@given(seed=seeds, T=tokens, E=st.integers(1, 8), data=st.data())
def test_capacity_mask_respects_capacity_and_gshard_priority(seed, T, E, data):
    k = data.draw(st.integers(1, E), label="k")
    cap = data.draw(st.integers(0, max(T * k, 1)), label="capacity")
    indices = torch.rand(T, E, generator=_gen(seed)).argsort(dim=1)[:, :k]
    keep = capacity_mask(indices, E, cap)
    assert keep.shape == (T, k) and keep.dtype == torch.bool
    for e in range(E):
        hit = indices == e
        assert int((keep & hit).sum()) == min(cap, int(hit.sum()))  # fill up to capacity, no more
        for j in range(k):
            kept_rows = (keep[:, j] & hit[:, j]).nonzero().squeeze(1)
            if kept_rows.numel():
                # earlier tokens first within a choice rank, and earlier ranks before later ones
                last = int(kept_rows.max())
                assert bool(keep[: last + 1, j][hit[: last + 1, j]].all())
                assert bool(keep[:, :j][hit[:, :j]].all())


# --------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------
@SLOW
@given(seed=seeds, T=tokens, d=dims, h=dims, E=st.integers(1, 8), data=st.data(), cf=capacity_factors,
       shared=st.integers(0, 1), activation=activations)
def test_sparse_moe_strategies_agree_including_dropped_tokens(seed, T, d, h, E, data, cf, shared, activation):
    k = data.draw(st.integers(1, E), label="k")
    torch.manual_seed(seed)
    layer = SparseMoE(d, E, h, k=k, capacity_factor=cf, num_shared_experts=shared, activation=activation).eval()
    with torch.no_grad():
        layer.router.gate.weight.normal_(0, 1.0)
    x = torch.randn(2, T, d, generator=_gen(seed + 1))  # a batch dimension too: [B, T, d]
    outs = {}
    for s in STRATEGIES:
        layer.dispatch = s
        outs[s] = layer(x)
        r = layer.last_routing
        assert outs[s].shape == x.shape and torch.isfinite(outs[s]).all()
        assert all(torch.isfinite(v) for v in layer.aux_losses.values())
    flat = x.reshape(-1, d)
    ref = _reference(flat, r.weights, r.indices, layer.experts, r.keep)
    if shared:
        ref = ref + layer.shared.forward_all(flat).sum(0)
    for s, y in outs.items():
        assert torch.allclose(y.reshape(-1, d), ref, atol=1e-5, rtol=1e-4), s
    cap = layer.capacity(flat.shape[0])
    if cap is not None:
        per_expert = torch.bincount(r.indices[r.keep], minlength=E)
        assert (per_expert <= cap).all()
        dropped = ~r.keep.any(dim=1)  # tokens that lost every expert: only the shared experts (or 0)
        if dropped.any():
            rest = layer.shared.forward_all(flat[dropped]).sum(0) if shared else torch.zeros(int(dropped.sum()), d)
            assert torch.allclose(outs["loop"].reshape(-1, d)[dropped], rest, atol=1e-6)


@FAST
@given(seed=seeds, T=tokens, d=dims, E=st.integers(1, 8), data=st.data(), renormalize=st.booleans(),
       scale=st.sampled_from([1e-3, 1.0, 1e2, 1e4]))
def test_top_k_router_outputs_are_a_valid_routing(seed, T, d, E, data, renormalize, scale):
    k = data.draw(st.integers(1, E), label="k")
    torch.manual_seed(seed)
    router = TopKRouter(d, E, k, renormalize=renormalize)
    r = router(torch.randn(T, d, generator=_gen(seed)) * scale)
    assert r.indices.shape == r.weights.shape == (T, k) and r.probs.shape == r.logits.shape == (T, E)
    assert torch.isfinite(r.probs).all() and torch.isfinite(r.weights).all()
    assert torch.allclose(r.probs.sum(-1), torch.ones(T), atol=1e-5) and (r.probs >= 0).all()
    assert all(len(set(row)) == k for row in r.indices.tolist())          # k distinct experts
    assert (r.weights[:, :-1] >= r.weights[:, 1:]).all()                  # best first
    chosen = r.probs.gather(1, r.indices)
    assert (chosen.min(1).values[:, None] >= r.probs.masked_fill(
        torch.zeros_like(r.probs, dtype=torch.bool).scatter(1, r.indices, True), -1)).all()  # true top-k
    if renormalize:
        assert torch.allclose(r.weights.sum(-1), torch.ones(T), atol=1e-5)
    else:
        assert torch.equal(r.weights, chosen)


@FAST
@given(seed=seeds, T=tokens, d=dims, h=dims, E=st.integers(1, 6), activation=activations, proj=st.booleans())
def test_soft_moe_of_identical_experts_is_that_expert(seed, T, d, h, E, activation, proj):
    """The gates are a convex combination (softmax): identical experts give exactly one expert's output."""
    torch.manual_seed(seed)
    layer = SoftMoE(d, E, h, activation=activation, output_proj=proj)
    with torch.no_grad():
        layer.router.gate.weight.normal_(0, 1.0)
        for w in (layer.experts.w_in, layer.experts.w_gate, layer.experts.w_out):
            if w is not None:
                w[1:] = w[0]
    x = torch.randn(T, d, generator=_gen(seed))
    y = layer(x)
    one = layer.experts.expert_forward(0, x)
    if proj:
        one = layer.proj(one)
    assert y.shape == (T, d) and torch.isfinite(y).all()
    assert torch.allclose(y, one, atol=1e-5, rtol=1e-4)


@SLOW
@given(seed=seeds, T=tokens, d=st.integers(2, 16), N=st.integers(1, 6), hier=st.booleans(),
       gate=st.sampled_from(["entmax15", "softmax"]), factorization=st.sampled_from(["cp", "tr"]))
def test_mumoe_block_shapes_finite_and_factorization_matches_the_full_tensor(seed, T, d, N, hier, gate,
                                                                             factorization):
    torch.manual_seed(seed)
    modes = (N, 2) if hier else N
    layer = (CPMuMoE(d, 5, modes, rank=3) if factorization == "cp" else TRMuMoE(d, 5, modes, ranks=(2, 3, 2) if not hier
             else (2, 2, 3, 2)))
    full = UnfactorizedMuMoE.from_weight(layer.weight_tensor().detach())
    g = _gen(seed)
    z = torch.randn(T, d, generator=g)
    coeffs = [torch.softmax(torch.randn(T, n, generator=g), -1) for n in layer.expert_modes]
    y = layer(z, coeffs)
    assert y.shape == (T, 5) and torch.isfinite(y).all()
    assert torch.allclose(y, full(z, coeffs), atol=1e-4, rtol=1e-4)
    block = MuMoEBlock(d, 8, modes, factorization, gate=gate, budget=10_000)
    out = block(torch.randn(3, T, d, generator=g))
    assert out.shape == (3, T, d) and torch.isfinite(out).all()


@FAST
@given(seed=seeds, rows=st.integers(0, 5), n=st.integers(1, 40), scale=st.sampled_from([1e-3, 1.0, 1e3, 1e4]))
def test_entmax15_is_a_sparse_distribution_invariant_to_shifts(seed, rows, n, scale):
    z = torch.randn(rows, n, generator=_gen(seed), dtype=torch.float64) * scale
    p = entmax15(z)
    assert p.shape == z.shape and torch.isfinite(p).all() and (p >= 0).all()
    assert torch.allclose(p.sum(-1), torch.ones(rows, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(entmax15(z + 123.0), p, atol=1e-9)
    if rows:
        # the closed form: p_i = (z_i/2 - tau)_+^2 with a single threshold per row
        tau = (z / 2 - p.sqrt()).masked_fill(p == 0, float("nan"))
        spread = tau.nan_to_num(float("-inf")).amax(1) - tau.nan_to_num(float("inf")).amin(1)
        assert (spread.abs() < 1e-6 * max(1.0, scale)).all()
        assert (p.argmax(-1) == z.argmax(-1)).all()


# --------------------------------------------------------------------------------------------
# quantizers
# --------------------------------------------------------------------------------------------
@FAST
@given(seed=seeds, rows=st.integers(1, 6), groups=st.integers(1, 4), data=st.data(),
       bits=st.sampled_from(Q.SUPPORTED_BITS), symmetric=st.booleans(),
       granularity=st.sampled_from(Q.GRANULARITIES),
       scale_dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       log_magnitude=st.integers(-6, 3), zeros=st.floats(0.0, 1.0))
def test_quantize_dequantize_error_is_at_most_half_a_step(seed, rows, groups, data, bits, symmetric, granularity,
                                                          scale_dtype, log_magnitude, zeros):
    group_size = data.draw(st.integers(1, 8), label="group_size")
    g = _gen(seed)
    w = torch.randn(rows, groups * group_size, generator=g) * 10.0 ** log_magnitude
    w = w.masked_fill(torch.rand(w.shape, generator=g) < zeros, 0.0)  # sprinkled (or all) zeros
    codes, scale, zero = Q.quantize_tensor(w, bits, symmetric, granularity,
                                           group_size if granularity == "group" else None, scale_dtype)
    assert codes.dtype == torch.uint8 and codes.shape == w.shape and int(codes.max()) < 2**bits
    assert scale.dtype == scale_dtype and (scale >= 0).all()
    back = Q.dequantize_tensor(codes, scale, zero)
    s = scale.float().reshape(-1, 1)
    err = (back - w).reshape(s.shape[0], -1).abs()
    assert (err <= s / 2 * (1 + 1e-6)).all(), float((err - s / 2).max())  # round to nearest
    assert torch.equal(back[w == 0], torch.zeros_like(back[w == 0]))      # zero is exact
    fq = Q.fake_quantize(w, bits, symmetric, granularity, group_size if granularity == "group" else None)
    assert fq.shape == w.shape and torch.isfinite(fq).all()


@FAST
@given(seed=seeds, shape=st.lists(st.integers(0, 9), min_size=1, max_size=3), bits=st.sampled_from(Q.SUPPORTED_BITS))
def test_pack_unpack_round_trip_is_exact_and_dense(seed, shape, bits):
    n = math.prod(shape)
    codes = torch.randint(0, 2**bits, shape, generator=_gen(seed)).to(torch.uint8)
    packed = Q.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(n / 8) * bits  # b bits per code, 8 codes in b bytes
    assert torch.equal(Q.unpack_codes(packed, bits, shape), codes)
    if bits == 4 and n >= 2:  # the documented layout: code 2j in the low nibble, 2j+1 in the high one
        flat = codes.reshape(-1)
        assert int(packed[0]) == int(flat[0]) | (int(flat[1]) << 4)


@SLOW
@given(seed=seeds, T=tokens, E=st.integers(1, 4), bits=st.sampled_from(Q.SUPPORTED_BITS),
       group=st.sampled_from([None, 4, 8]), activation=activations, symmetric=st.booleans())
def test_quantized_experts_equal_fake_quantized_dense_experts(seed, T, E, bits, group, activation, symmetric):
    """Packed storage computes exactly what fake quantization of the same weights computes."""
    dense = _experts(seed, E, 8, 16, activation)
    q = Q.QuantizedExperts(dense, bits, group_size=group, symmetric=symmetric)
    gran = "channel" if group is None else "group"
    for got, w in zip(q.weights(), dense.weights()):
        if w is None:
            assert got is None
            continue
        # [out, in] rows, groups along the input dimension, float16 scales: as QuantizedExperts stores them
        want = torch.stack([Q.dequantize_tensor(*Q.quantize_tensor(w[i].t().contiguous(), bits, symmetric, gran,
                                                                    group, torch.float16)).t() for i in range(E)])
        assert torch.equal(got, want)
    x = torch.randn(T, 8, generator=_gen(seed))
    assert torch.allclose(q.forward_all(x), torch.stack([q.expert_forward(i, x) for i in range(E)]), atol=1e-5)
