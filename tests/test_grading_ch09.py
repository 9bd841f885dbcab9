"""Chapter 9 checkers: the reference passes, typical mistakes are caught (stubs: test_grading_scaffold.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import run

from moe_course.grading import ch09
from moe_course.grading.core import ERROR, FAIL, PASS


# ---------------------------------------------------------------- Exercise 9.1
def residual_similarity(h, out):
    return F.cosine_similarity(h, h + out, dim=-1).mean().item()


def test_similarity_reference_passes():
    assert run(ch09.check_residual_similarity, residual_similarity).status == PASS


def test_similarity_package_passes():
    from moe_course.compress.trimming import residual_similarity as ref

    assert run(ch09.check_residual_similarity, ref).status == PASS


def test_similarity_mistakes_caught():
    no_residual = lambda h, out: F.cosine_similarity(h, out, dim=-1).mean().item()
    no_mean = lambda h, out: F.cosine_similarity(h, h + out, dim=-1)
    wrong_dim = lambda h, out: F.cosine_similarity(h, h + out, dim=0).mean().item()
    for fn, word in ((no_residual, "h + out"), (no_mean, "MEAN"), (wrong_dim, "dim=0")):
        r = run(ch09.check_residual_similarity, fn)
        assert r.status in (FAIL, ERROR)
        assert word in r.message


# ---------------------------------------------------------------- Exercise 9.2
def _cos(a, b):
    return F.cosine_similarity(a, b, dim=-1).mean().item()


def best_run(hidden, n):
    L = len(hidden) - 1
    sims = [_cos(hidden[b], hidden[b + n]) for b in range(L - n + 1)]
    return max(range(len(sims)), key=lambda b: sims[b])


def test_run_reference_passes():
    assert run(ch09.check_best_contiguous_run, best_run).status == PASS


def test_run_mistakes_caught():
    def lowest(hidden, n):
        L = len(hidden) - 1
        sims = [_cos(hidden[b], hidden[b + n]) for b in range(L - n + 1)]
        return min(range(len(sims)), key=lambda b: sims[b])

    def off_by_one(hidden, n):
        L = len(hidden) - 1
        sims = [_cos(hidden[b], hidden[b + n - 1]) for b in range(L - n + 2)]
        return max(range(len(sims)), key=lambda b: sims[b])

    for fn, word in ((lowest, "LOWEST"), (off_by_one, "off by one")):
        r = run(ch09.check_best_contiguous_run, fn)
        assert r.status in (FAIL, ERROR)
        assert word in r.message
