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

    def fq(x, levels, include_zero=True, round_zero=True):
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        if include_zero:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        s = (hi - lo) / levels
        s = torch.where(s > 0, s, torch.ones_like(s))
        z = -lo / s
        z = torch.round(z) if round_zero else z
        q = torch.clamp(torch.round(x / s) + z, 0, levels)
        return ((q - z) * s).reshape(w.shape)

    levels = 2 ** bits - 1
    return {
        "levels": fq(x, 2 ** bits),
        "per_tensor": fake_quantize(w, bits, symmetric=False, granularity="tensor"),
        "symmetric": fake_quantize(w, bits, symmetric=True, granularity="group", group_size=g),
        "no_round_zero": fq(x, levels, round_zero=False),
        "no_zero_in_range": fq(x, levels, include_zero=False),
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
                        "a weight of 0 is represented exactly",
    "unchanged": "you returned w unchanged: quantize to integer codes and dequantize back with (q - z) * s",
}


def _diagnose_fq(out: torch.Tensor, w: torch.Tensor, bits: int, g: int) -> str:
    for name, v in _fq_variants(w, bits, g).items():
        if torch.allclose(out.float(), v.float(), atol=1e-6):
            return _FQ_HINTS[name]
    return "compare with the formulas: s = (hi - lo)/(2**b - 1), z = round(-lo/s), q = clamp(round(w/s) + z, 0, 2**b - 1)"


@checker("Exercise 5.1: group-wise zero-point fake quantization")
def check_fake_quant_groupwise(fake_quant_groupwise) -> None:
    hand = torch.tensor([[0.0, 0.3, 1.0, 0.7, -0.2, -0.4, 0.1, 0.4]])
    cases = [(hand, 2, 4), (hand, 4, 8)]
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
            raise CheckFailed(f"bytes differ from the reference {ref[:4].tolist()}...: byte j = codes[2j] | "
                              f"codes[2j+1] << 4 {desc}")
