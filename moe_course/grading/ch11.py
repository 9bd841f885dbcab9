"""Checkers for chapter 11, recipes and trade-offs: the Pareto sweep (11.1), picking a recipe for a
quality budget, then on the real compression table of the MNIST-1D zoo model (11.2, use it), and a
whole compression method of the learner's own, graded on a numeric target on that zoo model (11.3:
at least 8x smaller in true bytes, at most 1 accuracy point lost, without the package's pipeline).

Each checker compares the student's function with the package's reference
(:func:`moe_course.compress.recipes.pareto_frontier`, :func:`pick_recipe_reference`) on fixed,
random and edge cases, and names the usual mistakes.
"""

from __future__ import annotations

import copy
import random

import torch

# Loaded before any check forbids a package function: a module first imported while a function is
# swapped for its stub would keep the stub (course_table imports recipes.pipeline).
from moe_course import course_table  # noqa: F401
from moe_course.compress.recipes import pareto_frontier

from .core import CheckFailed, checker, expect

__all__ = ["check_pareto_frontier", "check_pick_recipe", "check_compress_classifier", "quality_loss",
           "pick_recipe_reference", "real_rows", "classifier_setup", "TARGET_RATIO", "MAX_POINTS_LOST"]


# --------------------------------------------------------------------------------------------
# Exercise 11.1: the Pareto frontier
# --------------------------------------------------------------------------------------------
def _ids(points) -> list:
    return sorted(p["id"] for p in points)


def _point_sets():
    fixed = [
        ([{"id": 0, "c": 1, "q": 5.0}, {"id": 1, "c": 2, "q": 4.0}, {"id": 2, "c": 3, "q": 4.5}, {"id": 3, "c": 4, "q": 1.0}],
         "a simple staircase"),
        ([{"id": 0, "c": 2, "q": 3.0}, {"id": 1, "c": 2, "q": 2.0}, {"id": 2, "c": 1, "q": 4.0}], "two points with the same cost"),
        ([{"id": 0, "c": 1, "q": 1.0}, {"id": 1, "c": 1, "q": 1.0}, {"id": 2, "c": 3, "q": 0.5}], "exact duplicates"),
        ([{"id": 0, "c": 5, "q": 2.0}], "a single point"),
    ]
    rnd = random.Random(11)
    for n in (5, 12, 30, 30):
        pts = [{"id": i, "c": rnd.randint(0, 6), "q": rnd.randint(0, 6) / 2} for i in range(n)]
        fixed.append((pts, f"{n} random points with ties"))
    return fixed


@checker("Exercise 11.1: the Pareto frontier", forbid=("moe_course.compress.recipes.pareto_frontier",))
def check_pareto_frontier(pareto_fn) -> None:
    for pts, desc in _point_sets():
        for hib in (False, True):
            got = pareto_fn(copy.deepcopy(pts), "c", "q", hib)
            expect(isinstance(got, (list, tuple)), f"return a list of points, got {type(got).__name__}")
            expect(all(isinstance(p, dict) and "id" in p for p in got),
                   "return the points themselves (the dicts), not their indices or coordinates")
            ref = pareto_frontier(pts, "c", "q", hib)
            if _ids(got) == _ids(ref):
                continue
            where = f"({desc}, higher_is_better={hib})"
            if _ids(got) == _ids(pareto_frontier(pts, "c", "q", not hib)):
                raise CheckFailed(f"you used the wrong direction for the quality axis: with higher_is_better={hib} "
                                  f"a {'larger' if hib else 'smaller'} q is better {where}")
            if set(_ids(got)) < set(_ids(ref)) and {(p["c"], p["q"]) for p in got} == {(p["c"], p["q"]) for p in ref}:
                raise CheckFailed(f"exact duplicates do not dominate each other: keep both copies {where}")
            extra = [p for p in got if p["id"] not in _ids(ref)]
            if extra:
                p = extra[0]
                raise CheckFailed(f"point {p} is dominated (another point is at least as good on both axes and "
                                  f"strictly better on one): check points with EQUAL cost or equal quality {where}")
            raise CheckFailed(f"you left out non-dominated point(s) {[p for p in ref if p['id'] not in _ids(got)]} {where}")


