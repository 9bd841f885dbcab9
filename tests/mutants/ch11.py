"""Chapter 11: Pareto frontier, pipeline runner recording true sizes, picking a recipe."""

from __future__ import annotations

from moe_course import metrics

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
@M.right("check_run_pipeline")
def pipeline_collect_models(model, steps):
    """Keeps every intermediate model, sizes computed at the end."""
    models = [model]
    for step in steps:
        models.append(step(models[-1]))
    return models[-1], [metrics.size_report(m).bytes for m in models]


def _param_bytes(m):
    return sum(p.numel() * p.element_size() for p in m.parameters())


@M.wrong("check_run_pipeline", "buffers")
def pipeline_parameter_bytes(model, steps):
    """Bytes of the parameters only."""
    sizes = [_param_bytes(model)]
    for step in steps:
        model = step(model)
        sizes.append(_param_bytes(model))
    return model, sizes


@M.wrong("check_run_pipeline", "sizes")
def pipeline_size_before_step(model, steps):
    """Size recorded before each step (the last size is missing, the first repeated)."""
    sizes = [metrics.size_report(model).bytes]
    for step in steps:
        sizes.append(metrics.size_report(model).bytes)
        model = step(model)
    return model, sizes


@M.wrong("check_run_pipeline", "record")
def pipeline_no_input_size(model, steps):
    """Only the sizes after the steps."""
    sizes = []
    for step in steps:
        model = step(model)
        sizes.append(metrics.size_report(model).bytes)
    return model, sizes


@M.wrong("check_run_pipeline", "last step")
def pipeline_returns_input(model, steps):
    """Returns the input model."""
    sizes, m = [metrics.size_report(model).bytes], model
    for step in steps:
        m = step(m)
        sizes.append(metrics.size_report(m).bytes)
    return model, sizes


@M.wrong("check_run_pipeline", "each step is applied to")
def pipeline_steps_on_input(model, steps):
    """Every step applied to the INPUT model (the steps do not chain)."""
    sizes, out = [metrics.size_report(model).bytes], model
    for step in steps:
        out = step(model)
        sizes.append(metrics.size_report(out).bytes)
    return out, sizes


@M.wrong("check_run_pipeline", "parameter counts")
def pipeline_parameter_count(model, steps):
    """Counts parameters (numel), not bytes."""
    sizes = [metrics.size_report(model).total_params]
    for step in steps:
        model = step(model)
        sizes.append(metrics.size_report(model).total_params)
    return model, sizes


# ------------------------------------------------------------------ 11.3 pick_recipe
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
