"""Chapter 8 checkers: the reference passes, typical mistakes are caught (stubs: test_grading_scaffold.py)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from conftest import run

from moe_course.grading import ch08
from moe_course.grading.core import ERROR, FAIL, PASS


def lap(c, maximize=True):
    rows, cols = linear_sum_assignment(c.double().numpy(), maximize=maximize)
    return torch.as_tensor(cols[np.argsort(rows)])


# ---------------------------------------------------------------- Exercise 8.1
def match_neurons(ref_in, ref_out, w_in, w_out):
    return lap(ref_in.T @ w_in + ref_out @ w_out.T)


def test_match_reference_passes():
    assert run(ch08.check_match_neurons, match_neurons).status == PASS


def test_match_package_passes():
    from moe_course.compress.merging import match_neurons as ref

    assert run(ch08.check_match_neurons, ref).status == PASS


def test_match_minimise_caught():
    r = run(ch08.check_match_neurons, lambda a, b, c, d: lap(a.T @ c + b @ d.T, maximize=False))
    assert r.status == FAIL and "maximize" in r.message


def test_match_input_only_caught():
    r = run(ch08.check_match_neurons, lambda a, b, c, d: lap(a.T @ c))
    assert r.status == FAIL and "input weights only" in r.message


def test_match_inverse_and_identity_caught():
    r = run(ch08.check_match_neurons, lambda a, b, c, d: torch.argsort(match_neurons(a, b, c, d)))
    assert r.status == FAIL and "inverse" in r.message
    r = run(ch08.check_match_neurons, lambda a, b, c, d: torch.arange(a.shape[1]))
    assert r.status in (FAIL, ERROR)


# ---------------------------------------------------------------- Exercise 8.2
def merge(weights, freqs):
    f = freqs.to(weights.dtype)
    if f.sum() <= 0:
        f = torch.ones_like(f)
    return torch.tensordot(f / f.sum(), weights, dims=1)


def test_merge_reference_passes():
    assert run(ch08.check_frequency_weighted_merge, merge).status == PASS


def test_merge_package_passes():
    from moe_course.compress.merging import frequency_weighted_merge

    assert run(ch08.check_frequency_weighted_merge, frequency_weighted_merge).status == PASS


def test_merge_uniform_caught():
    r = run(ch08.check_frequency_weighted_merge, lambda w, f: w.mean(0))
    assert r.status == FAIL and "uniform" in r.message


def test_merge_unnormalised_caught():
    r = run(ch08.check_frequency_weighted_merge, lambda w, f: torch.tensordot(f, w, dims=1))
    assert r.status == FAIL and "normalised" in r.message


def test_merge_zero_frequencies_caught():
    r = run(ch08.check_frequency_weighted_merge, lambda w, f: torch.tensordot(f / f.sum(), w, dims=1))
    assert r.status in (FAIL, ERROR) and "0/0" in r.message


# ---------------------------------------------------------------- Exercise 8.3 (whole method)
def test_merge_model_both_ways():
    """Graded on the trained Shakespeare model: M-SMoE written by hand reaches the target; a weak
    attempt (plain averaging of the same groups) misses it with a hint that names it."""
    import mutants.ch08 as mut

    from moe_course.grading import ch08

    ok = run(ch08.check_merge_model, lambda model, calib, G: mut._merge_model(model, calib, G))
    assert ok.status == PASS, ok.message
    weak = run(ch08.check_merge_model, mut.merge_model_plain)
    assert weak.status == FAIL and "plain averaging" in weak.message, weak.message
