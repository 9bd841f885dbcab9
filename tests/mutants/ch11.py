"""Chapter 11: the Pareto sweep, picking a recipe (then on the real table), and a whole compression
method for the MNIST-1D classifier (8x smaller, at most 1 point lost)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_course import metrics
from moe_course.compress.quantization import quantize, quantize_rest
from moe_course.compress.trimming import drop_layers

from . import Chapter

M = Chapter("ch11")


# ------------------------------------------------------------------ 11.1 pareto_frontier
def _dominates(a, b, x, y, sign):
    return (a[x] <= b[x] and sign * a[y] <= sign * b[y]) and (a[x] < b[x] or sign * a[y] < sign * b[y])


@M.right("check_pareto_frontier")
def pareto_quadratic(points, x, y, higher_is_better):
    """O(n^2): keep the points no other point dominates."""
    sign = -1.0 if higher_is_better else 1.0
    return [p for p in points if not any(_dominates(q, p, x, y, sign) for q in points)]


@M.wrong("check_pareto_frontier", "wrong direction")
def pareto_ignores_direction(points, x, y, higher_is_better):
    """Always lower-is-better quality."""
    return [p for p in points if not any(_dominates(q, p, x, y, 1.0) for q in points)]


@M.wrong("check_pareto_frontier", "equal cost")
def pareto_strict_cost_only(points, x, y, higher_is_better):
    """Dominance needs a strictly lower cost: a worse point at the same cost survives."""
    sign = -1.0 if higher_is_better else 1.0
    return [p for p in points if not any(q[x] < p[x] and sign * q[y] <= sign * p[y] for q in points)]


@M.wrong("check_pareto_frontier", "duplicates")
def pareto_weak_dominance(points, x, y, higher_is_better):
    """'At least as good on both axes' taken as dominance: identical points remove each other."""
    sign = -1.0 if higher_is_better else 1.0
    return [p for p in points
            if not any(q is not p and q[x] <= p[x] and sign * q[y] <= sign * p[y] for q in points)]


@M.wrong("check_pareto_frontier", "dominated")
def pareto_sweep_keeps_equal_quality(points, x, y, higher_is_better):
    """Sweep that keeps a point whose quality only EQUALS the best seen at a lower cost."""
    sign = -1.0 if higher_is_better else 1.0
    order = sorted(points, key=lambda p: (p[x], sign * p[y]))
    front, best = [], float("inf")
    for p in order:
        if sign * p[y] <= best:
            front.append(p)
            best = sign * p[y]
    return front


@M.wrong("check_pareto_frontier", "duplicates")
def pareto_sweep_one_per_cost(points, x, y, higher_is_better):
    """A sweep that keeps one point per cost (drops ties at equal cost and equal quality) and compares with <."""
    sign = -1.0 if higher_is_better else 1.0
    order = sorted(points, key=lambda p: (p[x], sign * p[y]))
    front, best, last_cost = [], float("inf"), None
    for p in order:
        if p[x] != last_cost and sign * p[y] < best:
            front.append(p)
            best = sign * p[y]
        last_cost = p[x]
    return front


@M.wrong("check_pareto_frontier", "points themselves")
def pareto_returns_indices(points, x, y, higher_is_better):
    """Indices of the frontier points."""
    sign = -1.0 if higher_is_better else 1.0
    return [i for i, p in enumerate(points) if not any(_dominates(q, p, x, y, sign) for q in points)]


# ------------------------------------------------------------------ 11.2 run_pipeline
def _loss(r, q0):
    return 100 * ((q0 - r["quality"]) if r["higher_is_better"] else (r["quality"] - q0)) / q0


@M.right("check_pick_recipe")
def pick_by_sorting(rows, max_loss_pct):
    """Sort by (ratio desc, loss asc) and take the first that fits."""
    q0 = rows[0]["quality"]
    ranked = sorted(rows, key=lambda r: (-r["ratio"], _loss(r, q0)))
    return next((r for r in ranked if _loss(r, q0) <= max_loss_pct), None)


@M.wrong("check_pick_recipe", "direction")
def pick_wrong_direction(rows, max_loss_pct):
    """Loss computed as if higher were always better."""
    q0 = rows[0]["quality"]
    ok = [r for r in rows if 100 * (q0 - r["quality"]) / q0 <= max_loss_pct]
    return max(ok, key=lambda r: r["ratio"]) if ok else None


@M.wrong("check_pick_recipe", "ignored the quality budget")
def pick_ignores_budget(rows, max_loss_pct):
    """The largest ratio, whatever its quality."""
    return max(rows, key=lambda r: r["ratio"])


@M.wrong("check_pick_recipe", "relative")
def pick_absolute_loss(rows, max_loss_pct):
    """Loss in quality units, not percent of the baseline."""
    q0 = rows[0]["quality"]
    ok = [r for r in rows if ((q0 - r["quality"]) if r["higher_is_better"] else (r["quality"] - q0)) <= max_loss_pct]
    return max(ok, key=lambda r: (r["ratio"], -_loss(r, q0))) if ok else None


@M.wrong("check_pick_recipe", "at most")
def pick_strict_budget(rows, max_loss_pct):
    """loss < budget (a loss exactly at the budget is rejected)."""
    q0 = rows[0]["quality"]
    ok = [r for r in rows if _loss(r, q0) < max_loss_pct]
    return max(ok, key=lambda r: (r["ratio"], -_loss(r, q0))) if ok else None


@M.wrong("check_pick_recipe", "equal ratios")
def pick_no_tie_break(rows, max_loss_pct):
    """The first of equal ratios, not the better quality."""
    q0 = rows[0]["quality"]
    ok = [r for r in rows if _loss(r, q0) <= max_loss_pct]
    return max(ok, key=lambda r: r["ratio"]) if ok else None


@M.wrong("check_pick_recipe", "baseline")
def pick_skips_baseline(rows, max_loss_pct):
    """Only compressed rows (rows[1:]) are candidates."""
    q0 = rows[0]["quality"]
    ok = [r for r in rows[1:] if _loss(r, q0) <= max_loss_pct]
    return max(ok, key=lambda r: (r["ratio"], -_loss(r, q0))) if ok else None


@M.wrong("check_pick_recipe", "percent")
def pick_fraction_not_percent(rows, max_loss_pct):
    """Loss as a fraction (0.05), compared with a budget in percent (5)."""
    q0 = rows[0]["quality"]
    ok = [r for r in rows if _loss(r, q0) / 100 <= max_loss_pct]
    return max(ok, key=lambda r: (r["ratio"], -_loss(r, q0))) if ok else None


@M.wrong("check_pick_recipe", "modified")
def pick_sorts_rows_in_place(rows, max_loss_pct):
    """Sorts `rows` in place (the caller's table loses its order)."""
    q0 = rows[0]["quality"]
    rows.sort(key=lambda r: (-r["ratio"], _loss(r, q0)))
    return next((r for r in rows if _loss(r, q0) <= max_loss_pct), None)



# ------------------------------------------------------------------ 11.3 compress_classifier
class _Codes8(nn.Module):
    """An 8-bit Conv1d (uint8 codes, one fp32 scale per tensor, symmetric) for the alternative."""

    def __init__(self, conv):
        super().__init__()
        w = conv.weight.detach()
        scale = w.abs().max().clamp(min=1e-8) / 127
        self.register_buffer("codes", (torch.round(w / scale) + 128).clamp(0, 255).to(torch.uint8))
        self.register_buffer("scale", scale.reshape(1))
        self.bias = conv.bias
        self.conv = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)

    def forward(self, x):
        w = (self.codes.float() - 128) * self.scale
        return F.conv1d(x, w, self.bias, **self.conv)


