"""QuantizedExperts at serving time: byte-level packing fast paths, the fp32 fallback that decodes
only the routed experts, and the packed-kernel path chosen per (device, dtype) with a fallback."""

from __future__ import annotations


import pytest
import torch

import moe_course.compress.quantization as Q
from moe_course.compress.quantization import QuantizedExperts, pack_codes, unpack_codes
from moe_course.dispatch import capacity_mask, dispatch
from moe_course.layers import Experts


def reference_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The documented layout, written the slow way: 8 codes -> one 8b-bit word -> b little-endian bytes."""
    flat = codes.reshape(-1).tolist()
    flat += [0] * ((-len(flat)) % 8)
    out = []
    for i in range(0, len(flat), 8):
        word = sum(c << (bits * j) for j, c in enumerate(flat[i:i + 8]))
        out += [(word >> (8 * j)) & 0xFF for j in range(bits)]
    return torch.tensor(out, dtype=torch.uint8)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 8, 61])
def test_packing_matches_the_documented_layout(bits, n):
    codes = torch.randint(0, 2 ** bits, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert torch.equal(packed, reference_pack(codes, bits))
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def dequantized_dense(q: QuantizedExperts, activation: str) -> Experts:
    dense = Experts(q.num_experts, q.d_model, q.d_hidden, activation).requires_grad_(False)
    w_in, w_gate, w_out = q.weights()
    dense.w_in.copy_(w_in)
    dense.w_out.copy_(w_out)
    if w_gate is not None:
        dense.w_gate.copy_(w_gate)
    return dense


@pytest.mark.parametrize("bits, group_size", [(8, None), (4, 32), (3, 32), ([8, 4, 2, 3, 8, 4, 2, 3], 32)])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_fp32_fallback_decodes_only_routed_experts_and_computes_the_same(bits, group_size, activation,
                                                                         monkeypatch):
    torch.manual_seed(0)
    q = QuantizedExperts(Experts(8, 64, 96, activation), bits, group_size=group_size)
    dense = dequantized_dense(q, activation)
    x = torch.randn(5, 64)
    weights, indices = torch.softmax(torch.randn(5, 8), -1).topk(2, dim=-1)
    indices[:, 0], indices[:, 1] = 1, 6  # only experts 1 and 6 get tokens
    keep = capacity_mask(indices, 8, 3)
    decoded = []
    real = Q.unpack_codes
    monkeypatch.setattr(Q, "unpack_codes", lambda p, b, s: decoded.append(p.data_ptr()) or real(p, b, s))
    routed_ptrs = {getattr(q, f"{n}{e}_codes").data_ptr() for n in q._names for e in (1, 6)}
    for keep_ in (None, keep):
        want = dispatch(x, weights, indices, dense, "loop", keep_)
        for strategy in ("auto", "loop", "grouped", "naive"):
            decoded.clear()
            got = dispatch(x, weights, indices, q, strategy, keep_)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert decoded and set(decoded) <= routed_ptrs, strategy  # never another expert's codes
    # the vectorised stack of some experts equals the matching slices of the full stack
    full = q.weights()
    part = q.weights_of([6, 1])
    for a, b in zip(full, part):
        if a is not None:
            assert torch.equal(a[[6, 1]], b)


def test_kernels_are_found_for_bf16_on_this_cpu_and_never_for_fp32():
    assert Q.kernel_available("int8", "cpu", torch.float32) is False
    if hasattr(torch, "_weight_int8pack_mm"):
        assert Q.kernel_available("int8", "cpu", torch.bfloat16)
    # a device this machine lacks answers False instead of raising
    if not torch.cuda.is_available():
        assert Q.kernel_available("int4", "cuda", torch.bfloat16) is False


@pytest.fixture
def fresh_verdicts(monkeypatch):
    monkeypatch.setattr(Q, "_KERNEL_OK", {})


@pytest.mark.parametrize("failure", ["missing", "raises", "wrong"])
def test_a_broken_kernel_falls_back_to_dequantize(failure, fresh_verdicts, monkeypatch):
    """Whatever goes wrong with torch's private int8 op (absent, raising, wrong numbers), the probe says
    no and bf16 activations run the dequantize path with the same result."""
    if failure == "missing":
        monkeypatch.delattr(torch, "_weight_int8pack_mm", raising=False)
    elif failure == "raises":
        monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: (_ for _ in ()).throw(RuntimeError("no")))
    else:
        monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda x, w, s: torch.zeros(x.shape[0], w.shape[0],
                                                                                      dtype=x.dtype))
    torch.manual_seed(0)
    q = QuantizedExperts(Experts(4, 64, 64, "swiglu"), 8)
    assert q.kernel_kind(0) == "dequant" and not q.runs_kernels(torch.zeros(1, 64, dtype=torch.bfloat16))
    x = torch.randn(6, 64)
    weights, indices = torch.softmax(torch.randn(6, 4), -1).topk(2, dim=-1)
    got = dispatch(x.bfloat16(), weights, indices, q, "auto").float()
    want = dispatch(x, weights, indices, dequantized_dense(q, "swiglu"), "loop")
    assert (got - want).abs().max() <= 0.02 * want.abs().max()


def test_a_kernel_failing_on_a_real_shape_falls_back_for_that_expert(fresh_verdicts, monkeypatch):
    if not hasattr(torch, "_weight_int8pack_mm"):
        pytest.skip("no int8 kernel in this torch")
    torch.manual_seed(0)
    q = QuantizedExperts(Experts(4, 64, 128, "gelu"), 8)
    assert q.kernel_kind(0) == "int8"  # the probe passed on its tiny matrix
    real = torch._weight_int8pack_mm

    def picky(x, w, s):
        if w.shape[1] == 128:
            raise RuntimeError("unsupported shape")
        return real(x, w, s)

    monkeypatch.setattr(torch, "_weight_int8pack_mm", picky)
    x = torch.randn(6, 64)
    weights, indices = torch.softmax(torch.randn(6, 4), -1).topk(2, dim=-1)
    want = dispatch(x, weights, indices, dequantized_dense(q, "gelu"), "loop")
    for _ in range(2):  # the second call skips the failing kernel for good
        got = dispatch(x.bfloat16(), weights, indices, q, "auto").float()
        assert (got - want).abs().max() <= 0.02 * want.abs().max()


def test_kernel_layouts_follow_the_device_and_buffers(fresh_verdicts):
    """The kernel layout is cached per buffer: rewritten buffers (load_state_dict) rebuild it."""
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("no CPU int4 kernel in this torch")
    torch.manual_seed(0)
    q = QuantizedExperts(Experts(2, 64, 64, "gelu"), 4, group_size=32)
    assert q.kernel_kind(0) == "int4"
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    w, idx = torch.ones(3, 1), torch.zeros(3, 1, dtype=torch.long)
    first = dispatch(x, w, idx, q, "auto")
    other = QuantizedExperts(Experts(2, 64, 64, "gelu"), 4, group_size=32)
    q.load_state_dict(other.state_dict())
    assert torch.equal(dispatch(x, w, idx, q, "auto"), dispatch(x, w, idx, other, "auto"))
    assert not torch.equal(first, dispatch(x, w, idx, q, "auto"))
