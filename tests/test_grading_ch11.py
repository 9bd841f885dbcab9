"""Chapter 11 checkers: the reference passes, typical mistakes are caught, the whole-method exercise is
graded both ways on the zoo model (stubs: test_grading_scaffold.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import run

import torch.nn as nn
import torch.nn.functional as F

from moe_course import metrics
from moe_course.compress.quantization import quantize, quantize_rest
from moe_course.compress.recipes import pareto_frontier as package_pareto
from moe_course.grading import ch11
from moe_course.grading.core import ERROR, FAIL, PASS


# ---------------------------------------------------------------- Exercise 11.1
def pareto_frontier(points, x, y, higher_is_better):
    sign = -1.0 if higher_is_better else 1.0
    order = sorted(points, key=lambda p: (p[x], sign * p[y]))
    front, best, i = [], float("inf"), 0
    while i < len(order):
        j = i
        while j < len(order) and order[j][x] == order[i][x]:
            j += 1
        top = sign * order[i][y]
        if top < best:
            front += [p for p in order[i:j] if sign * p[y] == top]
            best = top
        i = j
    return front


def pareto_ignores_direction(points, x, y, higher_is_better):
    return pareto_frontier(points, x, y, False)


def pareto_bad_ties(points, x, y, higher_is_better):
    # keeps every point whose quality beats all points with cost <= its own, EXCLUDING itself only by identity,
    # but compares costs with < only: a worse point at an equal cost survives
    sign = -1.0 if higher_is_better else 1.0
    return [p for p in points if not any(q[x] < p[x] and sign * q[y] <= sign * p[y] for q in points)]


def pareto_drops_duplicates(points, x, y, higher_is_better):
    seen, out = set(), []
    for p in pareto_frontier(points, x, y, higher_is_better):
        if (p[x], p[y]) not in seen:
            seen.add((p[x], p[y]))
            out.append(p)
    return out


def test_pareto_reference_passes():
    assert run(ch11.check_pareto_frontier, pareto_frontier).status == PASS


def test_pareto_package_passes():
    assert run(ch11.check_pareto_frontier, package_pareto).status == PASS


def test_pareto_wrong_direction_caught():
    r = run(ch11.check_pareto_frontier, pareto_ignores_direction)
    assert r.status == FAIL and "direction" in r.message


def test_pareto_ties_caught():
    r = run(ch11.check_pareto_frontier, pareto_bad_ties)
    assert r.status == FAIL and "dominated" in r.message


def test_pareto_duplicates_caught():
    r = run(ch11.check_pareto_frontier, pareto_drops_duplicates)
    assert r.status == FAIL and "duplicates" in r.message


def test_pareto_indices_caught():
    r = run(ch11.check_pareto_frontier, lambda pts, x, y, h: list(range(len(pareto_frontier(pts, x, y, h)))))
    assert r.status == FAIL and "dicts" in r.message


# ---------------------------------------------------------------- Exercise 11.2 (use it)
def pick_recipe(rows, max_loss_pct):
    q0 = rows[0]["quality"]

    def loss(r):
        return 100 * ((q0 - r["quality"]) if r["higher_is_better"] else (r["quality"] - q0)) / q0

    ok = [r for r in rows if loss(r) <= max_loss_pct]
    return max(ok, key=lambda r: (r["ratio"], -loss(r))) if ok else None


def pick_ignores_direction(rows, max_loss_pct):
    q0 = rows[0]["quality"]
    ok = [r for r in rows if 100 * (r["quality"] - q0) / q0 <= max_loss_pct]
    return max(ok, key=lambda r: r["ratio"]) if ok else None


def pick_ignores_budget(rows, max_loss_pct):
    return max(rows, key=lambda r: r["ratio"])


def pick_absolute(rows, max_loss_pct):
    q0 = rows[0]["quality"]
    ok = [r for r in rows if 100 * abs(r["quality"] - q0) <= max_loss_pct or
          (r["quality"] - q0 > 0) == r["higher_is_better"]]
    return max(ok, key=lambda r: r["ratio"]) if ok else None


def pick_first_fitting(rows, max_loss_pct):
    # the first row of the table within budget (the baseline!), not the most compressed one
    q0 = rows[0]["quality"]
    for r in rows:
        if 100 * ((q0 - r["quality"]) if r["higher_is_better"] else (r["quality"] - q0)) / q0 <= max_loss_pct:
            return r
    return None


def test_pick_reference_passes():
    assert run(ch11.check_pick_recipe, pick_recipe).status == PASS
    assert run(ch11.check_pick_recipe, ch11.pick_recipe_reference).status == PASS


@pytest.mark.parametrize("wrong, word", [
    (pick_ignores_direction, "direction"),
    (pick_ignores_budget, "budget"),
    (pick_absolute, "budget"),
    (pick_first_fitting, "larger ratio"),
])
def test_pick_mistakes_caught(wrong, word):
    r = run(ch11.check_pick_recipe, wrong)
    assert r.status in (FAIL, ERROR) and word in r.message


def test_pick_does_not_need_mutable_input():
    rows = [{"ratio": 1.0, "quality": 1.0, "higher_is_better": True, "technique": "b"}]
    assert pick_recipe(copy.deepcopy(rows), 0.0)["technique"] == "b"



def test_pareto_calling_the_package_is_caught():
    r = run(ch11.check_pareto_frontier, lambda points, x, y, hib: package_pareto(points, x, y, hib))
    assert r.status == FAIL and "package's own" in r.message


def test_pick_runs_on_the_real_table(capsys):
    """The use-it part: the learner's picks on the real quick table of mnist1d-moe are printed."""
    assert run(ch11.check_pick_recipe, pick_recipe).status == PASS
    rows = ch11.real_rows()
    assert rows[0]["technique"] == "baseline (fp32)" and rows[0]["higher_is_better"] and len(rows) == 8
    real = {r["technique"] for r in rows}
    wrong_on_real = lambda rows, b: rows[0] if real <= {r["technique"] for r in rows} else pick_recipe(rows, b)  # noqa: E731
    r = run(ch11.check_pick_recipe, wrong_on_real)
    assert r.status == FAIL and "real mnist1d-moe table" in r.message


