"""compress.quantization: RTN error bounds, packing, QuantizedExperts, whole-model quantize."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
import torch.nn as nn

from moe_course.compress.quantization import (
    QuantizedEmbedding, QuantizedExperts, QuantizedLinear, dequantize_tensor, fake_quantize, mixed_precision_bits,
    pack_codes, quantize, quantize_rest, quantize_tensor, unpack_codes,
)
from moe_course.dispatch import STRATEGIES
from moe_course.layers import SparseMoE, moe_layers
from moe_course.metrics import size_report


class TinyMoE(nn.Module):
    def __init__(self, d=32, h=64, e=4):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, d)
        self.proj = nn.Linear(d, d)
        self.ffn = SparseMoE(d, e, h, k=2, activation="swiglu")

    def forward(self, idx):
        x = self.proj(self.emb(idx))
        return x + self.ffn(x)


def state_hash(model):
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def element_scale(scale, shape):
    g = int(torch.Size(shape).numel()) // scale.numel()
    return scale.float().expand(-1, g).reshape(shape)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("granularity,group_size", [("tensor", None), ("channel", None), ("group", 8)])
def test_round_trip_error_within_half_a_step(bits, symmetric, granularity, group_size):
    w = torch.randn(12, 32) * torch.rand(12, 1) * 3
    q, s, z = quantize_tensor(w, bits, symmetric, granularity, group_size)
    assert q.dtype == torch.uint8 and q.shape == w.shape and int(q.max()) < 2 ** bits
    err = (w - dequantize_tensor(q, s, z)).abs()
    assert (err <= element_scale(s, w.shape) / 2 + 1e-6).all()


def test_more_bits_and_finer_groups_give_smaller_error():
    w = torch.randn(64, 64)
    errs = [(w - fake_quantize(w, b, granularity="channel")).pow(2).mean() for b in (2, 3, 4, 8)]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    tensor = (w - fake_quantize(w, 4)).pow(2).mean()
    group = (w - fake_quantize(w, 4, granularity="group", group_size=8)).pow(2).mean()
    assert group < tensor


@pytest.mark.parametrize("symmetric", [False, True])
def test_zero_group_round_trips_to_exact_zero(symmetric):
    w = torch.randn(4, 16)
    w[1] = 0
    q, s, z = quantize_tensor(w, 4, symmetric, "channel")
    assert s[1].item() == 0
    assert torch.equal(dequantize_tensor(q, s, z)[1], torch.zeros(16))


def test_asymmetric_represents_zero_exactly():
    w = torch.tensor([[0.0, 0.3, 1.0, 0.7]])
    assert fake_quantize(w, 2)[0, 0].item() == 0.0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 8, 33])
def test_pack_unpack_identity_and_size(bits, n):
    codes = torch.randint(0, 2 ** bits, (n,), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 8) * bits
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_two_4bit_codes_per_byte_low_nibble_first():
    packed = pack_codes(torch.tensor([1, 2, 3, 4, 5, 6, 7, 8], dtype=torch.uint8), 4)
    assert packed.tolist() == [0x21, 0x43, 0x65, 0x87]


def test_fake_quantize_ste_passes_gradient():
    w = torch.randn(4, 8, requires_grad=True)
    fake_quantize(w, 4, ste=True).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_quantized_experts_match_fake_quant_in_every_dispatch(strategy):
    torch.manual_seed(1)
    layer = SparseMoE(32, 4, 64, k=2, activation="swiglu", dispatch=strategy)
    qe = QuantizedExperts(layer.experts, 4, group_size=16, scale_dtype=torch.float32)
    assert (qe.num_experts, qe.d_model, qe.d_hidden, qe.params_per_expert) == (4, 32, 64, 3 * 32 * 64)
    assert not list(qe.parameters())
    ref = fake_quantize(layer.experts.w_in.detach().transpose(1, 2), 4, granularity="group", group_size=16)
    assert torch.allclose(qe.w_in, ref.transpose(1, 2), atol=1e-6)
    x = torch.randn(20, 32)
    ref = copy.deepcopy(layer)  # fp32 layer holding the dequantized weights: must give the same output
    with torch.no_grad():
        for name in ("w_in", "w_gate", "w_out"):
            getattr(ref.experts, name).copy_(getattr(qe, name))
    layer.experts = qe
    assert torch.allclose(layer(x), ref(x), atol=1e-5)
    assert torch.allclose(qe[2](x), qe.expert_forward(2, x))


def test_quantize_8bit_close_and_about_4x_smaller_experts():
    model = TinyMoE()
    before = state_hash(model)
    idx = torch.randint(0, 10, (3, 5))
    q = quantize(model, 8)
    assert state_hash(model) == before  # input untouched
    assert isinstance(moe_layers(q)[0].experts, QuantizedExperts)
    assert not isinstance(moe_layers(model)[0].experts, QuantizedExperts)
    y, yq = model(idx), q(idx)
    assert (yq - y).abs().max() < 1e-2 * y.abs().max()
    r0, r1 = size_report(model), size_report(q)
    assert 3.5 < r0.expert_bytes / r1.expert_bytes <= 4
    assert r1.total_params == r0.total_params and r1.flops_per_token == r0.flops_per_token


def test_quantize_4bit_group_more_than_6x_smaller():
    model = TinyMoE()
    q = quantize(model, 4, group_size=32)
    assert size_report(model).expert_bytes / size_report(q).expert_bytes > 6


def test_targets_all_shrinks_linear_and_embedding_but_not_router():
    model = TinyMoE()
    idx = torch.randint(0, 10, (2, 4))
    q = quantize(model, 4, group_size=16, targets="all")
    assert type(q.ffn.router.gate) is nn.Linear
    assert not isinstance(q.proj.weight, nn.Parameter) and not isinstance(q.emb.weight, nn.Parameter)
    assert size_report(q).bytes < size_report(quantize(model, 4, group_size=16)).bytes
    assert (q(idx) - model(idx)).abs().max() < 0.2 * model(idx).abs().max()


def test_quantize_and_quantize_rest_share_one_group_size_rule():
    """A group size must divide the experts' widths (quantize raises); a non-expert layer whose input
    width it does not divide gets one scale per row, in quantize(targets="all") and quantize_rest alike."""
    model = TinyMoE()
    model.odd = nn.Linear(24, 8)                      # 24 is not a multiple of 16
    for q in (quantize(model, 4, group_size=16, targets="all", other_bits=8), quantize_rest(model, 8, group_size=16)):
        assert isinstance(q.proj, QuantizedLinear) and q.proj.group_size == 16
        assert isinstance(q.emb, QuantizedEmbedding) and q.emb.group_size == 16
        assert isinstance(q.odd, QuantizedLinear) and q.odd.group_size is None
        assert type(q.ffn.router.gate) is nn.Linear   # routers stay fp32 in both
    a = quantize(model, 4, group_size=16, targets="all", other_bits=8)
    b = quantize_rest(quantize(model, 4, group_size=16), 8, group_size=16)
    assert torch.equal(a.proj.weight, b.proj.weight) and torch.equal(a.odd.weight, b.odd.weight)
    with pytest.raises(ValueError, match="group_size: must divide"):
        quantize(model, 4, group_size=24)


def test_inplace_modifies_the_model():
    model = TinyMoE()
    out = quantize(model, 4, inplace=True)
    assert out is model and isinstance(model.ffn.experts, QuantizedExperts)


def test_mixed_bits_per_expert_and_allocation():
    class S:  # the protocol mixed_precision_bits reads: .frequency per layer
        def __init__(self, f):
            self.frequency = torch.tensor(f)

    stats = [S([0.55, 0.25, 0.15, 0.05]), S([0.25, 0.25, 0.25, 0.25])]
    bits = mixed_precision_bits(stats, 4)
    flat = [b for row in bits for b in row]
    assert sum(flat) / len(flat) <= 4 and len(bits[0]) == 4
    assert bits[0][0] >= bits[0][3]  # the busy expert gets at least as many bits as the rare one
    q = quantize(TinyMoE(), [bits[0]])
    assert q.ffn.experts.bits == bits[0]
    with pytest.raises(ValueError, match="avg_bits"):
        mixed_precision_bits(stats, 1)


def test_bad_arguments_raise_clear_errors():
    model = TinyMoE()
    with pytest.raises(ValueError, match="bits"):
        quantize(model, 5)
    with pytest.raises(ValueError, match="bits"):
        quantize(model, [4, 4])  # one layer only
    with pytest.raises(ValueError, match="group_size"):
        quantize(model, 4, group_size=24)
    with pytest.raises(ValueError, match="targets"):
        quantize(model, 4, targets="attention")
    with pytest.raises(ValueError, match="no MoE layers"):
        quantize(nn.Sequential(nn.Linear(4, 4)), 4)
    with pytest.raises(ValueError, match="group_size"):
        quantize_tensor(torch.randn(4, 10), 4, granularity="group", group_size=3)
    with pytest.raises(ValueError, match="bits"):
        quantize_tensor(torch.randn(4, 10), 1)
    with pytest.raises(ValueError, match="codes"):
        pack_codes(torch.tensor([16], dtype=torch.uint8), 4)
    with pytest.raises(TypeError, match="experts"):
        QuantizedExperts(nn.Linear(2, 2), 4)


# ------------------------------------------------------------------------------ packed-weight kernels
@pytest.mark.parametrize("bits, group_size, kind", [(8, None, "int8"), (4, 32, "int4"), (4, 64, "int4"),
                                                    (3, 32, "dequant"), (8, 32, "dequant")])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_kernel_path_equals_dequantize_then_matmul(bits, group_size, kind, activation):
    """With bf16 activations, dispatch 'auto' runs QuantizedExperts through torch's int8/int4 weight-only
    kernels: the same function as dequantizing every expert and running the float loop, up to bf16
    rounding; fp32 activations keep the dequantize-then-matmul path."""
    from moe_course.compress.quantization import QuantizedExperts
    from moe_course.dispatch import capacity_mask, dispatch
    from moe_course.layers import Experts

    torch.manual_seed(0)
    experts = QuantizedExperts(Experts(6, 64, 128, activation), bits, group_size=group_size)
    assert {experts.kernel_kind(e) for e in range(6)} == {kind}
    x = torch.randn(37, 64)
    weights, indices = torch.softmax(torch.randn(37, 6), -1).topk(2, dim=-1)
    keep = capacity_mask(indices, 6, 9)
    for k in (None, keep):
        fast = dispatch(x, weights, indices, experts, "auto", k)
        slow = dispatch(x, weights, indices, experts, "naive", k)  # dequantizes the whole stack
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    # bf16 activations run the kernels: the same function up to bf16 rounding
    bf16 = dispatch(x.bfloat16(), weights, indices, experts, "auto").float()
    want = dispatch(x, weights, indices, experts, "naive")
    assert (bf16 - want).abs().max() <= 0.02 * want.abs().max()