def _swap_convs(model, make):
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv1d):
                setattr(parent, name, make(child))
    return model


@M.right("check_compress_classifier")
def compress_g64_symmetric_convs(model, calib):
    """2-bit experts in groups of 64, 4-bit rest, convolutions as symmetric per-tensor int8."""
    out = quantize_rest(quantize(model, 2, group_size=64), 4, group_size=32, embedding_bits=8)
    return _swap_convs(out, _Codes8)


@M.wrong("check_compress_classifier", "experts")
def compress_nothing_but_a_copy(model, calib):
    """Returns an fp32 copy: nothing compressed."""
    return copy.deepcopy(model)


@M.wrong("check_compress_classifier", "convolutions", "integer codes")
def compress_package_steps_only(model, calib):
    """2-bit experts and 8-bit rest: the best package-only recipe, 7.3x."""
    return quantize_rest(quantize(model, 2, group_size=32), 8, group_size=32)


@M.wrong("check_compress_classifier", "convolutions", "fake quantization")
def compress_fake_quantized_convs(model, calib):
    """Convolution weights rounded to 8-bit levels but kept as float32 (no bytes saved)."""
    out = quantize_rest(quantize(model, 2, group_size=32), 8, group_size=32)
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, nn.Conv1d):
                s = m.weight.abs().max() / 127
                m.weight.copy_(torch.round(m.weight / s) * s)
    return out


@M.wrong("check_compress_classifier", "modified the input model")
def compress_in_place(model, calib):
    """Swaps the convolutions of the INPUT model (then quantizes a copy of it)."""
    _swap_convs(model, _Codes8)
    return quantize_rest(quantize(model, 2, group_size=32), 8, group_size=32)


@M.wrong("check_compress_classifier", "points lost", "too aggressive")
def compress_drop_a_layer(model, calib):
    """Drops one of the three MoE layers on top of the working recipe."""
    out = quantize_rest(quantize(drop_layers(model, keep=2, calib=calib), 2, group_size=32), 8,
                        group_size=32)
    return _swap_convs(out, _Codes8)


@M.wrong("check_compress_classifier", "package's own", "pipeline")
def compress_with_the_package_pipeline(model, calib):
    """Calls the package's pipeline (the exercise forbids it)."""
    from moe_course.compress import recipes
    res = recipes.pipeline(model, [("quantize", {"bits": 2, "group_size": 32}),
                                   ("quantize_rest", {"bits": 8, "group_size": 32})], calib=calib)
    return _swap_convs(res.model, _Codes8)


@M.wrong("check_compress_classifier", "nn.Module")
def compress_returns_bytes(model, calib):
    """Returns the size instead of the model."""
    out = _swap_convs(quantize_rest(quantize(model, 2, group_size=32), 8, group_size=32), _Codes8)
    return metrics.size_report(out).bytes
