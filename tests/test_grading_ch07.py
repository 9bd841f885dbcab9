"""Chapter 7 checkers, tested both ways: the reference passes, typical mistakes fail with their hint
(the full mutant list is in tests/mutants/ch07.py; stubs: test_grading_scaffold.py)."""

from __future__ import annotations

import torch
from conftest import run

from moe_course.grading import ch07
from moe_course.grading.core import FAIL, PASS


# ---------------------------------------------------------------- Exercise 7.1
def shared(w, rank, center=True):
    base = w.mean(0)
    u, s, vh = torch.linalg.svd(w - base if center else w, full_matrices=False)
    root = s[:, :rank].sqrt()
    return base, u[:, :, :rank] * root[:, None, :], root[:, :, None] * vh[:, :rank, :]


def test_shared_reference_passes():
    assert run(ch07.check_shared_base_factors, shared).status == PASS


def test_shared_package_agrees_with_the_checker():
    """The package's SharedExperts stores the same base and products."""
    from moe_course.compress.lowrank import truncated_svd

    def via_package(w, rank):
        base = w.mean(0)
        if rank == 0:
            return base, w.new_zeros(w.shape[0], w.shape[1], 0), w.new_zeros(w.shape[0], 0, w.shape[2])
        left, right = truncated_svd(w - base, rank)
        return base, left, right

    assert run(ch07.check_shared_base_factors, via_package).status == PASS


def test_shared_not_centered():
    r = run(ch07.check_shared_base_factors, lambda w, k: shared(w, k, center=False))
    assert r.status == FAIL and "factored the experts themselves" in r.message


# ---------------------------------------------------------------- Exercise 7.2
def test_global_ranks_reference_on_the_hand_case():
    from moe_course.grading.ch07 import _global_ref

    # sigma^2 / 4: [4, 0.25] and [2.25, 1]; budget 12 buys three ranks: 4, 2.25, 1
    assert _global_ref([torch.tensor([4.0, 1.0]), torch.tensor([3.0, 2.0])], [(2, 2), (2, 2)], 12) == [1, 2]


def test_global_ranks_uniform_fails():
    r = run(ch07.check_global_ranks, lambda spectra, shapes, budget: [
        budget // sum(m + n for m, n in shapes)] * len(spectra))
    assert r.status == FAIL


# ---------------------------------------------------------------- Exercise 7.3 (both ways, on the zoo model)
def test_activation_aware_reference_passes_and_plain_svd_fails():
    from mutants.ch07 import _factors

    good = run(ch07.check_activation_aware_factors, lambda m, c: _factors(m, c))
    assert good.status == PASS, good.message
    weak = run(ch07.check_activation_aware_factors, lambda m, c: _factors(m, c, whiten=False))
    assert weak.status == FAIL and "outputs" in weak.message.lower()