# --------------------------------------------------------------------------------------------
# Exercise 11.2 (use it): pick a recipe for a quality budget, then on the real table
# --------------------------------------------------------------------------------------------
def quality_loss(row, baseline) -> float:
    """Quality lost against ``baseline`` in percent of the baseline's quality (positive = worse)."""
    q, q0 = float(row["quality"]), float(baseline["quality"])
    return 100.0 * ((q0 - q) if row["higher_is_better"] else (q - q0)) / q0


def pick_recipe_reference(rows, max_loss_pct):
    """The row with the largest ``ratio`` whose :func:`quality_loss` against ``rows[0]`` is at most
    ``max_loss_pct`` (ties: the better quality); ``None`` if none qualifies."""
    base = rows[0]
    ok = [r for r in rows if quality_loss(r, base) <= max_loss_pct]
    if not ok:
        return None
    return max(ok, key=lambda r: (r["ratio"], -quality_loss(r, base)))


def _tables():
    def row(t, ratio, q, hib):
        return {"technique": t, "ratio": ratio, "bytes": int(1000 / ratio), "quality": q,
                "metric": "accuracy" if hib else "perplexity", "higher_is_better": hib}

    lm = [row("baseline", 1.0, 7.0, False), row("q4", 3.0, 7.05, False), row("q3+rest", 7.5, 7.1, False),
          row("trim+q", 9.2, 7.3, False), row("q2", 9.5, 7.8, False), row("merge", 1.3, 11.0, False)]
    cls = [row("baseline", 1.0, 0.90, True), row("q4", 5.0, 0.90, True), row("q2", 7.2, 0.88, True),
           row("trim+q", 7.8, 0.75, True), row("tie", 5.0, 0.905, True)]
    out = [(lm, 5.0), (lm, 0.5), (lm, 20.0), (lm, 0.0), (cls, 1.0), (cls, 3.0), (cls, 30.0)]
    # Losses exactly at the budget (exact in binary: 12.5%) qualify, "at most"; a negative budget (a required
    # improvement) that no row meets, not even the baseline: the answer is None.
    exact_lm = [row("baseline", 1.0, 4.0, False), row("q4", 3.0, 4.25, False), row("q3", 6.0, 4.5, False),
                row("q2", 9.0, 5.0, False)]
    exact_cls = [row("baseline", 1.0, 0.5, True), row("q4", 4.0, 0.4375, True), row("q2", 8.0, 0.25, True)]
    out += [(exact_lm, 12.5), (exact_cls, 12.5), (lm, -50.0)]
    rnd = random.Random(3)
    for _ in range(6):
        hib = rnd.random() < 0.5
        rows = [row("baseline", 1.0, 1.0, hib)] + [row(f"v{i}", round(rnd.uniform(1, 10), 2),
                                                       round(rnd.uniform(0.7, 1.3), 3), hib) for i in range(8)]
        out.append((rows, rnd.choice([1.0, 5.0, 10.0])))
    return out


def _best(ok) -> set:
    """The techniques a pick among the qualifying rows ``ok`` could return, ties on the ratio included."""
    if not ok:
        return {None}
    top = max(r["ratio"] for r in ok)
    return {r["technique"] for r in ok if r["ratio"] == top}


def _pick_variants(rows, budget) -> dict[str, set]:
    """What the usual wrong answers pick (as sets: any of equally compressed rows), to name a student's mistake."""
    base, q0 = rows[0], float(rows[0]["quality"])

    def absolute(r):
        return (q0 - r["quality"]) if r["higher_is_better"] else (r["quality"] - q0)

    loss = {id(r): quality_loss(r, base) for r in rows}
    return {
        "direction": _best([r for r in rows if -loss[id(r)] <= budget]),
        "direction_higher": _best([r for r in rows if 100 * (q0 - r["quality"]) / q0 <= budget]),
        "direction_lower": _best([r for r in rows if 100 * (r["quality"] - q0) / q0 <= budget]),
        "ignores_budget": _best(rows),
        "strict": _best([r for r in rows if loss[id(r)] < budget]),
        "absolute": _best([r for r in rows if absolute(r) <= budget]),
        "fraction": _best([r for r in rows if loss[id(r)] / 100 <= budget]),
        "skips_baseline": _best([r for r in rows[1:] if loss[id(r)] <= budget]),
        "no_tie_break": _best([r for r in rows if loss[id(r)] <= budget]),
    }


