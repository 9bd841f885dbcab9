"""Exercise 2.4 (expert capacity, C = ceil(cf * T * k / N)): the solution passes and the usual
rounding mistakes are rejected with a hint that names them (the stub: test_grading_scaffold.py)."""

from __future__ import annotations

import math

import pytest

from moe_course.grading import ch02
from moe_course.grading.core import FAIL, PASS
from moe_course.layers import SparseMoE


def expert_capacity(num_tokens, num_experts, k, capacity_factor):
    return math.ceil(capacity_factor * num_tokens * k / num_experts)


def test_solution_passes():
    assert ch02.check_expert_capacity(expert_capacity, quiet=True).status == PASS


def test_calling_the_package_is_reported():
    """The notebook forbids the package's own SparseMoE.capacity: the check runs without it and says so."""
    def via_layer(num_tokens, num_experts, k, capacity_factor):
        return SparseMoE(4, num_experts, 4, k=k, capacity_factor=capacity_factor).capacity(num_tokens)

    result = ch02.check_expert_capacity(via_layer, quiet=True)
    assert result.status == FAIL and "package's own" in result.message, result.message
    assert SparseMoE(4, 8, 4, k=2, capacity_factor=1.0).capacity(64) == 16  # restored after the check


@pytest.mark.parametrize("wrong, words", [
    (lambda t, n, k, cf: math.floor(cf * t * k / n), "rounded DOWN"),
    (lambda t, n, k, cf: round(cf * t * k / n), "NEAREST integer"),
    (lambda t, n, k, cf: math.floor(cf * t * k / n + 0.5), "nearest integer"),
    (lambda t, n, k, cf: math.ceil(cf * t / n), "k is missing"),
    (lambda t, n, k, cf: int(cf * t * k) // n, "rounded DOWN"),
    (lambda t, n, k, cf: int(cf * t * k / n) + 1, "exactly a whole number"),
    (lambda t, n, k, cf: math.ceil(t * k / n), "capacity_factor is missing"),
    (lambda t, n, k, cf: k * math.ceil(cf * t / n), "round up once"),
    (lambda t, n, k, cf: cf * t * k / n, "math.ceil"),
    (lambda t, n, k, cf: float(math.ceil(cf * t * k / n)), "Python int"),
], ids=["floor", "round", "round-half-up", "missing-k", "integer-division", "int-plus-one", "missing-cf",
        "ceil-before-k", "no-rounding", "float"])
def test_mistakes_are_rejected_with_a_hint(wrong, words):
    result = ch02.check_expert_capacity(wrong, quiet=True)
    assert result.status == FAIL
    assert words in result.message, result.message


def test_crash_is_an_error_not_an_exception():
    result = ch02.check_expert_capacity(lambda t, n, k, cf: t / 0, quiet=True)
    assert result.status == "error" and "ZeroDivisionError" in result.message
