r"""Weight-only round-to-nearest (RTN) quantization of MoE experts, with honest packed storage.

From scratch (chapter 5):

* :func:`quantize_tensor` / :func:`dequantize_tensor`: symmetric absmax and asymmetric
  zero-point quantization, per tensor, per channel (one scale per row) or group-wise (groups of
  ``group_size`` consecutive elements of a row). One formula dequantizes both schemes:

  .. math::
      \hat w = (q - z)\,s, \qquad q \in \{0, \dots, 2^b - 1\}

  asymmetric: :math:`s = (\max(w,0) - \min(w,0)) / (2^b - 1)`, :math:`z = \mathrm{round}(-\min(w,0)/s)`;
  symmetric (absmax): :math:`s = \max|w| / (2^{b-1} - 1)`, :math:`z = 2^{b-1}` (the signed code
  ``q - z`` lies in :math:`[-2^{b-1}, 2^{b-1}-1]`). Rounding to nearest gives
  :math:`|w - \hat w| \le s/2` for every element. A group of zeros gets :math:`s = 0` and comes
  back as exact zeros.
* :func:`fake_quantize`: quantize-then-dequantize (optionally with a straight-through gradient).
* :func:`pack_codes` / :func:`unpack_codes`: ``b``-bit codes packed densely, 8 codes in ``b``
  bytes (two 4-bit codes per byte, four 2-bit codes per byte, 8 three-bit codes in 3 bytes, one
  8-bit code per byte), so bytes measured by :func:`moe_course.metrics.size_report` are real.

Package (MoQE, Kim et al. 2023: experts tolerate low bits; Frantar & Alistarh 2024, QMoE):

* :class:`QuantizedExperts`: a :class:`~moe_course.layers.Experts` whose weights are packed
  uint8 codes + fp16 scales + uint8 zero points (buffers), dequantized on the fly in
  :meth:`QuantizedExperts.weights`, so every dispatch strategy works unchanged.
* :func:`quantize`: returns a quantized copy of a model (experts only, or experts plus the other
  ``nn.Linear`` layers and embeddings); routers always stay fp32.
* :func:`quantize_rest`: the non-expert part alone (attention, embeddings, head) at its own bit
  width. Both walk the model with one module-swap helper and one group-size rule: a group size
  must divide the experts' widths (``quantize`` raises otherwise); a linear layer or embedding
  whose input width it does not divide gets one scale per row.
* :func:`mixed_precision_bits`: more bits for busy experts, fewer for rare ones, at a fixed
  average bit budget, from :func:`moe_course.metrics.routing_stats`.

Storage layout: weights are stored as ``[out_features, in_features]`` rows (``w_in[i]`` is kept
transposed), so groups run along the input (reduction) dimension, as in GPTQ/AWQ and torchao.
Bits per weight: ``b + (16 + 8) / g`` with fp16 scale and uint8 zero point per group of ``g``.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_course import _validate
from moe_course.layers import CompressedExperts, Experts, moe_layers, require_moe_layers

SUPPORTED_BITS = (2, 3, 4, 8)
GRANULARITIES = ("tensor", "channel", "group")
TARGETS = ("experts", "all")

__all__ = [
    "SUPPORTED_BITS", "quantize_tensor", "dequantize_tensor", "fake_quantize", "pack_codes",
    "unpack_codes", "QuantizedExperts", "QuantizedLinear", "QuantizedEmbedding", "quantize", "quantize_rest",
    "mixed_precision_bits", "bits_per_weight",
]


# --------------------------------------------------------------------------------------------
# from scratch: quantize / dequantize one tensor
# --------------------------------------------------------------------------------------------
def _check_bits(bits, name: str = "bits") -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"{name}: expected one of {SUPPORTED_BITS}, got {bits!r}")


def _group_width(w: torch.Tensor, granularity: str, group_size: int | None) -> int:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity: expected one of {GRANULARITIES}, got {granularity!r}")
    if w.dim() == 0 or w.numel() == 0:
        raise ValueError(f"w: expected a non-empty tensor with at least one dimension, got shape {tuple(w.shape)}")
    if granularity == "tensor":
        return w.numel()
    if granularity == "channel":
        return w.shape[-1]
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: expected a positive int for granularity='group', got {group_size!r}")
    if w.shape[-1] % group_size:
        raise ValueError(f"group_size: must divide the last dimension {w.shape[-1]}, got {group_size}")
    return group_size


def quantize_tensor(
    w: torch.Tensor,
    bits: int,
    symmetric: bool = False,
    granularity: str = "tensor",
    group_size: int | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest quantization of ``w``: ``(codes, scale, zero)``.

    ``codes`` uint8 with ``w``'s shape, values in ``[0, 2^bits - 1]``; ``scale`` (``scale_dtype``)
    and ``zero`` (uint8) of shape ``[n_groups, 1]`` for the row-major view ``w.reshape(n_groups, g)``
    where ``g`` is ``w.numel()`` (tensor), ``w.shape[-1]`` (channel) or ``group_size`` (group).
    Asymmetric ranges include 0 so that zero is exact; symmetric is absmax.
    """
    if not torch.is_tensor(w) or not w.is_floating_point():
        raise TypeError(f"w: expected a floating-point tensor, got {w.dtype if torch.is_tensor(w) else type(w).__name__}")
    _check_bits(bits)
    g = _group_width(w, granularity, group_size)
    _validate.finite("w", w)  # a NaN would make its whole group's scale NaN
    x = w.detach().float().reshape(-1, g)
    levels = 2 ** bits - 1
    if symmetric:
        zero = torch.full((x.shape[0], 1), 2 ** (bits - 1), dtype=torch.float32, device=x.device)
        scale = x.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1)
    else:
        lo = x.amin(dim=1, keepdim=True).clamp(max=0)
        hi = x.amax(dim=1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / levels
    stored = scale.to(scale_dtype)
    if not torch.isfinite(stored).all():
        raise ValueError(f"w: needs a scale of {scale.max().item():.4g}, which scale_dtype={scale_dtype} cannot hold "
                         f"(non-finite or too large weights); pass finite weights or scale_dtype=torch.float32")
    # Round the stored scale up, never down: a scale rounded down (or flushed to 0 in float16) would
    # push the extreme weights out of the code range and break |w - w_hat| <= s/2.
    stored = torch.where(stored.float() < scale, torch.nextafter(stored, torch.full_like(stored, float("inf"))), stored)
    scale = stored.float()  # quantize against the scale we will actually store
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    if not symmetric:
        zero = torch.round(-lo / safe).clamp(0, levels)
    codes = torch.clamp(torch.round(x / safe) + zero, 0, levels)
    codes = torch.where(scale > 0, codes, zero.expand_as(codes))  # zero group -> exact zeros
    return codes.to(torch.uint8).reshape(w.shape), scale.to(scale_dtype), zero.to(torch.uint8)


def dequantize_tensor(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(codes - zero) * scale`` group by group; the inverse of :func:`quantize_tensor` up to rounding."""
    if scale.numel() == 0 or codes.numel() % scale.numel():
        raise ValueError(f"scale: {scale.numel()} groups do not divide {codes.numel()} codes")
    if zero.numel() != scale.numel():
        raise ValueError(f"zero: expected {scale.numel()} zero points (one per scale), got {zero.numel()}")
    g = codes.numel() // scale.numel()
    x = codes.reshape(-1, g).to(torch.float32, copy=True)  # own buffer: subtract, scale in place
    x.sub_(zero.reshape(-1, 1).float()).mul_(scale.reshape(-1, 1).float())
    return x.reshape(codes.shape).to(dtype)


def fake_quantize(w: torch.Tensor, bits: int, symmetric: bool = False, granularity: str = "tensor",
                  group_size: int | None = None, ste: bool = False) -> torch.Tensor:
    """Quantize then dequantize (same dtype and shape as ``w``): the error RTN adds, without the savings.

    ``ste=True`` passes gradients straight through the rounding (Bengio et al. 2013), for QAT.
    """
    deq = dequantize_tensor(*quantize_tensor(w, bits, symmetric, granularity, group_size), dtype=w.dtype)
    return w + (deq - w).detach() if ste else deq


# --------------------------------------------------------------------------------------------
# packing: 8 codes of b bits -> b bytes
# --------------------------------------------------------------------------------------------
def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``b``-bit codes densely into a 1-D uint8 tensor of ``ceil(n / 8) * b`` bytes.

    Each run of 8 codes becomes one ``8b``-bit integer (code ``i`` at bits ``[b*i, b*(i+1))``),
    cut into ``b`` little-endian bytes: for 4 bits, byte ``j`` holds code ``2j`` in its low nibble
    and code ``2j+1`` in its high nibble.
    """
    _check_bits(bits)
    if not torch.is_tensor(codes) or codes.is_floating_point() or codes.dtype == torch.bool:
        raise TypeError(f"codes: expected an integer tensor (uint8 codes), got "
                        f"{codes.dtype if torch.is_tensor(codes) else type(codes).__name__}")
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and int(flat.min()) < 0:
        raise ValueError(f"codes: expected integer codes in [0, 2**bits), got min {int(flat.min())}")
    if flat.numel() and int(flat.max()) >= 2 ** bits:
        raise ValueError(f"codes: values must be < 2**bits = {2 ** bits}, got max {int(flat.max())}")
    pad = (-flat.numel()) % 8
    if 8 % bits == 0:  # 2, 4, 8 bits: whole codes per byte, the same layout in byte arithmetic (fast)
        per = 8 // bits
        flat = F.pad(flat, (0, pad)).reshape(-1, per)
        shifts = torch.arange(per, device=flat.device) * bits
        return (flat << shifts).sum(dim=1).to(torch.uint8)
    flat = F.pad(flat, (0, pad)).reshape(-1, 8)
    shifts = torch.arange(8, device=flat.device) * bits
    word = (flat << shifts).sum(dim=1, keepdim=True)  # the sum of disjoint bit fields = their OR
    out = (word >> (torch.arange(bits, device=flat.device) * 8)) & 0xFF
    return out.to(torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, shape: int | Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes of the given ``shape``."""
    _check_bits(bits)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    n = math.prod(shape)
    if packed.numel() != math.ceil(n / 8) * bits:
        raise ValueError(f"packed: expected {math.ceil(n / 8) * bits} bytes for {n} codes of {bits} bits, "
                         f"got {packed.numel()}")
    if bits == 8:
        return packed.reshape(-1)[:n].clone().reshape(shape)
    if 8 % bits == 0:  # 2 or 4 bits: shift and mask bytes (no int64 words), the same layout
        per, mask = 8 // bits, 2 ** bits - 1
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (packed.reshape(-1, 1) >> shifts) & mask
        return codes.reshape(-1)[:n].reshape(shape)
    b = packed.reshape(-1, bits).to(torch.int64)
    word = (b << (torch.arange(bits, device=b.device) * 8)).sum(dim=1, keepdim=True)
    codes = (word >> (torch.arange(8, device=b.device) * bits)) & (2 ** bits - 1)
    return codes.reshape(-1)[:n].to(torch.uint8).reshape(shape)


def bits_per_weight(bits: int, group_size: int | None, in_features: int, scale_bits: int = 16,
                    zero_bits: int = 8) -> float:
    """Storage bits per weight: ``b`` plus one fp16 scale and one uint8 zero point per group."""
    _check_bits(bits)
    _validate.positive_int("group_size", group_size, allow_none=True)
    _validate.int_in("in_features", in_features, 1)
    g = in_features if group_size is None else group_size
    return bits + (scale_bits + zero_bits) / g


# --------------------------------------------------------------------------------------------
# packed modules
# --------------------------------------------------------------------------------------------
class _Packed(nn.Module):
    """Shared packing of ``[rows, cols]`` matrices: buffers ``{name}_codes/_scale/_zero``."""

    def _store(self, name: str, w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
               scale_dtype: torch.dtype) -> None:
        gran = "channel" if group_size is None else "group"
        codes, scale, zero = quantize_tensor(w, bits, symmetric, gran, group_size, scale_dtype)
        self.register_buffer(f"{name}_codes", pack_codes(codes, bits))
        self.register_buffer(f"{name}_scale", scale)
        self.register_buffer(f"{name}_zero", zero)

    def _load(self, name: str, bits: int, shape: tuple[int, ...], dtype: torch.dtype | None) -> torch.Tensor:
        codes = unpack_codes(getattr(self, f"{name}_codes"), bits, shape)
        return dequantize_tensor(codes, getattr(self, f"{name}_scale"), getattr(self, f"{name}_zero"),
                                 dtype=dtype or torch.float32)


# --------------------------------------------------------------------------------------------
# torch's weight-only low-bit kernels, device-aware, each tried once before use
# --------------------------------------------------------------------------------------------
KERNEL_DTYPES = (torch.bfloat16,)  # activations the packed kernels serve (fp32 ran 20-30x slower on CPU)
_KERNEL_OK: dict[tuple[str, torch.dtype, str], bool] = {}


def kernel_available(kind: str, device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether torch's weight-only ``kind`` kernel (``"int8"`` or ``"int4"``) works for ``dtype``
    activations on ``device``: tried once on a tiny matrix against dequantize-then-matmul, the
    verdict cached per (device type, dtype, kind). Ops differ across devices and torch versions
    (int4 packs with ``_convert_weight_to_int4pack_for_cpu`` on the CPU and
    ``_convert_weight_to_int4pack`` on CUDA; ``_weight_int8pack_mm`` is missing on CUDA in some
    versions): a missing op, an error or a wrong answer means ``False``, and the experts then
    dequantize instead of crashing."""
    dev = torch.device(device)
    key = (dev.type, dtype, kind)
    if key not in _KERNEL_OK:
        ok = False
        if dtype in KERNEL_DTYPES and kind in ("int8", "int4"):
            try:
                ok = _probe(kind, dev, dtype)
            except Exception:  # noqa: BLE001 - any failure of a private op means "not here"
                ok = False
        _KERNEL_OK[key] = ok
    return _KERNEL_OK[key]


def _probe(kind: str, device: torch.device, dtype: torch.dtype) -> bool:
    g = torch.Generator().manual_seed(0)
    n, k, group = 64, 128, 32
    levels = 255 if kind == "int8" else 15
    codes = torch.randint(0, levels + 1, (n, k), generator=g, dtype=torch.uint8)
    groups = 1 if kind == "int8" else k // group
    scale = torch.rand(n, groups, generator=g) * 0.02 + 0.01
    zero = torch.randint(0, levels + 1, (n, groups), generator=g).float()
    w = ((codes.float().view(n, groups, -1) - zero[..., None]) * scale[..., None]).view(n, k)
    x = torch.randn(3, k, generator=g)
    codes, scale, zero = codes.to(device), scale.to(device), zero.to(device)
    layout = (_int8_layout(codes, scale.view(n), zero.view(n)) if kind == "int8"
              else _int4_layout(codes, scale, zero, group))
    got = _kernel_mm(layout, x.to(device=device, dtype=dtype)).float().cpu()
    want = x.to(dtype).float() @ w.t()
    return bool(got.shape == want.shape and (got - want).abs().max() <= 0.03 * want.abs().max())


def _int4_shapes_ok(d: int, h: int, device: torch.device | str) -> bool:
    if torch.device(device).type == "cpu":
        return d % 2 == 0 and h % 2 == 0
    return d % 32 == 0 and h % 32 == 0  # CUDA tiles: k % (16 * inner k-tiles) and n % 8


def _int8_layout(codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor):
    """w = s (c - z) = s (c' - z') with c' = c - 128 in int8: one kernel plus a rank-1 correction."""
    return ("int8", (codes.int() - 128).to(torch.int8), s.to(torch.bfloat16),
            (s * (z - 128)).to(torch.bfloat16))


def _int4_layout(codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group: int):
    """tinygemm's convention: w = (q - 8) s + Z, so Z = s (8 - z); scales_and_zeros ``[k/g, n, 2]``."""
    scales_zeros = torch.stack([s.t(), (s * (8 - z)).t()], dim=-1).contiguous().to(torch.bfloat16)
    if codes.device.type == "cpu":
        return ("int4_cpu", torch._convert_weight_to_int4pack_for_cpu(codes.int(), 1), group, scales_zeros)
    k = codes.shape[1]
    tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
    pairs = (codes[:, ::2].to(torch.uint8) << 4) | codes[:, 1::2].to(torch.uint8)  # two codes per byte
    return ("int4", torch._convert_weight_to_int4pack(pairs.contiguous(), tiles), group, scales_zeros)


def _kernel_mm(layout, x: torch.Tensor) -> torch.Tensor:
    kind, *p = layout
    if kind == "int8":
        w, s, shift = p
        return torch._weight_int8pack_mm(x, w, s.to(x.dtype)) - x.sum(dim=1, keepdim=True) * shift.to(x.dtype)
    packed, group, scales_zeros = p
    op = torch._weight_int4pack_mm_for_cpu if kind == "int4_cpu" else torch._weight_int4pack_mm
    return op(x, packed, group, scales_zeros.to(x.dtype))


class QuantizedExperts(_Packed, CompressedExperts):
    """:class:`~moe_course.layers.Experts` stored as packed ``b``-bit codes, dequantized on the fly.

    Built from a trained ``Experts``; ``bits`` is one int or one per expert (mixed precision).
    ``group_size=None`` means one scale per output channel. ``num_experts``, ``d_model``,
    ``d_hidden`` and ``params_per_expert`` are the real (unpacked) sizes, so FLOPs and parameter
    counts are unchanged; :meth:`weights` returns the dequantized stacks, so every dispatch
    strategy, ``experts[i]`` and ``forward_all`` work as before (the teaching path: dequantize, then
    a float matmul). For bf16 activations on the CPU, dispatch ``"auto"`` / ``"loop"`` call
    :meth:`kernel_forward` instead, which runs only the chosen experts with torch's weight-only
    kernels straight from the codes (8-bit per channel: ``_weight_int8pack_mm``; 4-bit in groups:
    ``_weight_int4pack_mm_for_cpu``, the kernels torchao uses on CPU; other formats dequantize just
    the chosen expert).
    """

    def __init__(self, experts: Experts, bits: int | Sequence[int], group_size: int | None = None,
                 symmetric: bool = False, scale_dtype: torch.dtype = torch.float16):
        if isinstance(experts, Experts) and type(experts) is not Experts:
            raise TypeError(f"experts: expected dense moe_course.layers.Experts, got {type(experts).__name__} "
                            "(quantize once, as the last step, from the dense weights)")
        _validate.positive_int("group_size", group_size, allow_none=True)
        CompressedExperts.__init__(self, experts)  # only packed buffers, no fp32 parameters
        E, d, h = self._sizes
        per_expert = [bits] * E if isinstance(bits, int) and not isinstance(bits, bool) else list(bits)
        if len(per_expert) != E:
            raise ValueError(f"bits: expected an int or {E} values (one per expert), got {len(per_expert)}")
        for b in per_expert:
            _check_bits(b)
        for dim in (d, h):
            if group_size is not None and dim % group_size:
                raise ValueError(f"group_size: must divide d_model={d} and d_hidden={h}, got {group_size}")
        self.bits = per_expert
        self.group_size, self.symmetric = group_size, bool(symmetric)
        self._names = ("in", "gate", "out") if experts.w_gate is not None else ("in", "out")
        with torch.no_grad():
            w_in, w_gate, w_out = experts.weights(torch.float32)
            mats = {"in": w_in.transpose(1, 2), "gate": None if w_gate is None else w_gate.transpose(1, 2),
                    "out": w_out.transpose(1, 2)}  # [E, out, in]: groups along the input dimension
            for name in self._names:
                for i in range(E):
                    self._store(f"{name}{i}", mats[name][i].contiguous(), per_expert[i], group_size,
                                symmetric, scale_dtype)

    @property
    def params_per_expert(self) -> int:
        return len(self._names) * self.d_model * self.d_hidden

    # ---------------------------------------------------------------- real low-bit kernels
    def kernel_kind(self, e: int, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.bfloat16) -> str:
        """Which matmul expert ``e`` runs with for ``dtype`` activations on ``device``: ``"int8"``
        (torch's weight-only int8 kernel: 8-bit codes, one scale per output channel), ``"int4"``
        (torch's int4 kernel: 4-bit codes in groups of 32..256), else ``"dequant"`` (dequantize this
        one expert, then a float matmul). A kernel counts only where :func:`kernel_available` found
        it working for that device and dtype."""
        d, h = self.d_model, self.d_hidden
        if self.bits[e] == 8 and self.group_size is None and kernel_available("int8", device, dtype):
            return "int8"
        if (self.bits[e] == 4 and self.group_size in (32, 64, 128, 256) and _int4_shapes_ok(d, h, device)
                and kernel_available("int4", device, dtype)):
            return "int4"
        return "dequant"

    def _kernel_weights(self, name: str, e: int, device: torch.device):
        """Expert ``e``'s matrix ``name`` in its kernel's layout (built once per buffer, kept in memory),
        or ``None`` where it has no kernel (it is then dequantized per call, never cached)."""
        kind = self.kernel_kind(e, device, torch.bfloat16)
        if kind == "dequant" or (torch.device(device).type, e) in self.__dict__.get("_no_kernel", ()):
            return None
        cache = self.__dict__.setdefault("_kernel_cache", {})
        buf = getattr(self, f"{name}{e}_codes")
        ptr = (buf.data_ptr(), buf._version)  # new or rewritten buffers (.to(), load_state_dict): rebuild
        hit = cache.get((name, e))
        if hit is not None and hit[0] == ptr:
            return hit[1]
        E, d, h = self._sizes
        n, k = (d, h) if name == "out" else (h, d)  # stored [out, in]
        codes = unpack_codes(getattr(self, f"{name}{e}_codes"), self.bits[e], (n, k))
        scale = getattr(self, f"{name}{e}_scale").float()
        zero = getattr(self, f"{name}{e}_zero").float()
        value = (_int8_layout(codes, scale.view(n), zero.view(n)) if kind == "int8"
                 else _int4_layout(codes, scale.view(n, k // self.group_size), zero.view(n, k // self.group_size),
                                   self.group_size))
        cache[(name, e)] = (ptr, value)
        return value

    def _matmul(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        """``x @ W_name[e]`` straight from the packed weights (the kernel, or this expert dequantized)."""
        layout = self._kernel_weights(name, e, x.device) if x.dtype in KERNEL_DTYPES else None
        if layout is not None:
            try:
                return _kernel_mm(layout, x)
            except RuntimeError:  # a shape the probe did not cover: this expert falls back for good
                self.__dict__.setdefault("_no_kernel", set()).add((x.device.type, e))
        E, d, h = self._sizes
        shape = (d, h) if name == "out" else (h, d)
        return x @ self._load(f"{name}{e}", self.bits[e], shape, x.dtype).t()

    def runs_kernels(self, x: torch.Tensor) -> bool:
        """Whether :meth:`kernel_forward` serves ``x``: bf16 activations on a device where torch's
        weight-only kernels work (checked once, see :func:`kernel_available`) for at least one expert.
        With fp32 activations the CPU kernels ran 20-30x slower than a float matmul here
        (bench/expert_kernels.py), so fp32 inputs keep the dequantize-then-matmul path, which
        dispatch runs on the routed experts only (:meth:`weights_of`)."""
        if x.dtype not in KERNEL_DTYPES:
            return False
        cache = self.__dict__.setdefault("_runs_kernels", {})
        key = (x.device.type, x.dtype)
        if key not in cache:
            cache[key] = any(self.kernel_kind(e, x.device, x.dtype) != "dequant" for e in range(self.num_experts))
        return cache[key]

    def kernel_forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                       keep: torch.Tensor | None = None) -> torch.Tensor:
        """The per-expert loop of :mod:`moe_course.dispatch` with packed-weight kernels: only the experts
        that tokens chose are touched, and none is dequantized as a whole stack."""
        y = torch.zeros_like(x)
        tokens = torch.arange(x.shape[0], device=x.device).repeat_interleave(indices.shape[1])
        flat, gates = indices.reshape(-1), weights.reshape(-1)
        if keep is not None:
            kept = keep.reshape(-1)
            tokens, flat, gates = tokens[kept], flat[kept], gates[kept]
        for e in torch.unique(flat).tolist():
            sel = flat == e
            rows = tokens[sel]
            xe = x[rows]
            h = self._matmul("in", e, xe)
            gate = self._matmul("gate", e, xe) if "gate" in self._names else None
            out = self._matmul("out", e, self.act(h, gate))
            y.index_add_(0, rows, out * gates[sel, None])
        return y

    # ---------------------------------------------------------------- dequantize-then-matmul
    def weights_of(self, ids: Sequence[int], dtype: torch.dtype | None = None):
        """``(w_in, w_gate or None, w_out)`` of the experts ``ids`` only, dequantized in one vectorised
        step per matrix (stacks ``[len(ids), ...]``): dispatch calls this with the experts that some
        token chose, so a decode step never dequantizes the other experts."""
        ids = [int(i) for i in ids]
        w_gate = self._stack("gate", dtype, ids) if "gate" in self._names else None
        return self._stack("in", dtype, ids), w_gate, self._stack("out", dtype, ids)

    def expert_forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.num_experts:
            raise IndexError(f"i: expected an expert index in [0, {self.num_experts}), got {i!r}")
        w_in, w_gate, w_out = self.weights_of([i], x.dtype)
        gate = x @ w_gate[0] if w_gate is not None else None
        return self.act(x @ w_in[0], gate) @ w_out[0]

    def _stack(self, name: str, dtype: torch.dtype | None, ids: Sequence[int] | None = None) -> torch.Tensor:
        E, d, h = self._sizes
        ids = range(E) if ids is None else ids
        shape = (d, h) if name == "out" else (h, d)
        if not len(ids):
            return torch.zeros((0, shape[1], shape[0]), dtype=dtype or torch.float32,
                               device=getattr(self, f"{name}0_scale").device)
        codes = torch.stack([unpack_codes(getattr(self, f"{name}{i}_codes"), self.bits[i], shape) for i in ids])
        scale = torch.cat([getattr(self, f"{name}{i}_scale").reshape(-1) for i in ids])
        zero = torch.cat([getattr(self, f"{name}{i}_zero").reshape(-1) for i in ids])
        return dequantize_tensor(codes, scale, zero, dtype=dtype or torch.float32).transpose(1, 2)

    def weights(self, dtype: torch.dtype | None = None):
        return self.weights_of(range(self.num_experts), dtype)

    @property
    def w_in(self) -> torch.Tensor:
        return self._stack("in", None)

    @property
    def w_gate(self) -> torch.Tensor | None:
        return self._stack("gate", None) if "gate" in self._names else None

    @property
    def w_out(self) -> torch.Tensor:
        return self._stack("out", None)

    def extra_repr(self) -> str:
        bits = self.bits[0] if len(set(self.bits)) == 1 else self.bits
        return (f"{super().extra_repr()}, bits={bits}, group_size={self.group_size}, "
                f"symmetric={self.symmetric}")


def _row_group(width: int, group_size: int | None) -> int | None:
    """The module's group-size rule for non-expert matrices: ``group_size`` where it divides the
    input ``width``, else one scale per row (``None``)."""
    return group_size if group_size is not None and width % group_size == 0 else None


class QuantizedLinear(_Packed, nn.Linear):
    """An ``nn.Linear`` whose weight is packed; ``.weight`` dequantizes (the bias stays fp32)."""

    def __init__(self, linear: nn.Linear, bits: int, group_size: int | None = None, symmetric: bool = False,
                 scale_dtype: torch.dtype = torch.float16):
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        nn.Module.__init__(self)
        _check_bits(bits)
        self.in_features, self.out_features, self.bits = linear.in_features, linear.out_features, bits
        self.group_size = gs = _row_group(linear.in_features, group_size)
        self._store("weight", linear.weight.detach(), bits, gs, symmetric, scale_dtype)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        return self._load("weight", self.bits, (self.out_features, self.in_features), None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, group_size={self.group_size}"


class QuantizedEmbedding(_Packed, nn.Embedding):
    """An ``nn.Embedding`` whose table is packed (one scale per row or per group)."""

    def __init__(self, emb: nn.Embedding, bits: int, group_size: int | None = None, symmetric: bool = False,
                 scale_dtype: torch.dtype = torch.float16):
        if not isinstance(emb, nn.Embedding):
            raise TypeError(f"emb: expected an nn.Embedding, got {type(emb).__name__}")
        nn.Module.__init__(self)
        _check_bits(bits)
        self.num_embeddings, self.embedding_dim, self.bits = emb.num_embeddings, emb.embedding_dim, bits
        for attr in ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"):
            setattr(self, attr, getattr(emb, attr))
        self.group_size = gs = _row_group(emb.embedding_dim, group_size)
        self._store("weight", emb.weight.detach(), bits, gs, symmetric, scale_dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self._load("weight", self.bits, (self.num_embeddings, self.embedding_dim), None)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight, self.padding_idx)


# --------------------------------------------------------------------------------------------
# whole models
# --------------------------------------------------------------------------------------------
def _layer_bits(bits, layers) -> list:
    n = len(layers)
    if isinstance(bits, int) and not isinstance(bits, bool):
        _check_bits(bits)
        return [bits] * n
    if not isinstance(bits, (list, tuple)) or len(bits) != n:
        raise ValueError(f"bits: expected one of {SUPPORTED_BITS}, or a list of {n} entries (one per MoE layer, "
                         f"each an int or a list per expert), got {bits!r}")
    for li, (b, layer) in enumerate(zip(bits, layers)):
        per = [b] if isinstance(b, int) else list(b)
        if not isinstance(b, int) and len(per) != layer.num_experts:
            raise ValueError(f"bits[{li}]: expected an int or {layer.num_experts} values, got {len(per)}")
        for x in per:
            _check_bits(x, f"bits[{li}]")
    return list(bits)


def _swap_modules(model: nn.Module, replace, skip: set[int] = frozenset()) -> None:
    """Replace, at any depth, every child ``m`` of ``model`` for which ``replace(m)`` returns a module
    (the module-swap walk of torchao's ``quantize_``); modules whose ``id`` is in ``skip`` and their
    children are left alone."""
    for parent in list(model.modules()):
        if id(parent) in skip:
            continue
        for name, child in list(parent.named_children()):
            new = None if id(child) in skip else replace(child)
            if new is not None:
                setattr(parent, name, new)


def _packed_like(bits: int, group_size: int | None, symmetric: bool = False,
                 scale_dtype: torch.dtype = torch.float16, embedding_bits: int | None = None):
    """``replace`` for :func:`_swap_modules`: plain ``nn.Linear`` / ``nn.Embedding`` -> packed."""
    def replace(m: nn.Module) -> nn.Module | None:
        if type(m) is nn.Linear:
            return QuantizedLinear(m, bits, group_size, symmetric, scale_dtype)
        if type(m) is nn.Embedding:
            return QuantizedEmbedding(m, bits if embedding_bits is None else embedding_bits, group_size, symmetric,
                                      scale_dtype)
        return None
    return replace


def quantize(
    model: nn.Module,
    bits: int | Sequence[int | Sequence[int]],
    *,
    group_size: int | None = None,
    symmetric: bool = False,
    targets: str = "experts",
    other_bits: int = 8,
    scale_dtype: torch.dtype = torch.float16,
    inplace: bool = False,
) -> nn.Module:
    """Weight-only RTN quantization of a trained MoE model; returns a new model (deep copy).

    Args:
        model: a model with at least one :class:`~moe_course.layers.MoELayer`.
        bits: one of ``SUPPORTED_BITS`` for every routed expert, or a list with one entry per MoE
            layer, each an int or a list with one value per expert (see :func:`mixed_precision_bits`).
        group_size: elements per scale along each row's input dimension; ``None``: one per row.
            It must divide the experts' ``d_model`` and ``d_hidden``; other layers follow the
            module's group-size rule (one scale per row where it does not divide).
        symmetric: absmax (``True``) or zero-point (``False``, better at 2-3 bits).
        targets: ``"experts"`` (routed experts only) or ``"all"`` (also shared experts, every
            ``nn.Linear`` outside the routers and every ``nn.Embedding``, at ``other_bits``).
            Routers always stay fp32: they are tiny and their top-k flips easily.
        inplace: modify ``model`` itself instead of a copy.
    """
    layers = require_moe_layers(model, "quantize")
    _validate.dense_experts(layers, "quantize")  # quantizing twice / after factorizing: refuse
    if targets not in TARGETS:
        raise ValueError(f"targets: expected one of {TARGETS}, got {targets!r}")
    _validate.positive_int("group_size", group_size, allow_none=True)
    _check_bits(other_bits, "other_bits")
    per_layer = _layer_bits(bits, layers)
    for layer in layers:
        for dim in (layer.experts.d_model, layer.experts.d_hidden):
            if group_size is not None and dim % group_size:
                raise ValueError(f"group_size: must divide d_model={layer.experts.d_model} and "
                                 f"d_hidden={layer.experts.d_hidden}, got {group_size}")
    _validate.finite_model(model)
    out = model if inplace else copy.deepcopy(model)
    for layer, b in zip(moe_layers(out), per_layer):
        layer.experts = QuantizedExperts(layer.experts, b, group_size, symmetric, scale_dtype)
        if targets == "all" and getattr(layer, "shared", None) is not None:
            layer.shared = QuantizedExperts(layer.shared, other_bits, group_size, symmetric, scale_dtype)
    if targets == "all":
        routers = {id(m) for layer in moe_layers(out) for m in layer.router.modules()}
        _swap_modules(out, _packed_like(other_bits, group_size, symmetric, scale_dtype), routers)
    return out


def quantize_rest(model: nn.Module, bits: int = 8, *, group_size: int | None = 32, embedding_bits: int | None = None,
                  inplace: bool = False) -> nn.Module:
    """Quantize every ``nn.Linear`` outside the MoE layers and every ``nn.Embedding`` (RTN, packed).

    The non-expert part (attention / convolution projections, embeddings, head) at its own bit
    width, so experts and the rest get different precisions (MoQE, Kim et al. 2023;
    Mixtral-offloading, Eliseev & Mazur 2023: experts tolerate fewer bits). Routed experts and
    routers are left as they are (quantize experts with :func:`quantize`; routers stay fp32, their
    top-k flips easily). The group-size rule is the module's: one scale per row where
    ``group_size`` does not divide a layer's input width.

    Args:
        bits: bits of the linear layers (one of ``SUPPORTED_BITS``).
        group_size: elements per scale, or ``None`` for one per row.
        embedding_bits: bits of the embedding tables (default ``bits``); with a tied LM head the
            token embedding is also the output layer, often the most sensitive matrix.
    """
    _check_bits(bits, "bits")
    _check_bits(bits if embedding_bits is None else embedding_bits, "embedding_bits")
    _validate.positive_int("group_size", group_size, allow_none=True)
    require_moe_layers(model, "quantize")
    # Checked up front: a NaN found half-way would leave an in-place model half quantized.
    _validate.finite_model(model)
    out = model if inplace else copy.deepcopy(model)
    inside_moe = {id(m) for layer in moe_layers(out) for m in layer.modules()}
    _swap_modules(out, _packed_like(bits, group_size, embedding_bits=embedding_bits), inside_moe)
    return out


# --------------------------------------------------------------------------------------------
# mixed precision across experts
# --------------------------------------------------------------------------------------------
def mixed_precision_bits(stats, avg_bits: float, choices: Sequence[int] = (2, 3, 4, 8)) -> list[list[int]]:
    r"""Bits per expert per layer from routing frequencies, at an average of at most ``avg_bits``.

    Greedy marginal allocation: RTN's mean squared error scales like :math:`4^{-b}`, and an
    expert's share of the output error like its routing frequency :math:`f_i`, so the loss proxy is
    :math:`\sum_i f_i\,4^{-b_i}`. Start every expert at ``min(choices)`` and repeatedly give the
    next larger choice to the expert whose upgrade removes the most loss per extra bit, while the
    average (over experts, all of equal size) stays within ``avg_bits`` (in the spirit of MC-MoE's
    bit allocation, Huang et al. 2024, with frequency as the importance).

    Args:
        stats: :class:`moe_course.metrics.RoutingStats` (or a list of per-layer stats with ``.frequency``).
        avg_bits: the budget, between ``min(choices)`` and ``max(choices)``.
        choices: allowed bit widths, each in ``SUPPORTED_BITS``.
    """
    layers = list(getattr(stats, "layers", stats))
    if not layers:
        raise ValueError("stats: expected routing statistics of at least one MoE layer")
    for s in layers:
        if not hasattr(s, "frequency"):
            raise TypeError("stats: expected moe_course.metrics.RoutingStats (or per-layer stats with .frequency), "
                            f"got {type(s).__name__}")
    choices = sorted(set(choices))
    if not choices:
        raise ValueError("choices: expected at least one bit width")
    for c in choices:
        _check_bits(c, "choices")
    if not isinstance(avg_bits, (int, float)) or not choices[0] <= avg_bits <= choices[-1]:
        raise ValueError(f"avg_bits: expected a number in [{choices[0]}, {choices[-1]}], got {avg_bits!r}")
    freqs = [[float(f) for f in s.frequency] for s in layers]
    level = [[0] * len(f) for f in freqs]  # index into choices
    n = sum(len(f) for f in freqs)
    budget = avg_bits * n - choices[0] * n
    while True:
        best, best_gain = None, -1.0
        for li, f in enumerate(freqs):
            for e, fe in enumerate(f):
                j = level[li][e]
                if j + 1 >= len(choices):
                    continue
                cost = choices[j + 1] - choices[j]
                if cost > budget + 1e-9:
                    continue
                gain = fe * (4.0 ** -choices[j] - 4.0 ** -choices[j + 1]) / cost
                if gain > best_gain:
                    best, best_gain = (li, e, cost), gain
        if best is None:
            break
        li, e, cost = best
        level[li][e] += 1
        budget -= cost
    return [[choices[j] for j in row] for row in level]