# ---------------------------------------------------------------- Exercise 11.3 (a whole method)
class Int8Conv1d(nn.Module):
    def __init__(self, conv):
        super().__init__()
        w = conv.weight.detach()
        flat = w.reshape(w.shape[0], -1)
        scale = (flat.abs().max(1).values / 127).clamp(min=1e-8)
        self.register_buffer("codes", (torch.round(flat / scale[:, None]) + 128).clamp(0, 255)
                             .to(torch.uint8).reshape(w.shape))
        self.register_buffer("scale", scale.half())
        self.bias, self.conv = conv.bias, dict(stride=conv.stride, padding=conv.padding, groups=conv.groups)

    def forward(self, x):
        return F.conv1d(x, (self.codes.float() - 128) * self.scale.float()[:, None, None], self.bias,
                        **self.conv)


def compress_classifier(model, calib):
    out = quantize_rest(quantize(model, 2, group_size=32), 8, group_size=32)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv1d):
                setattr(parent, name, Int8Conv1d(child))
    return out


def test_compress_reference_passes_the_target(capsys):
    r = ch11.check_compress_classifier(compress_classifier)  # not quiet: it prints its summary
    assert r.status == PASS, r.message
    out = capsys.readouterr().out
    assert "x smaller" in out and "accuracy" in out


def test_compress_weak_attempts_fail():
    """Both ways: the best package-only recipe (7.3x) and a 4-bit quantization miss the target."""
    r = run(ch11.check_compress_classifier, lambda m, c: quantize_rest(quantize(m, 2, group_size=32), 8,
                                                                        group_size=32))
    assert r.status == FAIL and "convolutions" in r.message
    r = run(ch11.check_compress_classifier, lambda m, c: quantize(m, 4, group_size=32))
    assert r.status == FAIL and "smaller" in r.message
