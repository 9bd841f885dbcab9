"""Chapter 6 checkers, tested both ways: the reference passes, typical mistakes fail with their hint
(the full mutant list is in tests/mutants/ch06.py; stubs: test_grading_scaffold.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import run

from moe_course.grading import ch06
from moe_course.grading.core import FAIL, PASS


def topk_kd(s, z, y, k, tau=2.0, alpha=0.5, renorm_teacher=True):
    v = s.shape[-1]
    s, z = s.reshape(-1, v), z.reshape(-1, v)
    top, idx = z.topk(k, -1)
    log_p = F.log_softmax(top / tau, -1) if renorm_teacher else F.log_softmax(z / tau, -1).gather(-1, idx)
    log_q = F.log_softmax(s / tau, -1).gather(-1, idx)
    soft = (log_p.exp() * (log_p - log_q)).sum(-1).mean() * tau ** 2
    return alpha * soft + (1 - alpha) * F.cross_entropy(s, y.reshape(-1))


# ---------------------------------------------------------------- Exercise 6.1
def test_topk_reference_passes():
    assert run(ch06.check_topk_kd_loss, topk_kd).status == PASS


def test_topk_equals_the_package_loss_at_k_equal_v():
    from moe_course.compress.distillation import kd_loss

    g = torch.Generator().manual_seed(0)
    s, z, y = torch.randn(3, 4, 9, generator=g), torch.randn(3, 4, 9, generator=g), torch.randint(0, 9, (3, 4))
    assert torch.allclose(topk_kd(s, z, y, 9, 3.0, 0.4), kd_loss(s, z, y, 3.0, 0.4), atol=1e-6)


def test_topk_teacher_not_renormalised():
    r = run(ch06.check_topk_kd_loss, lambda *a: topk_kd(*a, renorm_teacher=False))
    assert r.status == FAIL and "renormalise the teacher" in r.message


def test_topk_package_forbidden():
    from moe_course.compress import distillation as D  # looked up at call time, as a student's code does

    r = run(ch06.check_topk_kd_loss, lambda s, z, y, k, tau, a: D.kd_loss(s, z, y, tau, a))
    assert r.status == FAIL and "package's own" in r.message


# ---------------------------------------------------------------- Exercise 6.2 (zoo model)
def losses(teacher, student, ids, ks, tau, alpha=1.0):
    with torch.no_grad():
        z, s = teacher.eval()(ids[:, :-1]), student.eval()(ids[:, :-1])
    return [float(topk_kd(s, z, ids[:, 1:], k, tau, alpha)) for k in ks]


def test_zoo_losses_both_ways():
    assert run(ch06.check_soft_loss_by_k, losses).status == PASS
    r = run(ch06.check_soft_loss_by_k, lambda t, s, i, ks, tau: losses(t, s, i, ks, tau, alpha=0.5))
    assert r.status == FAIL and "alpha=1.0" in r.message


# ---------------------------------------------------------------- Exercise 6.3 (whole method, both ways)
@pytest.mark.slow
def test_heal_both_ways():
    from mutants.ch06 import _heal

    good = run(ch06.check_heal_lowrank, lambda s, t, d: _heal(s, t, d, steps=60))
    assert good.status == PASS, good.message
    weak = run(ch06.check_heal_lowrank, lambda s, t, d: _heal(s, t, d, steps=5))
    assert weak.status == FAIL and "train longer" in weak.message
