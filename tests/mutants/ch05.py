"""Chapter 5: group-wise zero-point fake quantization, packing 4-bit codes."""

from __future__ import annotations

import torch

from . import Chapter

M = Chapter("ch05")


# ------------------------------------------------------------------ 5.1 fake_quant_groupwise
def _fq(w, bits, group_size, *, levels=None, include_zero=True, rnd=torch.round, round_zero=True, clamp=(0, None),
        groups=None, z_sign=1.0, dequant="ok", guard=True):
    x = w.reshape(-1, group_size) if groups is None else groups(w, group_size)
    lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    if include_zero:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    levels = 2 ** bits - 1 if levels is None else levels
    s = (hi - lo) / levels
    if guard:
        s = torch.where(s > 0, s, torch.ones_like(s))
    z = -z_sign * lo / s
    z = rnd(z) if round_zero else z
    q = rnd(x / s) + z
    if clamp is not None:
        q = q.clamp(clamp[0], levels if clamp[1] is None else clamp[1])
    out = (q - z) * s if dequant == "ok" else q * s - z
    return out.reshape(w.shape)


@M.right("check_fake_quant_groupwise")
def fq_unflatten(w, bits, group_size):
    """Groups via unflatten of the last axis; s guarded with clamp_min, round after adding z."""
    x = w.unflatten(-1, (-1, group_size))
    lo = torch.minimum(x.amin(-1, keepdim=True), torch.zeros(()))
    hi = torch.maximum(x.amax(-1, keepdim=True), torch.zeros(()))
    levels = 2 ** bits - 1
    s = ((hi - lo) / levels).clamp_min(1e-12)
    z = (-lo / s).round()
    q = ((x / s).round() + z).clamp(0, levels)
    return ((q - z) * s).flatten(-2)


@M.wrong("check_fake_quant_groupwise", "round w / s first")
def fq_round_after_adding_zero(w, bits, group_size):
    """round(w / s + z): on ties with an odd z, half-to-even rounding lands on the other code."""
    x = w.reshape(-1, group_size)
    lo, hi = x.amin(1, keepdim=True).clamp(max=0), x.amax(1, keepdim=True).clamp(min=0)
    levels = 2 ** bits - 1
    s = (hi - lo) / levels
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = torch.round(-lo / s)
    q = torch.round(x / s + z).clamp(0, levels)
    return ((q - z) * s).reshape(w.shape)


@M.wrong("check_fake_quant_groupwise", "2**b - 1")
def fq_levels_two_to_b(w, bits, group_size):
    """Step (hi - lo) / 2**b."""
    return _fq(w, bits, group_size, levels=2 ** bits)


@M.wrong("check_fake_quant_groupwise", "include 0")
def fq_range_without_zero(w, bits, group_size):
    """lo = min(w), hi = max(w): the range need not contain 0."""
    return _fq(w, bits, group_size, include_zero=False)


@M.wrong("check_fake_quant_groupwise", "tie", "half to even")
def fq_round_half_up(w, bits, group_size):
    """floor(x + 0.5): rounds ties up (torch.round rounds them to even)."""
    return _fq(w, bits, group_size, rnd=lambda t: torch.floor(t + 0.5))


@M.wrong("check_fake_quant_groupwise", "truncat")
def fq_truncates(w, bits, group_size):
    """Truncation toward zero (int cast) instead of rounding."""
    return _fq(w, bits, group_size, rnd=torch.trunc)


@M.wrong("check_fake_quant_groupwise", "integer code")
def fq_unrounded_zero(w, bits, group_size):
    """z = -lo / s, not rounded."""
    return _fq(w, bits, group_size, round_zero=False)


@M.wrong("check_fake_quant_groupwise", "clamp")
def fq_no_clamp(w, bits, group_size):
    """No clamp to [0, 2**b - 1]."""
    return _fq(w, bits, group_size, clamp=None)


