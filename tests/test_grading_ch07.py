"""Chapter 7 checkers: the reference passes, typical mistakes are caught (stubs: test_grading_scaffold.py)."""

from __future__ import annotations

import torch
from conftest import run

from moe_course.grading import ch07
from moe_course.grading.core import ERROR, FAIL, PASS


# ---------------------------------------------------------------- Exercise 7.1
def svd_factors(w, rank, split=True, smallest=False, transpose=False):
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    sl = slice(-rank, None) if smallest else slice(0, rank)
    u, s, vh = u[:, sl], s[sl], vh[sl]
    if transpose:
        vh = torch.linalg.svd(w, full_matrices=False)[2].T[sl]
    if split:
        return u * s.sqrt(), s.sqrt()[:, None] * vh
    return u * s, vh


def test_svd_reference_passes():
    assert run(ch07.check_svd_factors, svd_factors).status == PASS


def test_svd_package_passes():
    from moe_course.compress.lowrank import truncated_svd

    assert run(ch07.check_svd_factors, truncated_svd).status == PASS


def test_svd_not_split():
    r = run(ch07.check_svd_factors, lambda w, k: svd_factors(w, k, split=False))
    assert r.status == FAIL and "split" in r.message


def test_svd_smallest():
    r = run(ch07.check_svd_factors, lambda w, k: svd_factors(w, k, smallest=True))
    assert r.status == FAIL and "SMALLEST" in r.message


def test_svd_wrong_transpose():
    r = run(ch07.check_svd_factors, lambda w, k: svd_factors(w, k, transpose=True))
    assert r.status == FAIL and "transpose" in r.message


def test_svd_wrong_return():
    assert run(ch07.check_svd_factors, lambda w, k: w).status in (FAIL, ERROR)


# ---------------------------------------------------------------- Exercise 7.2
def rank_for_energy(s, energy, squared=True, offset=0):
    e = s.double() ** 2 if squared else s.double()
    frac = e.cumsum(0) / e.sum()
    return min(int((frac < energy - 1e-9).sum()) + 1, s.numel()) + offset


def test_energy_reference_passes():
    assert run(ch07.check_rank_for_energy, rank_for_energy).status == PASS


def test_energy_package_passes():
    from moe_course.compress.lowrank import rank_for_energy as ref

    assert run(ch07.check_rank_for_energy, ref).status == PASS


def test_energy_on_sigma():
    r = run(ch07.check_rank_for_energy, lambda s, e: rank_for_energy(s, e, squared=False))
    assert r.status == FAIL and "SQUARED" in r.message


def test_energy_off_by_one():
    r = run(ch07.check_rank_for_energy, lambda s, e: rank_for_energy(s, e, offset=-1))
    assert r.status == FAIL and "off by one" in r.message


def test_energy_wrong_type():
    assert run(ch07.check_rank_for_energy, lambda s, e: "two").status in (FAIL, ERROR)