_PICK_HINTS = {
    "direction": "the quality direction is wrong: for accuracy higher is better (loss = q0 - q), for perplexity "
                 "lower is better (loss = q - q0); read row['higher_is_better']",
    "direction_higher": "the quality direction is wrong for perplexity: lower is better there (loss = q - q0); read "
                        "row['higher_is_better'] instead of assuming higher is better",
    "direction_lower": "the quality direction is wrong for accuracy: higher is better there (loss = q0 - q); read "
                       "row['higher_is_better'] instead of assuming lower is better",
    "ignores_budget": "you ignored the quality budget: keep only the rows whose loss is at most max_loss_pct, then "
                      "take the largest ratio among them",
    "strict": "a loss exactly equal to the budget is within it: the loss must be AT MOST max_loss_pct (<=, not <)",
    "absolute": "measure the loss RELATIVE to the baseline's quality, in percent: 100 * (q0 - q) / q0 (or "
                "100 * (q - q0) / q0 when lower is better), not the raw difference",
    "fraction": "the budget is in percent: compute the loss as 100 * (q0 - q) / q0 (5 means 5%), not as a fraction",
    "skips_baseline": "the baseline itself (rows[0], loss 0) is a candidate: when no compressed row meets the "
                      "budget, it is the answer",
    "no_tie_break": "on equal ratios prefer the row with the smaller loss (the better quality)",
}


def _technique(row):
    return row.get("technique") if isinstance(row, dict) else row


_REAL: dict = {}
REAL_BUDGETS = (0.5, 1.0, 5.0)


def real_rows() -> list[dict]:
    """A compression table of the ``mnist1d-moe`` zoo model in the format of
    ``compression_table`` (``technique``, ``steps``, ``bytes``, ``ratio``, ``quality``, ``metric``,
    ``higher_is_better``): the fp32 baseline and seven single or combined steps, measured once per
    session on the first 1,000 validation signals."""
    if "rows" not in _REAL:
        from moe_course import zoo
        from moe_course.compress.quantization import quantize, quantize_rest
        from moe_course.compress.trimming import drop_experts, drop_layers
        from moe_course.metrics import size_report
        from moe_course.train import evaluate

        model = zoo.pretrained("mnist1d-moe", progress=False).cpu().eval()
        d = zoo.data("mnist1d-moe")
        val, calib = d["validation"].select(range(1000)), d["train"].shuffle(seed=0).select(range(256))
        variants = [
            ("baseline (fp32)", "", lambda: model),
            ("quantize experts", "quantize(4 bit, g32)", lambda: quantize(model, 4, group_size=32)),
            ("quantize experts 3-bit", "quantize(3 bit, g32)", lambda: quantize(model, 3, group_size=32)),
            ("quantize experts 2-bit", "quantize(2 bit, g32)", lambda: quantize(model, 2, group_size=32)),
            ("2-bit experts, 8-bit rest", "quantize(2 bit, g32) -> quantize_rest(8 bit)",
             lambda: quantize_rest(quantize(model, 2, group_size=32), 8, group_size=32)),
            ("expert drop", "drop_experts(keep 6)", lambda: drop_experts(model, 6, calib=calib)),
            ("layer drop", "drop_layers(keep 2)", lambda: drop_layers(model, keep=2, calib=calib)),
            ("expert drop + quantize", "drop_experts(keep 6) -> quantize(3 bit, g32)",
             lambda: quantize(drop_experts(model, 6, calib=calib), 3, group_size=32)),
        ]
        b0 = size_report(model).bytes
        rows = []
        for technique, steps, make in variants:
            m = make()
            b = size_report(m).bytes
            rows.append({"technique": technique, "steps": steps, "bytes": b, "ratio": b0 / b,
                         "quality": float(evaluate(m, val, batch_size=500)["accuracy"]),
                         "metric": "accuracy", "higher_is_better": True})
        _REAL["rows"] = rows
    return copy.deepcopy(_REAL["rows"])


