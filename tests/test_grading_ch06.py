"""Chapter 6 checkers: the reference passes, typical mistakes are caught (stubs: test_grading_scaffold.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import run

from moe_course.compress.distillation import gain_preserved, kd_loss
from moe_course.grading import ch06
from moe_course.grading.core import ERROR, FAIL, PASS


def my_kd(s, t, y, T=2.0, a=0.5, t2=True, reverse=False, student_softmax=False, batchmean=True):
    v = s.shape[-1]
    s, t = s.reshape(-1, v), t.reshape(-1, v)
    ls, lt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    if student_softmax:
        kl = F.kl_div(ls.exp(), lt.exp(), reduction="batchmean")
    elif reverse:
        kl = F.kl_div(lt, ls, reduction="batchmean", log_target=True)
    else:
        kl = F.kl_div(ls, lt, reduction="batchmean" if batchmean else "sum", log_target=True)
    soft = kl * (T * T if t2 else 1.0)
    return a * soft + (1 - a) * F.cross_entropy(s, y.reshape(-1))


def test_kd_reference_passes():
    assert run(ch06.check_kd_loss, my_kd).status == PASS


def test_kd_package_passes():
    assert run(ch06.check_kd_loss, kd_loss).status == PASS


def test_kd_forgot_t2():
    r = run(ch06.check_kd_loss, lambda *a: my_kd(*a, t2=False))
    assert r.status == FAIL and "T**2" in r.message


def test_kd_reversed():
    r = run(ch06.check_kd_loss, lambda *a: my_kd(*a, reverse=True))
    assert r.status == FAIL and "reversed" in r.message


def test_kd_softmax_student():
    r = run(ch06.check_kd_loss, lambda *a: my_kd(*a, student_softmax=True))
    assert r.status == FAIL and "log_softmax" in r.message


def test_kd_sum_reduction():
    r = run(ch06.check_kd_loss, lambda *a: my_kd(*a, batchmean=False))
    assert r.status == FAIL and "average" in r.message


def test_kd_detached():
    r = run(ch06.check_kd_loss, lambda *a: my_kd(*a).detach())
    assert r.status in (FAIL, ERROR)


def gp(s, b, t):
    if t == b:
        raise ValueError("no gain")
    return (s - b) / (t - b)


def test_gain_reference_passes():
    assert run(ch06.check_gain_preserved, gp).status == PASS
    assert run(ch06.check_gain_preserved, gain_preserved).status == PASS


def test_gain_percentage():
    r = run(ch06.check_gain_preserved, lambda s, b, t: 100 * gp(s, b, t))
    assert r.status == FAIL and "percentage" in r.message


def test_gain_lost():
    r = run(ch06.check_gain_preserved, lambda s, b, t: gp(t - s + b, b, t))
    assert r.status == FAIL and "LOST" in r.message


def test_gain_zero_division():
    r = run(ch06.check_gain_preserved, lambda s, b, t: (s - b) / (t - b))
    assert r.status == FAIL and "ValueError" in r.message
