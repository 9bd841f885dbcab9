"""Recipes (chapter 11): pipelines record true sizes, never touch their input, validate steps
before any work; the Pareto frontier equals a brute-force one; the compression table's schema."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torch.nn as nn

from moe_course import course_table as CT, metrics
from moe_course.viz import plot_frontier
from moe_course.compress import recipes as R
from moe_course.compress.quantization import QuantizedExperts, QuantizedLinear, quantize, quantize_rest
from moe_course.compress.trimming import drop_layers
from moe_course.layers import moe_layers
from moe_course.zoo import data, pretrained


@pytest.fixture(scope="module")
def setup(single_thread):
    model = pretrained("mnist1d-moe", progress=False)
    d = data("mnist1d-moe")
    return model, d["train"].shuffle(seed=0).select(range(64)), d["validation"].select(range(200))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    sd = model.state_dict()
    return sd.keys() == state.keys() and all(torch.equal(sd[k], state[k]) for k in state)


# the mnist1d-moe model has 3 MoE layers: keep 2 drops one
STEPS = [("drop_layers", {"keep": 2}), ("quantize", {"bits": 4, "group_size": 32}),
         ("quantize_rest", {"bits": 8, "group_size": 32})]


# ------------------------------------------------------------------------------- pipeline
def test_pipeline_sizes_shrink_and_input_untouched(setup):
    model, calib, val = setup
    state = _state(model)
    res = R.pipeline(model, STEPS, calib=calib)
    assert _same(model, state)
    assert res.model is not model
    sizes = [r["bytes"] for r in res.rows]
    assert len(res.rows) == len(STEPS) + 1 and sizes[0] == metrics.size_report(model).bytes
    assert all(b < a for a, b in zip(sizes, sizes[1:]))            # every step here saves bytes
    assert sizes[-1] == metrics.size_report(res.model).bytes       # rows hold the true size
    assert all(r["ratio"] == pytest.approx(sizes[0] / r["bytes"]) for r in res.rows)
    assert res.ratio == pytest.approx(sizes[0] / sizes[-1])


def test_pipeline_equals_manual_composition(setup):
    model, calib, val = setup
    res = R.pipeline(model, STEPS[:2], calib=calib)
    manual = quantize(drop_layers(model, keep=len(model.blocks) - 1, calib=calib), 4, group_size=32)
    x = val[:32]["x"]
    with torch.no_grad():
        assert torch.equal(res.model(x), manual(x))
    assert metrics.size_report(res.model).bytes == metrics.size_report(manual).bytes


def test_pipeline_inplace_and_callables(setup):
    model, calib, val = setup
    work = copy.deepcopy(model)
    seen = []

    def spy(m):
        seen.append(m)
        return m

    res = R.pipeline(work, [spy, ("quantize", {"bits": 8})], inplace=True)
    assert seen[0] is work and res.model is work
    assert all(isinstance(l.experts, QuantizedExperts) for l in moe_layers(work))
    assert res.rows[1]["step"] == "spy" and res.rows[1]["bytes"] == res.rows[0]["bytes"]


def test_pipeline_records_quality_and_latency(setup):
    model, calib, val = setup
    calls = []

    def ev(m):
        calls.append(m)
        return {"loss": 1.0, "accuracy": 0.5 + 0.1 * len(calls)}

    res = R.pipeline(model, STEPS[1:2], evaluate=ev, latency_batch=val[:16], latency_repeats=1)
    assert [r["quality"] for r in res.rows] == pytest.approx([0.6, 0.7])   # the accuracy key is used
    assert all(r["latency_ms"] > 0 for r in res.rows)
    assert "quantize(4 bit, g32)" in res.to_markdown() and "x smaller" in repr(res)


@pytest.mark.parametrize("bad, words", [
    ([("nope", {})], ["unknown step 'nope'", "quantize", "merge"]),
    ([("quantize", {"bitz": 4})], ["quantize", "bitz", "bits"]),
    ([("quantize", {})], ["missing", "bits"]),
    ([("quantize", {"bits": 5})], ["bits", "(2, 3, 4, 8)"]),
    ([("merge", {"keep": 0})], ["keep"]),
    ([("lowrank", {"keep": 8}), ("merge", {"keep": 4})], ["steps[1]", "merge", "lowrank"]),
    ([("quantize", {"bits": 4}), ("prune", {"keep": 4})], ["steps[1]", "prune", "quantize"]),
    ([("quantize", {"bits": 4, "inplace": False})], ["inplace"]),
    ([("quantize", "bits=4")], ["kwargs must be a dict"]),
    ([42], ["(name, kwargs)"]),
    ("quantize", ["steps"]),
])
def test_bad_steps_raise_before_any_work(setup, bad, words):
    model, calib, _ = setup
    calls = []
    steps = [lambda m: calls.append(1) or m, *bad] if isinstance(bad, list) else bad
    with pytest.raises((ValueError, TypeError)) as err:
        R.pipeline(model, steps, calib=calib)
    assert not calls, "a step ran before the invalid one was reported"
    for w in words:
        assert w in str(err.value)


def test_calib_required_early(setup):
    model, _, _ = setup
    calls = []
    with pytest.raises(ValueError, match="calib"):
        R.pipeline(model, [lambda m: calls.append(1) or m, ("drop_layers", {"keep": 2})])
    assert not calls


def test_callable_must_return_module(setup):
    model, _, _ = setup
    with pytest.raises(TypeError, match=r"steps\[0\]"):
        R.pipeline(model, [lambda m: None])


def test_distill_recovery_step_trains_student_only(setup):
    model, calib, val = setup
    state = _state(model)
    res = R.pipeline(model, [("drop_layers", {"keep": 2}), ("distill", {"steps": 2, "batch_size": 16})],
                     calib=calib, train_data=calib)
    assert _same(model, state)                              # the teacher (input) is untouched
    before = R.pipeline(model, [("drop_layers", {"keep": 2})], calib=calib).model.state_dict()
    after = res.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in after)   # the student moved
    assert res.rows[2]["step"] == "distill(2 steps)"


def test_quantize_rest_quantizes_only_the_rest(setup):
    model, _, val = setup
    out = quantize_rest(model, 8, group_size=32)
    assert isinstance(out.head, QuantizedLinear) if isinstance(getattr(model, "head", None), nn.Linear) else True
    for l0, l1 in zip(moe_layers(model), moe_layers(out)):
        assert type(l1.experts) is type(l0.experts) and type(l1.router.gate) is nn.Linear
    lin = [m for m in out.modules() if type(m) is nn.Linear]
    routers = [l.router.gate for l in moe_layers(out)]
    assert all(any(m is r for r in routers) for m in lin)   # every other Linear is quantized
    assert metrics.size_report(out).bytes < metrics.size_report(model).bytes
    with pytest.raises(ValueError, match="bits"):
        quantize_rest(model, 5)


# ------------------------------------------------------------------------------- Pareto frontier
def _brute(points, hib):
    def better_eq(a, b):
        return a["x"] <= b["x"] and (a["y"] >= b["y"] if hib else a["y"] <= b["y"])

    def strictly(a, b):
        return a["x"] < b["x"] or (a["y"] > b["y"] if hib else a["y"] < b["y"])

    return [p for p in points if not any(better_eq(q, p) and strictly(q, p) for q in points if q is not p)]


def _points(seed, n):
    rnd = random.Random(seed)
    # few distinct values so that ties and duplicates happen
    return [{"x": rnd.randint(1, 8), "y": rnd.randint(1, 8) / 2, "id": i} for i in range(n)]


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("hib", [False, True])
def test_pareto_equals_brute_force(seed, hib):
    pts = _points(seed, 1 + seed % 13 + seed)
    got = R.pareto_frontier(pts, "x", "y", hib)
    assert sorted(p["id"] for p in got) == sorted(p["id"] for p in _brute(pts, hib))
    xs = [p["x"] for p in got]
    assert xs == sorted(xs)


@pytest.mark.parametrize("seed", range(5))
def test_pareto_invariances(seed):
    pts = _points(100 + seed, 25)
    ids = lambda ps: sorted(p["id"] for p in ps)  # noqa: E731
    ref = ids(R.pareto_frontier(pts, "x", "y", False))
    shuffled = pts[:]
    random.Random(seed).shuffle(shuffled)
    assert ids(R.pareto_frontier(shuffled, "x", "y", False)) == ref                      # order of input
    mono = [{**p, "x": math.exp(p["x"]) + 3, "y": 10 * p["y"] ** 3 - 1} for p in pts]
    assert ids(R.pareto_frontier(mono, "x", "y", False)) == ref                          # monotone rescaling
    flipped = [{**p, "y": -p["y"]} for p in pts]
    assert ids(R.pareto_frontier(flipped, "x", "y", True)) == ref                        # direction flip
    assert ids(R.pareto_frontier(pts + [{"x": 0.5, "y": -100.0, "id": -1}], "x", "y", False)) == [-1]  # dominates all


def test_pareto_edges():
    assert R.pareto_frontier([], "x", "y", False) == []
    a, b = {"x": 1, "y": 1.0}, {"x": 1, "y": 1.0}
    assert len(R.pareto_frontier([a, b], "x", "y", False)) == 2                # duplicates both stay
    nan = {"x": 0, "y": float("nan")}
    assert R.pareto_frontier([a, nan], "x", "y", False) == [a]                 # NaN is left out
    rows = [{"bytes": 2, "quality": 0.9, "higher_is_better": True}, {"bytes": 1, "quality": 0.8, "higher_is_better": True}]
    assert len(R.pareto_frontier(rows)) == 2                                   # direction read from rows
    with pytest.raises(ValueError, match="higher_is_better"):
        R.pareto_frontier([{"bytes": 1, "quality": 1}])
    with pytest.raises(TypeError, match="points"):
        R.pareto_frontier({"x": 1}, "x", "y", False)


# ------------------------------------------------------------------------------- compression table
def test_compression_table_rejects_unknown_model():
    with pytest.raises(ValueError, match="shakespeare-moe"):
        CT.compression_table("gpt-moe")


def test_compression_table_quick_schema(tmp_path, single_thread):
    rows = CT.compression_table("mnist1d-moe", preset="test", cache_dir=tmp_path, quick=True)
    assert len(rows) >= 5 and rows[0]["technique"].startswith("baseline")
    for r in rows:
        assert set(r) == set(CT.ROW_KEYS)
        assert isinstance(r["technique"], str) and isinstance(r["steps"], str)
        assert isinstance(r["bytes"], int) and r["bytes"] > 0
        assert r["ratio"] == pytest.approx(rows[0]["bytes"] / r["bytes"])
        assert 0.0 <= r["quality"] <= 1.0 and r["metric"] == "accuracy" and r["higher_is_better"] is True
        assert isinstance(r["latency_ms"], float) and r["latency_ms"] > 0
    assert rows[0]["ratio"] == 1.0
    by = {r["technique"]: r for r in rows}
    assert by["quantize experts"]["ratio"] > 2 and "->" in by["trim + quantize"]["steps"]
    # serving columns: a classifier decodes nothing; quantized variants have a flip rate
    # against the same recipe before quantization, the others none
    for r in rows:
        assert math.isnan(r["decode_tok_s_b1"]) and math.isnan(r["gen_perplexity"]) and r["sample"] == ""
        quantized = any(s.startswith("quantize") for s in r["steps"].split(" -> "))
        assert (0.0 <= r["flip_rate"] <= 1.0) if quantized else math.isnan(r["flip_rate"])
    assert by["trim + quantize"]["steps"].startswith("drop_")
    fig = plot_frontier(rows, x="latency_ms")
    assert fig.axes and fig.axes[0].get_xlabel().startswith("measured latency")
    with pytest.raises(ValueError, match="x"):
        plot_frontier(rows, x="flops")


def test_table_recipes_split_before_the_first_quantization():
    steps = [("drop_layers", {"keep": 2}), ("distill", {"steps": 1}), ("quantize", {"bits": 3}),
             ("quantize_rest", {"bits": 4})]
    assert CT._split(steps) == (steps[:2], steps[2:])
    assert CT._split(steps[:2]) == (steps[:2], []) and CT._split(steps[2:]) == ([], steps[2:])
    assert set(CT.QUANT_STEPS) <= set(R.STEPS)


def test_every_table_recipe_validates(setup):
    model, calib, _ = setup
    recipes = CT.table_recipes(model)
    names = [t for t, _ in recipes]
    assert names[0].startswith("baseline") and len(set(names)) == len(names)
    assert {t for t, _ in CT.table_recipes(model, quick=True)} < set(names)
    for technique, steps in recipes:
        R._check_steps(steps, calib=calib, train_data=calib)      # raises on a bad name / keyword / order
    used = {s[0] for _, steps in recipes for s in steps}
    assert {"quantize", "quantize_rest", "drop_layers", "merge", "mc_smoe", "lowrank", "prune", "distill"} <= used


def test_share_rank_zero_allowed_but_negative_rank_rejected(setup):
    model, calib, _ = setup
    R._check_steps([("share", {"keep": 0})], calib=None, train_data=None)
    with pytest.raises(ValueError, match="keep must be >= 1"):
        R._check_steps([("lowrank", {"keep": 0})], calib=None, train_data=None)


def test_plot_frontier_draws_the_frontier_and_clips_outliers():
    import matplotlib.pyplot as plt

    rows = [{"technique": "base", "bytes": 100, "quality": 5.0, "latency_ms": 10.0, "metric": "perplexity",
             "higher_is_better": False},
            {"technique": "q", "bytes": 20, "quality": 5.1, "latency_ms": 12.0, "metric": "perplexity",
             "higher_is_better": False},
            {"technique": "bad", "bytes": 50, "quality": 50.0, "latency_ms": 9.0, "metric": "perplexity",
             "higher_is_better": False}]
    fig = plot_frontier(rows, x="bytes")
    ax = fig.axes[0]
    step = ax.lines[0]
    assert list(step.get_xdata()) == [20.0, 100.0] and list(step.get_ydata()) == [5.1, 5.0]
    assert ax.get_ylim()[1] < 50.0                                   # the outlier is off the chart...
    from matplotlib.legend import Legend

    legends = [c for c in ax.get_children() if isinstance(c, Legend)]
    assert any("far worse" in t.get_text() for lg in legends for t in lg.get_texts())  # ...and said so
    assert {t.get_text() for t in ax.texts} == {"1", "2"}           # frontier variants are numbered
    assert fig.frontier_key == [(1, "q"), (2, "base")]               # and named in the key
    plt.close(fig)
