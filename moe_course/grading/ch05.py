"""Checkers for chapter 5, quantization: group-wise zero-point fake quantization and 4-bit packing.

Each checker compares the student's function with the package's reference
(:func:`moe_course.compress.quantization.fake_quantize` and
:func:`~moe_course.compress.quantization.pack_codes`) on a hand-made case, random cases and edge
cases, and recognises the usual wrong answers so that the hint names the mistake.
"""

from __future__ import annotations

import torch

from moe_course.compress.quantization import fake_quantize, pack_codes, quantize

from .core import CheckFailed, checker, describe, expect

__all__ = ["check_fake_quant_clipped", "check_pack_int2", "check_quantized_copy", "check_allocate_bits",
           "zoo_model",
           "check_fake_quant_groupwise", "check_pack_int4"]


# --------------------------------------------------------------------------------------------
# Exercise 5.1: asymmetric (zero-point) group-wise fake quantization
# --------------------------------------------------------------------------------------------
def _reference_fq(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    return fake_quantize(w, bits, symmetric=False, granularity="group", group_size=group_size)


def _fq_variants(w: torch.Tensor, bits: int, g: int) -> dict[str, torch.Tensor]:
    """Typical wrong answers, to name the one a student wrote."""
    x = w.reshape(-1, g)

    def fq(x, levels, include_zero=True, round_zero=True, rnd=torch.round, clamp_hi=None, z_sign=1.0,
           dequant=lambda q, z, s: (q - z) * s, round_after_z=False):
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        if include_zero:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        s = (hi - lo) / levels
        s = torch.where(s > 0, s, torch.ones_like(s))
        z = -z_sign * lo / s
        z = rnd(z) if round_zero else z
        q = rnd(x / s + z) if round_after_z else rnd(x / s) + z
        q = q if clamp_hi == "none" else torch.clamp(q, 0, levels if clamp_hi is None else clamp_hi)
        return dequant(q, z, s).reshape(w.shape)

    def half_up(t):
        return torch.floor(t + 0.5)

    levels = 2 ** bits - 1
    rows = w.reshape(-1, w.shape[-1])
    return {
        "levels": fq(x, 2 ** bits),
        "per_row": fq(rows, levels) if rows.shape[0] > 1 and w.shape[-1] != g else None,
        "per_tensor": fake_quantize(w, bits, symmetric=False, granularity="tensor"),
        "symmetric": fake_quantize(w, bits, symmetric=True, granularity="group", group_size=g),
        "no_round_zero": fq(x, levels, round_zero=False),
        "no_zero_in_range": fq(x, levels, include_zero=False),
        "round_after_z": fq(x, levels, round_after_z=True),
        "half_up": fq(x, levels, rnd=half_up),
        "trunc": fq(x, levels, rnd=torch.trunc),
        "floor": fq(x, levels, rnd=torch.floor),
        "no_clamp": fq(x, levels, clamp_hi="none"),
        "clamp_2b": fq(x, levels, clamp_hi=2 ** bits),
        "z_sign": fq(x, levels, z_sign=-1.0),
        "dequant": fq(x, levels, dequant=lambda q, z, s: q * s - z),
        "columns": (fq(rows.T.contiguous().reshape(-1, g), levels).reshape(rows.shape[1], rows.shape[0]).T
                    .reshape(w.shape) if rows.shape[0] > 1 else None),
        "unchanged": w,
    }


_FQ_HINTS = {
    "levels": "b bits give 2**b codes 0 .. 2**b - 1, so the step is (hi - lo) / (2**b - 1), not / 2**b",
    "per_tensor": "you used one scale for the whole tensor: compute lo, hi (and the scale) separately for each "
                  "group of group_size consecutive elements of a row (reshape to [-1, group_size])",
    "symmetric": "that is symmetric absmax quantization: the exercise asks for the asymmetric (zero-point) scheme "
                 "with s = (hi - lo) / (2**b - 1) and z = round(-lo / s)",
    "no_round_zero": "the zero point must be an integer code: z = round(-lo / s); an unrounded z cannot be stored "
                     "in the integer grid and zero is no longer exact",
    "no_zero_in_range": "extend each group's range to include 0 (lo = min(min(w), 0), hi = max(max(w), 0)) so that "
                        "a weight of 0 is represented exactly; a group whose weights are all positive (or all "
                        "negative) then still has lo = 0 (or hi = 0)",
    "per_row": "you used one (s, z) per row (per channel): the exercise asks for one per group of group_size "
               "consecutive elements of a row (reshape to [-1, group_size])",
    "half_up": "ties are broken the wrong way: torch.round rounds a half to the nearest EVEN integer (round half to "
               "even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2), as the reference does, while floor(x + 0.5) rounds every half up; "
               "use torch.round for w / s and for z",
    "round_after_z": "ties are broken the wrong way: round w / s first with torch.round (round half to even), then "
                     "add the integer z, q = round(w / s) + z; round(w / s + z) or floor(w / s + 0.5) + z lands on "
                     "another code when w / s is exactly a half (round(-1.5 + 3) = 2, but round(-1.5) + 3 = 1)",
    "trunc": "you truncated toward zero (int() / .long() / torch.trunc) instead of rounding: use torch.round, "
             "the nearest code",
    "floor": "you rounded down (floor) instead of to the nearest code: use torch.round",
    "no_clamp": "the codes are not clamped: round(w / s) + z can leave [0, 2**b - 1] (when w / s and z both round "
                "up on a tie), so clamp q to 0 .. 2**b - 1",
    "clamp_2b": "wrong clamp range: b bits store the codes 0 .. 2**b - 1, so clamp q to [0, 2**b - 1], not [0, 2**b]",
    "z_sign": "the zero point has the wrong sign: z = round(-lo / s), a code >= 0 because lo <= 0",
    "dequant": "dequantize with (q - z) * s: subtract the zero point from the CODE before scaling, not z from q * s",
    "columns": "your groups run down the columns: a group is group_size CONSECUTIVE elements of a row "
               "(w.reshape(-1, group_size) of the row-major tensor)",
    "unchanged": "you returned w unchanged: quantize to integer codes and dequantize back with (q - z) * s",
}


def _diagnose_fq(out: torch.Tensor, w: torch.Tensor, bits: int, g: int) -> str:
    ref = _reference_fq(w, bits, g)
    for name, v in _fq_variants(w, bits, g).items():
        if v is None or torch.allclose(v.float(), ref, atol=1e-6):  # not a mistake on this input
            continue
        if torch.allclose(out.float(), v.float(), atol=1e-6):
            return _FQ_HINTS[name]
    return "compare with the formulas: s = (hi - lo)/(2**b - 1), z = round(-lo/s), q = clamp(round(w/s) + z, 0, 2**b - 1)"


@checker("Exercise 5.1: group-wise zero-point fake quantization")
def check_fake_quant_groupwise(fake_quant_groupwise) -> None:
    hand = torch.tensor([[0.0, 0.3, 1.0, 0.7, -0.2, -0.4, 0.1, 0.4]])
    # Groups entirely on one side of 0 (all positive, all negative): the range must still include 0.
    one_sided = torch.tensor([[0.2, 0.5, 0.9, 1.0, -0.3, -0.8, -0.1, -0.6], [1.5, 1.2, 2.0, 1.1, -2.0, -1.0, -1.5, -1.2]])
    # Exact ties with s = 1: w / s = 0.5, 1.5 and z = round(1.5) test how halves are rounded (torch.round: to
    # even) and whether q = round(w / s) + z is clamped (1.5 + round(1.5) = 4 > 3).
    ties = torch.tensor([[0.0, 0.5, 1.5, 3.0, -1.5, 1.5, 0.0, 0.5], [2.5, 0.0, 1.0, 3.0, -3.0, -0.5, -2.5, 0.0]])
    cases = [(one_sided, 2, 4), (hand, 2, 4), (hand, 4, 8), (one_sided, 3, 8), (ties, 2, 4)]
    cases += [(torch.randn(6, 32) * torch.rand(6, 1) * 2, b, g) for b, g in ((2, 8), (3, 16), (4, 32), (8, 8))]
    for w, bits, g in cases:
        out = fake_quant_groupwise(w.clone(), bits, g)
        desc = f"(w of shape {tuple(w.shape)}, bits={bits}, group_size={g})"
        if not torch.is_tensor(out):
            raise CheckFailed(f"return a tensor (the dequantized weights), got {type(out).__name__} {desc}")
        expect(out.shape == w.shape, f"the output must have w's shape {tuple(w.shape)}, got {tuple(out.shape)} {desc}")
        ref = _reference_fq(w, bits, g)
        if not torch.allclose(out.float(), ref, atol=1e-5):
            raise CheckFailed(f"{_diagnose_fq(out, w, bits, g)} {desc}")
        distinct = max(torch.unique(out.reshape(-1, g)[i]).numel() for i in range(w.numel() // g))
        expect(distinct <= 2 ** bits, f"a group has {distinct} distinct values but {bits} bits allow {2 ** bits} {desc}")
    zero = torch.zeros(2, 8)
    zero[0, :4] = torch.tensor([0.5, -0.5, 0.25, 0.0])
    out = fake_quant_groupwise(zero.clone(), 4, 4)
    expect(torch.is_tensor(out) and torch.isfinite(out).all(),
           "a group of zeros has hi - lo = 0, so s = 0: guard the division (e.g. use s = 1 there) to avoid NaN")
    expect(torch.equal(out[1], torch.zeros(8)), "a group of zeros must come back as exact zeros")


# --------------------------------------------------------------------------------------------
# Exercise 5.2: pack two 4-bit codes per byte
# --------------------------------------------------------------------------------------------
@checker("Exercise 5.2: pack 4-bit codes, two per byte")
def check_pack_int4(pack_int4) -> None:
    hand = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8], dtype=torch.uint8)
    cases = [hand, torch.tensor([15, 0], dtype=torch.uint8), torch.randint(0, 16, (64,), dtype=torch.uint8),
             torch.randint(0, 16, (2, 6), dtype=torch.uint8)]
    for codes in cases:
        out = pack_int4(codes.clone())
        desc = f"(codes {codes.reshape(-1)[:8].tolist()}{'...' if codes.numel() > 8 else ''})"
        if not torch.is_tensor(out):
            raise CheckFailed(f"return a torch.Tensor of bytes, got {type(out).__name__} {desc}")
        ref = pack_codes(codes, 4)[: codes.numel() // 2]  # pack_codes pads to 8 codes
        expect(out.dim() == 1 or out.numel() == codes.numel(),
               f"return a 1-D tensor of bytes whatever the input's shape, got shape {tuple(out.shape)}: flatten the "
               f"codes first (codes.reshape(-1)) {desc}")
        out = out.reshape(-1)
        if out.numel() == codes.numel():
            raise CheckFailed(f"you returned one byte per code ({out.numel()} bytes): two 4-bit codes share a "
                              f"byte, so n codes need n/2 bytes {desc}")
        expect(out.numel() == ref.numel(), f"{codes.numel()} codes need {ref.numel()} bytes, got {out.numel()} {desc}")
        expect(out.dtype == torch.uint8, f"return dtype torch.uint8 (one byte per element), got {out.dtype} {desc}")
        if not torch.equal(out, ref):
            pairs = codes.reshape(-1, 2).to(torch.int64)
            swapped = (pairs[:, 0] << 4 | pairs[:, 1]).to(torch.uint8)
            if torch.equal(out, swapped):
                raise CheckFailed(f"the nibbles are swapped: the EVEN code goes in the low nibble "
                                  f"(byte = codes[0::2] | codes[1::2] << 4) {desc}")
            added = (pairs[:, 0] + pairs[:, 1]).to(torch.uint8)
            if torch.equal(out, added):
                raise CheckFailed(f"you added the two codes: shift the odd code left by 4 bits first "
                                  f"(codes[1::2] << 4) {desc}")
            if codes.dim() > 1 and codes.shape[0] % 2 == 0:
                rows = (codes[0::2].to(torch.int64) | codes[1::2].to(torch.int64) << 4).to(torch.uint8).reshape(-1)
                if torch.equal(out, rows):
                    raise CheckFailed(f"for a {codes.dim()}-D input, codes[0::2] takes every other ROW: flatten first "
                                      f"(codes.reshape(-1)), then pair neighbouring codes {desc}")
            flat = codes.reshape(-1).to(torch.int64)
            half = flat.numel() // 2
            if torch.equal(out, (flat[:half] | flat[half:] << 4).to(torch.uint8)):
                raise CheckFailed(f"you paired the first half of the codes with the second half: byte j holds the "
                                  f"NEIGHBOURS codes[2j] and codes[2j+1] (codes[0::2] and codes[1::2]) {desc}")
            if torch.equal(out, pairs[:, 0].to(torch.uint8)):
                raise CheckFailed(f"the high nibble is empty: the odd code was shifted out of the byte (a uint8 "
                                  f"shifted left by 8 bits is 0); shift it by 4 bits, codes[1::2] << 4 {desc}")
            raise CheckFailed(f"bytes differ from the reference {ref[:4].tolist()}...: byte j = codes[2j] | "
                              f"codes[2j+1] << 4 {desc}")


# ============================================================================================
# The exercises as the notebook asks them now: a variant the chapter does not show (a clipping
# search per group), 2-bit packing, and the learner's quantizer run on the zoo model.
# ============================================================================================
def _clip_fq(w: torch.Tensor, bits: int, g: int, ratios, *, levels=None, rnd=torch.round, clamp=True,
             score="sse", pick="min", per="group", hi_only=False, columns=False) -> torch.Tensor:
    """Zero-point fake quantization with a per-group search over clipping ratios, and its usual mistakes."""
    x = w.float()
    if columns:
        rows = x.reshape(-1, x.shape[-1])
        return _clip_fq(rows.T.contiguous(), bits, g, ratios).T.reshape(w.shape)
    x = x.reshape(-1, g)
    levels = 2 ** bits - 1 if levels is None else levels
    lo0, hi0 = x.amin(1, keepdim=True).clamp(max=0), x.amax(1, keepdim=True).clamp(min=0)
    best = err_best = None
    for r in ratios:
        lo, hi = (lo0 if hi_only else r * lo0), r * hi0
        s = (hi - lo) / levels
        s = torch.where(s > 0, s, torch.ones_like(s))
        z = rnd(-lo / s)
        q = rnd(x / s) + z
        if clamp:
            q = q.clamp(0, levels)
        xh = (q - z) * s
        diff = xh - x
        err = diff.abs().amax(1, keepdim=True) if score == "max" else diff.pow(2).sum(1, keepdim=True)
        if per == "tensor":
            err = err.sum().expand_as(err)
        if best is None:
            best, err_best = xh, err
        else:
            better = err > err_best if pick == "max" else (err <= err_best if pick == "last" else err < err_best)
            best, err_best = torch.where(better, xh, best), torch.where(better, err, err_best)
    return best.reshape(w.shape)


_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)

_CLIP_VARIANTS = {
    "no_search": "no_search",
    "no_clamp": dict(clamp=False),
    "levels": dict(levels="2b"),
    "floor": dict(rnd=torch.floor),
    "trunc": dict(rnd=torch.trunc),
    "per_tensor": dict(per="tensor"),
    "max_error": dict(score="max"),
    "largest_error": dict(pick="max"),
    "last_tie": dict(pick="last"),
    "hi_only": dict(hi_only=True),
    "columns": dict(columns=True),
}

_CLIP_HINTS = {
    "no_clamp": "the codes are not clamped: once the range is clipped (ratio < 1) the largest weights fall outside "
                "it, and round(w / s) + z must be clamped to 0 .. 2**b - 1 (that clamp IS the clipping)",
    "levels": "b bits give 2**b codes 0 .. 2**b - 1, so the step is (hi - lo) / (2**b - 1), not / 2**b",
    "floor": "you rounded down (floor) instead of to the nearest code: use torch.round for w / s and for z",
    "trunc": "you truncated toward zero (int() / .long() / torch.trunc) instead of rounding: use torch.round",
    "per_tensor": "you chose ONE ratio for the whole tensor (the smallest total error): choose the ratio separately "
                  "for each group, by that group's own error",
    "max_error": "you scored each ratio by the largest |error| of the group: score it by the SUM OF SQUARED errors "
                 "sum (w - w_hat)**2 over the group",
    "largest_error": "you kept the ratio with the LARGEST error: keep the one with the smallest squared error",
    "last_tie": "on a tie keep the FIRST ratio of the list (the widest range): replace the current best only when "
                "the error is strictly smaller",
    "hi_only": "scale both ends of the range: lo = ratio * min(min(w), 0) and hi = ratio * max(max(w), 0)",
    "columns": "your groups run down the columns: a group is group_size CONSECUTIVE elements of a row "
               "(w.reshape(-1, group_size) of the row-major tensor)",
    "no_search": "you returned plain round-to-nearest over the full range (ratio 1.0 for every group): try every "
                 "ratio of `ratios` on each group and keep the one with the smallest squared error",
}


def _clip_variant(name: str, w, bits, g, ratios):
    opts = _CLIP_VARIANTS[name]
    if opts == "no_search":
        return _clip_fq(w, bits, g, (1.0,))
    if opts.get("levels") == "2b":
        opts = {**opts, "levels": 2 ** bits}
    return _clip_fq(w, bits, g, ratios, **opts)


@checker("Exercise 5.1: zero-point quantization with a clipping search")
def check_fake_quant_clipped(fake_quant_clipped) -> None:
    """``fake_quant_clipped(w, bits, group_size, ratios) -> w_hat`` (w's shape and dtype)."""
    g = torch.Generator().manual_seed(51)
    outliers = torch.randn(4, 32, generator=g)
    outliers[:, 3] *= 8.0  # one large weight per group of 32 makes clipping pay off
    ties = torch.tensor([[0.0, 0.5, 1.5, 3.0, -1.5, 1.5, 0.0, 0.5], [2.5, 0.0, 1.0, 3.0, -3.0, -0.5, -2.5, 0.0]])
    cases = [(outliers, 3, 8, _RATIOS), (outliers, 2, 32, _RATIOS), (ties, 2, 4, (1.0,)),
             (torch.randn(6, 32, generator=g) * torch.rand(6, 1, generator=g) * 2, 3, 16, _RATIOS),
             (torch.randn(2, 3, 16, generator=g), 4, 8, (1.0, 0.8, 0.6)),
             (torch.tensor([[1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0]]), 2, 8, (1.0, 1.0, 0.5)),  # a tie: first
             (torch.randn(8, 64, generator=g).pow(3), 2, 16, _RATIOS)]
    pending = None
    for w, bits, gs, ratios in cases:
        desc = f"(w of shape {tuple(w.shape)}, bits={bits}, group_size={gs}, ratios={tuple(ratios)})"
        out = fake_quant_clipped(w.clone(), bits, gs, tuple(ratios))
        if not torch.is_tensor(out):
            raise CheckFailed(f"return a tensor (the dequantized weights), got {type(out).__name__} {desc}")
        expect(out.shape == w.shape, f"the output must have w's shape {tuple(w.shape)}, got {tuple(out.shape)} {desc}")
        ref = _clip_fq(w, bits, gs, ratios)
        if out.dtype != w.dtype:
            raise CheckFailed(f"return w's dtype ({w.dtype}), got {out.dtype}: the fake-quantized weights replace "
                              f"w in the model (compute in w's dtype or cast back with .to(w.dtype)) {desc}")
        if torch.allclose(out, ref, atol=1e-5):
            continue
        if bool((out == out.round()).all()) and float(out.min()) >= 0 and float(out.max()) <= 2 ** bits - 1:
            raise CheckFailed(f"you returned the integer CODES q: return the dequantized weights (q - z) * s {desc}")
        names = [name for name in _CLIP_VARIANTS
                 if not torch.allclose(v := _clip_variant(name, w, bits, gs, ratios), ref, atol=1e-6)
                 and torch.allclose(out.float(), v, atol=1e-5)]
        if len(names) == 1:
            raise CheckFailed(f"{_CLIP_HINTS[names[0]]} {desc}")
        if names:  # several mistakes give these numbers: a later case tells them apart
            pending = pending or f"{_CLIP_HINTS[names[0]]} {desc}"
            continue
        raise CheckFailed(f"the values differ from the reference (max |diff| = {(out.float() - ref).abs().max():.3g}): "
                          "per group of group_size consecutive elements and per ratio r: lo = r * min(min w, 0), "
                          "hi = r * max(max w, 0), s = (hi - lo) / (2**b - 1), z = round(-lo / s), q = "
                          f"clamp(round(w / s) + z, 0, 2**b - 1), w_hat = (q - z) * s; keep the w_hat with the "
                          f"smallest sum of squared errors (the first ratio on a tie) {desc}")
    if pending:
        raise CheckFailed(pending)
    zero = torch.zeros(2, 8)
    zero[0, :4] = torch.tensor([0.5, -0.5, 0.25, 0.0])
    out = fake_quant_clipped(zero.clone(), 4, 4, _RATIOS)
    expect(torch.is_tensor(out) and torch.isfinite(out).all(),
           "a group of zeros has hi - lo = 0, so s = 0: guard the division (e.g. use s = 1 there) to avoid NaN")
    expect(torch.equal(out[1], torch.zeros(8)), "a group of zeros must come back as exact zeros")


# --------------------------------------------------------------------------------------------
# Exercise 5.2: four 2-bit codes per byte
# --------------------------------------------------------------------------------------------
@checker("Exercise 5.2: pack 2-bit codes, four per byte")
def check_pack_int2(pack_int2) -> None:
    g = torch.Generator().manual_seed(52)
    cases = [torch.tensor([1, 2, 3, 0, 3, 3, 0, 1], dtype=torch.uint8), torch.tensor([3, 0, 0, 0], dtype=torch.uint8),
             torch.randint(0, 4, (64,), generator=g, dtype=torch.uint8),
             torch.randint(0, 4, (4, 6), generator=g, dtype=torch.uint8),
             torch.randint(0, 4, (2, 2, 8), generator=g, dtype=torch.uint8)]
    for codes in cases:
        desc = f"(codes of shape {tuple(codes.shape)}: {codes.reshape(-1)[:8].tolist()}{'...' if codes.numel() > 8 else ''})"
        out = pack_int2(codes.clone())
        if not torch.is_tensor(out):
            raise CheckFailed(f"return a torch.Tensor of bytes, got {type(out).__name__} {desc}")
        n = codes.numel()
        ref = pack_codes(codes, 2)[: n // 4]
        if out.numel() == n:
            raise CheckFailed(f"you returned one byte per code ({out.numel()} bytes): four 2-bit codes share a byte, "
                              f"so n codes need n/4 bytes {desc}")
        expect(out.numel() == ref.numel(), f"{n} codes need {ref.numel()} bytes, got {out.numel()} {desc}")
        flat = codes.reshape(-1).to(torch.int64)
        if codes.dim() > 1 and codes.shape[0] % 4 == 0:
            rows = sum(codes[i::4].to(torch.int64) << (2 * i) for i in range(4)).to(torch.uint8).reshape(-1)
            if torch.equal(out.reshape(-1).to(torch.int64), rows.to(torch.int64)) and not torch.equal(rows, ref):
                raise CheckFailed(f"for a {codes.dim()}-D input, codes[i::4] takes every fourth ROW: flatten first "
                                  f"(codes.reshape(-1)), then combine neighbouring codes {desc}")
        expect(out.dim() == 1, f"return a 1-D tensor of {ref.numel()} bytes whatever the input's shape, got shape "
                               f"{tuple(out.shape)}: flatten the codes first (codes.reshape(-1)) {desc}")
        expect(out.dtype == torch.uint8, f"return dtype torch.uint8 (one byte per element), got {out.dtype} {desc}")
        if torch.equal(out, ref):
            continue
        quads = flat.reshape(-1, 4)
        reversed_ = sum(quads[:, i] << (2 * (3 - i)) for i in range(4)).to(torch.uint8)
        if torch.equal(out, reversed_):
            raise CheckFailed(f"the order is reversed: code 4j goes in the LOWEST two bits (shift 0) and code 4j+3 in "
                              f"the highest (shift 6) {desc}")
        if torch.equal(out, quads.sum(1).to(torch.uint8)):
            raise CheckFailed(f"you added the codes without shifting them: code 4j+i moves to bits 2i, 2i+1 "
                              f"(shift left by 2*i) {desc}")
        if torch.equal(out, sum(quads[:, i] << (4 * i) for i in range(4)).to(torch.uint8)):
            raise CheckFailed(f"you shifted by 4 bits per code (nibbles): a 2-bit code takes 2 bits, so shift code "
                              f"4j+i by 2*i {desc}")
        quarter = flat.numel() // 4
        if torch.equal(out, sum(flat[i * quarter:(i + 1) * quarter] << (2 * i) for i in range(4)).to(torch.uint8)):
            raise CheckFailed(f"you combined codes j, j+n/4, j+n/2, j+3n/4: byte j holds the NEIGHBOURS codes 4j .. "
                              f"4j+3 (codes[i::4]) {desc}")
        raise CheckFailed(f"bytes differ from the reference {ref[:4].tolist()}...: byte j = codes[4j] | codes[4j+1] << 2 "
                          f"| codes[4j+2] << 4 | codes[4j+3] << 6 {desc}")


# --------------------------------------------------------------------------------------------
# Exercise 5.3 (use it): your quantizer on the Shakespeare model, perplexity at 2, 3 and 4 bits
# --------------------------------------------------------------------------------------------
USE_BITS = (2, 3, 4)
USE_GROUP = 32
PPL_TOLERANCE = 0.01  # absolute, on perplexities around 7-8
_ZOO: dict = {}


def zoo_model():
    """The ``shakespeare-moe`` zoo model and the 32 validation blocks the exercise measures on."""
    if not _ZOO:
        from moe_course import zoo
        _ZOO["lm"] = zoo.pretrained("shakespeare-moe", progress=False).cpu().eval()
        _ZOO["val"] = zoo.data("shakespeare-moe")["validation"].select(range(32))
    return _ZOO["lm"], _ZOO["val"]


def _reference_quantized(model, bits: int, group_size: int, ratios=_RATIOS, **mistake):
    import copy

    from moe_course.layers import moe_layers
    m = copy.deepcopy(model)
    with torch.no_grad():
        for layer in moe_layers(m):
            for name in ("w_in", "w_gate", "w_out"):
                w = getattr(layer.experts, name)
                if w is not None:
                    w.copy_(_clip_fq(w.transpose(1, 2), bits, group_size, ratios).transpose(1, 2))
    return m


def _perplexity(model, val) -> float:
    from moe_course.train import evaluate
    return float(evaluate(model, val, batch_size=128)["perplexity"])


def _expert_mats(model):
    from moe_course.layers import moe_layers
    return [(i, name, getattr(layer.experts, name)) for i, layer in enumerate(moe_layers(model))
            for name in ("w_in", "w_gate", "w_out") if getattr(layer.experts, name) is not None]


@checker("Exercise 5.3: your quantizer on the Shakespeare model", timeout=180)
def check_quantized_copy(quantized_copy) -> None:
    """``quantized_copy(model, bits, group_size) -> new model`` with every expert matrix fake-quantized by the
    learner's ``fake_quant_clipped`` along the input dimension; then validation perplexity at 2/3/4 bits."""
    from moe_course.layers import moe_layers
    import copy
    pristine, val = zoo_model()
    lm = copy.deepcopy(pristine)  # the learner's function gets a copy: a mistake cannot spoil the cached model
    before = {k: v.detach().clone() for k, v in lm.state_dict().items()}
    out = quantized_copy(lm, 3, USE_GROUP)
    expect(isinstance(out, torch.nn.Module), f"return the quantized model (an nn.Module), got {describe(out)}")
    expect(out is not lm, "you returned the input model itself: work on a copy (copy.deepcopy(model)) so that the "
                          "original stays fp32")
    ref = _reference_quantized(pristine, 3, USE_GROUP)
    got_mats, ref_mats = _expert_mats(out), _expert_mats(ref)
    expect(len(got_mats) == len(ref_mats), "the returned model has a different set of MoE layers")
    for (i, name, w), (_, _, r) in zip(got_mats, ref_mats):
        if torch.allclose(w.detach().float(), r.float(), atol=1e-5):
            continue
        orig = getattr(moe_layers(pristine)[i].experts, name).detach()
        where = f"(layer {i}, experts.{name}, 3 bits, group_size {USE_GROUP})"
        if torch.equal(w.detach(), orig):
            raise CheckFailed(f"experts.{name} of layer {i} is unchanged: quantize every expert matrix of every MoE "
                              f"layer, w_in, w_gate AND w_out {where}")
        if torch.allclose(w.detach().float(), _clip_fq(orig, 3, USE_GROUP, _RATIOS), atol=1e-5):
            raise CheckFailed(f"your groups run along the wrong axis: a group is {USE_GROUP} consecutive weights of "
                              "one OUTPUT row, along the INPUT dimension; experts store w_in as [E, d_in, d_out], so "
                              f"quantize w.transpose(1, 2) and transpose back (as QuantizedExperts does) {where}")
        raise CheckFailed(f"the quantized weights differ from your fake_quant_clipped applied to "
                          f"w.transpose(1, 2) with ratios {_RATIOS} (max |diff| = "
                          f"{(w.detach().float() - r.float()).abs().max():.3g}) {where}")
    for (name, p), (_, q) in zip(out.state_dict().items(), ref.state_dict().items()):
        if "experts" not in name and not torch.equal(p, q):
            raise CheckFailed(f"`{name}` changed: quantize only the experts (routers, attention and embeddings stay "
                              "fp32 in this exercise)")
    changed = [k for k, v in lm.state_dict().items() if not torch.equal(v, before[k])]
    if changed:
        raise CheckFailed(f"your function modified the input model ({changed[0]}): quantize a copy "
                          "(copy.deepcopy(model)) and leave the fp32 model as it is")
    lines = []
    for bits in USE_BITS:
        got = _perplexity(quantized_copy(copy.deepcopy(pristine), bits, USE_GROUP), val)
        want = _perplexity(_reference_quantized(pristine, bits, USE_GROUP), val)
        expect(abs(got - want) <= PPL_TOLERANCE, f"at {bits} bits your model's perplexity is {got:.3f}, the "
                                                 f"reference's {want:.3f} (tolerance {PPL_TOLERANCE})")
        rtn = _perplexity(quantize(pristine, bits, group_size=USE_GROUP), val)
        lines.append(f"{bits} bits: {got:.3f} (plain round-to-nearest: {rtn:.3f})")
    print(f"shakespeare-moe, 32 validation blocks, fp32 perplexity {_perplexity(pristine, val):.3f}; with your quantizer "
          f"(group {USE_GROUP}, clipping search): " + ", ".join(lines))



# --------------------------------------------------------------------------------------------
# Exercise 5.4 (build a method): a bit allocation, >= 12x smaller experts at <= 2.5 % perplexity
# --------------------------------------------------------------------------------------------
ALLOC_MIN_RATIO = 12.0       # expert bytes of fp32 / expert bytes quantized (per-channel scales)
ALLOC_MAX_PPL_RISE = 2.5     # percent, on the first 128 validation blocks
ALLOC_VAL_BLOCKS = 128
_ALLOC: dict = {}


def _alloc_setup():
    if not _ALLOC:
        from moe_course import zoo
        lm, _ = zoo_model()
        data = zoo.data("shakespeare-moe")
        _ALLOC["calib"] = data["train"].shuffle(seed=0).select(range(32))
        _ALLOC["val"] = data["validation"].select(range(ALLOC_VAL_BLOCKS))
        _ALLOC["ppl"] = _perplexity(lm, _ALLOC["val"])
    return _ALLOC["calib"], _ALLOC["val"], _ALLOC["ppl"]


def _alloc_variant_scores(model, calib) -> dict[str, list[torch.Tensor]]:
    """Per-expert scores of the usual attempts, to name the one a learner's allocation matches."""
    from moe_course.calib import layer_inputs
    from moe_course.layers import moe_layers
    q2, q3 = quantize(model, 2), quantize(model, 3)
    out: dict[str, list[torch.Tensor]] = {"frequency": [], "gain": [], "weight": []}
    with torch.no_grad():
        for layer, l2, l3, x in zip(moe_layers(model), moe_layers(q2), moe_layers(q3),
                                    layer_inputs(model, calib)):
            r = layer.router(x)
            gate = torch.zeros(len(x), layer.num_experts).scatter(1, r.indices, r.weights)
            y = layer.experts.forward_all(x)
            e2 = ((gate.T[..., None] * (y - l2.experts.forward_all(x))) ** 2).sum((1, 2))
            e3 = ((gate.T[..., None] * (y - l3.experts.forward_all(x))) ** 2).sum((1, 2))
            out["frequency"].append((gate > 0).float().mean(0))
            out["gain"].append(e2 - e3)
            w2 = sum((a - b).pow(2).flatten(1).sum(1) for a, b in zip(layer.experts.weights(),
                                                                       l2.experts.weights())
                     if a is not None)
            out["weight"].append(w2)
    return out


def _top_alloc(scores: list[torch.Tensor], n_high: int, reverse: bool = False) -> list[list[int]]:
    flat = sorted(((float(s[e]), i, e) for i, s in enumerate(scores) for e in range(len(s))),
                  reverse=not reverse)
    bits = [[2] * len(s) for s in scores]
    for _, i, e in flat[:n_high]:
        bits[i][e] = 3
    return bits


_ALLOC_HINTS = {
    "frequency": "you gave the extra bit to the most frequently routed experts: frequency says how often an "
                 "expert runs, not how much its output suffers at 2 bits; measure, per expert, the gate-weighted "
                 "output error at 2 bits minus that at 3 bits on the calibration tokens, and give 3 bits to the "
                 "experts where the extra bit removes the most error",
    "reverse": "your allocation is upside down: you gave 3 bits to the experts whose output error the extra bit "
               "reduces LEAST; sort by that gain in decreasing order",
    "weight": "you ranked by the error of the weights: what matters is the error of the expert's OUTPUT on the "
              "tokens routed to it, weighted by their gate weights (an expert rarely used or fed small inputs "
              "can take 2 bits)",
}


@checker("Exercise 5.4: a bit allocation, >= 12x smaller experts at <= 2.5 % perplexity", timeout=240)
def check_allocate_bits(allocate_bits) -> None:
    """``allocate_bits(model, calib) -> bits[layer][expert]`` (each 2, 3, 4 or 8); the experts are
    quantized with per-channel scales by the package and must be >= 12x smaller with perplexity
    at most 2.5 % above fp32."""
    import copy

    from moe_course import metrics
    from moe_course.layers import moe_layers
    lm, _ = zoo_model()
    calib, val, base = _alloc_setup()
    work = copy.deepcopy(lm)
    bits = allocate_bits(work, calib)
    layers = moe_layers(lm)
    shape = [layer.num_experts for layer in layers]
    ok_shape = (isinstance(bits, (list, tuple)) and len(bits) == len(layers)
                and all(isinstance(row, (list, tuple)) and len(row) == n for row, n in zip(bits, shape)))
    expect(ok_shape, f"return one list of bits per MoE layer, one int per expert: {len(shape)} lists of "
                     f"{shape[0]}, got {describe(bits)}")
    flat = [b for row in bits for b in row]
    bad = [b for b in flat if isinstance(b, bool) or not isinstance(b, int) or b not in (2, 3, 4, 8)]
    expect(not bad, f"every entry must be one of the package's bit widths 2, 3, 4 or 8 (a Python int), "
                    f"got {bad[0]!r}" if bad else "")
    changed = [k for k, v in work.state_dict().items() if not torch.equal(v, lm.state_dict()[k])]
    expect(not changed, f"your function modified the model ({changed[0] if changed else ''}): measure on it, "
                        "or on copies, but leave its weights as they are")
    q = quantize(lm, [list(row) for row in bits])
    ratio = metrics.size_report(lm).expert_bytes / metrics.size_report(q).expert_bytes
    got = _perplexity(q, val)
    rise = 100 * (got / base - 1)
    n3 = sum(b >= 3 for b in flat)
    print(f"shakespeare-moe: your allocation {dict(sorted({b: flat.count(b) for b in set(flat)}.items()))} "
          f"(bits: experts) -> experts {ratio:.2f}x smaller, perplexity {got:.3f} on {ALLOC_VAL_BLOCKS} "
          f"validation blocks ({rise:+.2f}% against fp32 {base:.3f}); target: >= {ALLOC_MIN_RATIO:g}x and "
          f"<= {ALLOC_MAX_PPL_RISE:+g}%")
    expect(ratio >= ALLOC_MIN_RATIO, f"your experts are only {ratio:.2f}x smaller (target {ALLOC_MIN_RATIO:g}x): "
                                     "too many experts above 2 bits; with per-channel scales 3 bits alone gives "
                                     "about 9.7x and 2 bits about 14x, so most experts must take 2 bits")
    if rise <= ALLOC_MAX_PPL_RISE:
        return
    if all(b == 2 for b in flat):
        raise CheckFailed(f"every expert at 2 bits: small enough, but {rise:+.2f}% perplexity; give the extra "
                          "bytes the size target leaves to the experts that need them most")
    scores = _alloc_variant_scores(lm, calib)
    mine = [[min(b, 3) for b in row] for row in bits]
    for name, key, rev in (("frequency", "frequency", False), ("reverse", "gain", True),
                           ("weight", "weight", False)):
        if mine == _top_alloc(scores[key], n3, reverse=rev):
            raise CheckFailed(_ALLOC_HINTS[name])
    raise CheckFailed(f"perplexity {rise:+.2f}% misses the target ({ALLOC_MAX_PPL_RISE:+g}%): choose the experts "
                      "that get 3 bits by how much the extra bit lowers their gate-weighted output error on the "
                      "calibration tokens")