@checker("Exercise 11.2 (use it): pick a recipe for a quality budget", allow_none=True, timeout=900)
def check_pick_recipe(pick_fn) -> None:
    """``pick_recipe(rows, max_loss_pct)`` on hand-made and random tables, then on a real
    compression table of mnist1d-moe (:func:`real_rows`) at budgets 0.5 %, 1 % and 5 % (the picks
    printed)."""
    _check_pick_tables(pick_fn)
    rows = real_rows()
    lines = []
    for budget in REAL_BUDGETS:
        got, ref = pick_fn(copy.deepcopy(rows), budget), pick_recipe_reference(rows, budget)
        expect(_technique(got) == _technique(ref),
               f"on the real mnist1d-moe table with a budget of {budget}% you picked {_technique(got)!r}, "
               f"the reference picks {_technique(ref)!r}")
        lines.append(f"{budget}%: {ref['technique']!r} ({ref['ratio']:.2f}x, "
                     f"{quality_loss(ref, rows[0]):+.2f}% accuracy)")
    print("mnist1d-moe, a compression table of 8 variants: your picks within " + "; ".join(lines))


def _check_pick_tables(pick_fn) -> None:
    tables = _tables()
    picks = []
    for rows, budget in tables:
        given = copy.deepcopy(rows)
        got = pick_fn(given, budget)
        where = f"(metric {rows[0]['metric']}, budget {budget}%)"
        expect(given == rows, f"your function modified its input `rows` (sorted it in place, or changed a row?): "
                              f"the caller's table must stay as it was; sort a copy (sorted(rows, ...)) {where}")
        expect(got is None or isinstance(got, dict),
               f"return the chosen row (a dict) or None, got {type(got).__name__} {where}")
        picks.append(_technique(got))
    refs = [_technique(pick_recipe_reference(rows, budget)) for rows, budget in tables]
    if picks == refs:
        return
    bad = next(k for k, (g, r) in enumerate(zip(picks, refs)) if g != r)
    rows, budget = tables[bad]
    got, ref = picks[bad], refs[bad]
    where = f"(metric {rows[0]['metric']}, budget {budget}%)"
    said = f"you picked {got!r}, expected {ref!r}"
    # The mistake whose picks agree with the student's on every table (one table alone is ambiguous).
    variants = [_pick_variants(*t) for t in tables]
    for name in _PICK_HINTS:
        if all(g in v[name] for v, g in zip(variants, picks)):
            raise CheckFailed(f"{said}: {_PICK_HINTS[name]} {where}")
    if ref is None:
        raise CheckFailed(f"{said}: no row meets the budget (not even the baseline), so return None {where}")
    if got is None:
        raise CheckFailed(f"{said}: you returned None although {ref!r} meets the budget (did you forget a `return`?) "
                          f"{where}")
    chosen = next(r for r in rows if r["technique"] == got)
    loss = quality_loss(chosen, rows[0])
    if loss > budget:
        raise CheckFailed(f"{said}: {got!r} loses {loss:.2f}% of the baseline's quality, more than {budget}%: measure "
                          f"the loss RELATIVE to rows[0] {where}")
    best = next(r for r in rows if r["technique"] == ref)
    raise CheckFailed(f"{said}: {ref!r} (ratio {best['ratio']}) meets the budget with a larger ratio than your "
                      f"{got!r} (ratio {chosen['ratio']}); on equal ratios prefer the better quality {where}")


# --------------------------------------------------------------------------------------------
# Exercise 11.3 (a whole method): the MNIST-1D classifier 8x smaller, at most 1 point lost
# --------------------------------------------------------------------------------------------
TARGET_RATIO = 8.0
MAX_POINTS_LOST = 1.0
_CLS: dict = {}


def classifier_setup():
    """``(model, validation, calibration)``: the ``mnist1d-moe`` zoo model, its whole validation
    split (the grade) and 256 shuffled TRAINING examples (for any calibration)."""
    if not _CLS:
        from moe_course import zoo
        d = zoo.data("mnist1d-moe")
        _CLS["model"] = zoo.pretrained("mnist1d-moe", progress=False).cpu().eval()
        _CLS["val"] = d["validation"]
        _CLS["calib"] = d["train"].shuffle(seed=0).select(range(256))
    return _CLS["model"], _CLS["val"], _CLS["calib"]


