"""Chapter 4 checkers: the reference passes, typical mistakes are caught (stubs: test_grading_scaffold.py)."""

from __future__ import annotations

import torch
from conftest import run

from moe_course.grading import ch04
from moe_course.grading.core import ERROR, FAIL, PASS


# ---------------------------------------------------------------- Exercise 4.1
def magnitude_mask(weight, sparsity):
    n = int(round(sparsity * weight.numel()))
    mask = torch.ones(weight.numel(), dtype=torch.bool)
    mask[weight.abs().reshape(-1).argsort()[:n]] = False
    return mask.view(weight.shape)


def test_mask_reference_passes():
    assert run(ch04.check_magnitude_mask, magnitude_mask).status == PASS


def test_mask_package_passes():
    from moe_course.compress.pruning import magnitude_mask as ref

    assert run(ch04.check_magnitude_mask, ref).status == PASS


def test_mask_signed_caught():
    def signed(w, s):
        n = int(round(s * w.numel()))
        m = torch.ones(w.numel(), dtype=torch.bool)
        m[w.reshape(-1).argsort()[:n]] = False
        return m.view(w.shape)

    r = run(ch04.check_magnitude_mask, signed)
    assert r.status == FAIL and "|w|" in r.message


def test_mask_inverted_caught():
    r = run(ch04.check_magnitude_mask, lambda w, s: ~magnitude_mask(w, s))
    assert r.status == FAIL and "inverted" in r.message


def test_mask_float_and_threshold_off_by_one_caught():
    r = run(ch04.check_magnitude_mask, lambda w, s: magnitude_mask(w, s).float())
    assert r.status == FAIL and "bool" in r.message

    def quantile(w, s):  # threshold at a quantile: counts are off by interpolation
        return w.abs() > torch.quantile(w.abs().reshape(-1), s)

    assert run(ch04.check_magnitude_mask, quantile).status in (FAIL, ERROR)


# ---------------------------------------------------------------- Exercise 4.2
def restrict_router(logits, kept, k):
    masked = torch.full_like(logits, float("-inf"))
    masked[:, kept] = logits[:, kept]
    w, i = torch.softmax(masked, -1).topk(k, -1)
    return w / w.sum(-1, keepdim=True), i


def test_router_reference_passes():
    assert run(ch04.check_restrict_router, restrict_router).status == PASS


def test_router_softmax_before_mask_caught():
    def wrong(logits, kept, k):
        p = torch.softmax(logits, -1)
        m = torch.zeros_like(p)
        m[:, kept] = 1
        return (p * m).topk(k, -1)

    r = run(ch04.check_restrict_router, wrong)
    assert r.status == FAIL and "-inf" in r.message


def test_router_local_ids_caught():
    def wrong(logits, kept, k):
        w, i = torch.softmax(logits[:, kept], -1).topk(k, -1)
        return w / w.sum(-1, keepdim=True), i

    r = run(ch04.check_restrict_router, wrong)
    assert r.status == FAIL and "ORIGINAL" in r.message


def test_router_no_renorm_and_crash_caught():
    def no_renorm(logits, kept, k):
        masked = torch.full_like(logits, float("-inf"))
        masked[:, kept] = logits[:, kept]
        return torch.softmax(masked, -1).topk(k, -1)

    r = run(ch04.check_restrict_router, no_renorm)
    assert r.status == FAIL and "renormalised" in r.message
    assert run(ch04.check_restrict_router, lambda logits, kept, k: logits.topk(k)[5]).status == ERROR
