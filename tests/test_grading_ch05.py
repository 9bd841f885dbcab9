"""Chapter 5 checkers: the reference passes, typical mistakes are caught (stubs: test_grading_scaffold.py)."""

from __future__ import annotations

import torch
from conftest import run

from moe_course.grading import ch05
from moe_course.grading.core import ERROR, FAIL, PASS


# ---------------------------------------------------------------- Exercise 5.1
def fake_quant_groupwise(w, bits, group_size, levels_fn=lambda b: 2 ** b - 1, include_zero=True,
                         round_zero=True, groups=True):
    x = w.reshape(-1, group_size) if groups else w.reshape(1, -1)
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    if include_zero:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    levels = levels_fn(bits)
    s = (hi - lo) / levels
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = torch.round(-lo / s) if round_zero else -lo / s
    q = torch.clamp(torch.round(x / s) + z, 0, levels)
    return ((q - z) * s).reshape(w.shape)


def test_fq_reference_passes():
    assert run(ch05.check_fake_quant_groupwise, fake_quant_groupwise).status == PASS


def test_fq_package_passes():
    from moe_course.compress.quantization import fake_quantize

    assert run(ch05.check_fake_quant_groupwise,
               lambda w, b, g: fake_quantize(w, b, granularity="group", group_size=g)).status == PASS


def test_fq_wrong_levels():
    r = run(ch05.check_fake_quant_groupwise, lambda w, b, g: fake_quant_groupwise(w, b, g, levels_fn=lambda b: 2 ** b))
    assert r.status == FAIL and "2**b - 1" in r.message


def test_fq_per_tensor():
    r = run(ch05.check_fake_quant_groupwise, lambda w, b, g: fake_quant_groupwise(w, b, g, groups=False))
    assert r.status == FAIL and "one scale for the whole tensor" in r.message


def test_fq_unrounded_zero():
    r = run(ch05.check_fake_quant_groupwise, lambda w, b, g: fake_quant_groupwise(w, b, g, round_zero=False))
    assert r.status == FAIL and "round(-lo / s)" in r.message


def test_fq_nan_on_zero_group():
    def nan_version(w, b, g):
        x = w.reshape(-1, g)
        lo, hi = x.amin(1, keepdim=True).clamp(max=0), x.amax(1, keepdim=True).clamp(min=0)
        s = (hi - lo) / (2 ** b - 1)
        z = torch.round(-lo / s)
        return ((torch.clamp(torch.round(x / s) + z, 0, 2 ** b - 1) - z) * s).reshape(w.shape)

    r = run(ch05.check_fake_quant_groupwise, nan_version)
    assert r.status in (FAIL, ERROR)


def test_fq_identity_caught():
    r = run(ch05.check_fake_quant_groupwise, lambda w, b, g: w)
    assert r.status == FAIL and "unchanged" in r.message


# ---------------------------------------------------------------- Exercise 5.2
def pack_int4(codes):
    flat = codes.reshape(-1).to(torch.uint8)
    return flat[0::2] | (flat[1::2] << 4)


def test_pack_reference_passes():
    assert run(ch05.check_pack_int4, pack_int4).status == PASS


def test_pack_swapped_nibbles():
    r = run(ch05.check_pack_int4, lambda c: (c.reshape(-1)[0::2] << 4) | c.reshape(-1)[1::2])
    assert r.status == FAIL and "swapped" in r.message


def test_pack_one_per_byte():
    r = run(ch05.check_pack_int4, lambda c: c.reshape(-1).clone())
    assert r.status == FAIL and "one byte per code" in r.message


def test_pack_added_not_shifted():
    r = run(ch05.check_pack_int4, lambda c: c.reshape(-1)[0::2] + c.reshape(-1)[1::2])
    assert r.status == FAIL and "added" in r.message


def test_pack_wrong_dtype():
    r = run(ch05.check_pack_int4, lambda c: pack_int4(c).to(torch.int64))
    assert r.status == FAIL and "uint8" in r.message