def _accuracy(model, val) -> float:
    from moe_course.train import evaluate
    return float(evaluate(model, val, batch_size=500)["accuracy"])


def _fp32_bytes(model) -> dict[str, int]:
    """Bytes stored as float32, by kind of module (experts, convolutions, the rest)."""
    from moe_course.layers import moe_layers
    expert_ids = {id(t) for layer in moe_layers(model) for t in layer.experts.parameters()}
    expert_ids |= {id(t) for layer in moe_layers(model) for t in layer.experts.buffers()}
    out = {"experts": 0, "convolutions": 0, "rest": 0}
    for mod in model.modules():
        for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            if t.dtype != torch.float32:
                continue
            kind = "experts" if id(t) in expert_ids else (
                "convolutions" if isinstance(mod, torch.nn.Conv1d) else "rest")
            out[kind] += t.numel() * 4
    return out


@checker("Exercise 11.3 (a whole method): the MNIST-1D model 8x smaller", timeout=300,
         forbid=("moe_course.compress.recipes.pipeline", "moe_course.course_table.compression_table"))
def check_compress_classifier(compress_fn) -> None:
    """``compress_classifier(model, calib) -> new model``: at least 8x fewer true bytes than the
    fp32 ``mnist1d-moe`` (every parameter and buffer, ``metrics.size_report``) and at most 1
    accuracy point lost on its whole validation split; the input model must stay as it was."""
    from moe_course.metrics import size_report

    pristine, val, calib = classifier_setup()
    model = copy.deepcopy(pristine)  # a mistake cannot spoil the cached model
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = compress_fn(model, calib)
    expect(isinstance(out, torch.nn.Module),
           f"return the compressed model (an nn.Module), got {type(out).__name__}")
    after = model.state_dict()
    changed = [k for k in before if k not in after or not torch.equal(before[k], after[k])]
    expect(out is not model and not changed,
           "your function modified the input model" + (f" ({changed[0]})" if changed else "") +
           ": compress a copy (copy.deepcopy(model), or the package steps, which return new models) "
           "and leave the fp32 model as it is")
    b0, b = size_report(pristine).bytes, size_report(out).bytes
    acc0, acc = _accuracy(pristine, val), _accuracy(out, val)
    ratio, lost = b0 / b, 100 * (acc0 - acc)
    fp32 = _fp32_bytes(out)
    summary = (f"{b0:,} -> {b:,} bytes ({ratio:.2f}x smaller), validation accuracy {acc0:.4f} -> {acc:.4f} "
               f"({lost:+.2f} points); still float32: experts {fp32['experts']:,} B, convolutions "
               f"{fp32['convolutions']:,} B, rest {fp32['rest']:,} B")
    print("mnist1d-moe, your compress_classifier: " + summary)
    if ratio < TARGET_RATIO:
        if fp32["experts"] > 0.5 * b:
            raise CheckFailed(f"only {ratio:.2f}x smaller: the experts are still float32 and most of the bytes; "
                              f"quantize them first (2-3 bits in groups) ({summary})")
        if fp32["convolutions"] + fp32["rest"] > 0.3 * b and fp32["convolutions"] > 0.15 * b:
            raise CheckFailed(f"only {ratio:.2f}x smaller: once the experts are quantized, the float32 rest "
                              f"dominates, and the convolutions (stem and mixers) are the largest part of it; "
                              f"quantize_rest leaves convolutions alone, so store their weights as integer codes "
                              f"yourself (uint8 buffers + a scale per output channel; fake quantization that keeps "
                              f"float32 weights saves no bytes) ({summary})")
        raise CheckFailed(f"only {ratio:.2f}x smaller, the target is {TARGET_RATIO:.0f}x: count every stored byte "
                          f"(packed codes, scales, zero points) and find the largest float32 part ({summary})")
    expect(lost <= MAX_POINTS_LOST,
           f"{ratio:.2f}x smaller but {lost:.2f} accuracy points lost (at most {MAX_POINTS_LOST:g}): too "
           f"aggressive; this classifier has only 3 MoE layers, so keep all of them and all experts, and spend "
           f"the bits where they matter (2-bit experts are fine here, the stem and head want 8) ({summary})")