@M.wrong("check_fake_quant_groupwise", "clamp")
def fq_clamp_to_two_to_b(w, bits, group_size):
    """Clamped to [0, 2**b] (one code too many)."""
    return _fq(w, bits, group_size, clamp=(0, 2 ** bits))


@M.wrong("check_fake_quant_groupwise", "one scale for the whole tensor")
def fq_per_tensor(w, bits, group_size):
    """One (s, z) for the whole tensor."""
    return _fq(w, bits, w.numel())


@M.wrong("check_fake_quant_groupwise", "per row")
def fq_per_row(w, bits, group_size):
    """One (s, z) per row, group_size ignored."""
    return _fq(w, bits, w.shape[-1])


@M.wrong("check_fake_quant_groupwise", "symmetric")
def fq_symmetric(w, bits, group_size):
    """Symmetric absmax."""
    x = w.reshape(-1, group_size)
    s = x.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
    s = torch.where(s > 0, s, torch.ones_like(s))
    return (torch.round(x / s).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * s).reshape(w.shape)


@M.wrong("check_fake_quant_groupwise", "wrong sign")
def fq_zero_point_sign(w, bits, group_size):
    """z = round(lo / s): the sign of the zero point flipped."""
    return _fq(w, bits, group_size, z_sign=-1.0)


@M.wrong("check_fake_quant_groupwise", "(q - z) * s")
def fq_dequant_wrong(w, bits, group_size):
    """Dequantized as q * s - z."""
    return _fq(w, bits, group_size, dequant="wrong")


@M.wrong("check_fake_quant_groupwise", "s = 0")
def fq_no_zero_guard(w, bits, group_size):
    """No guard for s = 0 (a group of zeros gives NaN)."""
    return _fq(w, bits, group_size, guard=False)


@M.wrong("check_fake_quant_groupwise", "consecutive")
def fq_groups_down_columns(w, bits, group_size):
    """Groups of group_size elements taken down the columns (w.T) instead of along each row."""
    x = _fq(w.reshape(-1, w.shape[-1]).T.contiguous(), bits, group_size)
    return x.T.reshape(w.shape)


# ------------------------------------------------------------------ 5.2 pack_int4
@M.right("check_pack_int4")
def pack_multiply(codes):
    """low + 16 * high, computed in int16 and cast back."""
    pairs = codes.reshape(-1, 2).to(torch.int16)
    return (pairs[:, 0] + 16 * pairs[:, 1]).to(torch.uint8)


@M.wrong("check_pack_int4", "swapped")
def pack_swapped(codes):
    """The even code in the high nibble."""
    flat = codes.reshape(-1)
    return (flat[0::2] << 4) | flat[1::2]


@M.wrong("check_pack_int4", "added the two codes")
def pack_added(codes):
    """Added without a shift."""
    flat = codes.reshape(-1)
    return flat[0::2] + flat[1::2]


@M.wrong("check_pack_int4", "one byte per code")
def pack_nothing(codes):
    """The codes as they are."""
    return codes.reshape(-1).clone()


@M.wrong("check_pack_int4", "torch.uint8")
def pack_int64(codes):
    """Computed in int64 and returned as int64."""
    flat = codes.reshape(-1).long()
    return flat[0::2] | (flat[1::2] << 4)


@M.wrong("check_pack_int4", "flatten")
def pack_not_flattened(codes):
    """Slices the FIRST axis without flattening (every other row for a 2-D input)."""
    return (codes[0::2] | (codes[1::2] << 4)).reshape(-1)


@M.wrong("check_pack_int4", "second half")
def pack_halves(codes):
    """Pairs code j with code j + n/2 (first half low, second half high)."""
    flat = codes.reshape(-1)
    half = flat.numel() // 2
    return flat[:half] | (flat[half:] << 4)


@M.wrong("check_pack_int4", "shifted out")
def pack_shift_eight(codes):
    """Shifted by 8 bits (a whole byte: the high code falls off a uint8)."""
    flat = codes.reshape(-1)
    return flat[0::2] | (flat[1::2] << 8)
