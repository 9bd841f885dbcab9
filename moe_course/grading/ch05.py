"""Checkers for chapter 5, quantization: group-wise zero-point fake quantization and 4-bit packing.

Each checker compares the student's function with the package's reference
(:func:`moe_course.compress.quantization.fake_quantize` and
:func:`~moe_course.compress.quantization.pack_codes`) on a hand-made case, random cases and edge
cases, and recognises the usual wrong answers so that the hint names the mistake.
"""

from __future__ import annotations

import torch

from moe_course.compress.quantization import fake_quantize, pack_codes

from .core import CheckFailed, checker, expect

__all__ = ["check_fake_quant_groupwise", "check_pack_int4"]


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
