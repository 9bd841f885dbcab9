"""The recipe explorer: the grid measures real compressed models, lookups are exact, the widget
readout follows the sliders, and without ipywidgets only the static figure is shown."""

from __future__ import annotations

import sys

import pytest
from matplotlib.figure import Figure

from moe_course import metrics, widgets
from moe_course.compress.quantization import quantize, quantize_rest
from moe_course.compress.trimming import drop_experts, drop_layers
from moe_course.train import evaluate
from moe_course.zoo import data, pretrained

@pytest.fixture(scope="module")
def setup(single_thread):
    model = pretrained("mnist1d-moe", progress=False)
    d = data("mnist1d-moe")
    calib = d["train"].shuffle(seed=0).select(range(64))
    val = d["validation"].select(range(200))
    ev = lambda m: evaluate(m, val, batch_size=200)["accuracy"]  # noqa: E731
    grid = widgets.compute_grid(model, calib, ev, keep=(8, 6), drop_layers=(0, 1), expert_bits=(32, 4),
                                rest_bits=(32, 8))
    return model, calib, ev, grid


def test_grid_covers_every_combination(setup):
    _, _, _, grid = setup
    assert len(grid) == 2 * 2 * 2 * 2
    assert len({tuple(r[k] for k in widgets.KNOBS) for r in grid}) == len(grid)
    assert widgets.knob_values(grid) == {"keep": [6, 8], "drop_layers": [0, 1], "expert_bits": [4, 32],
                                         "rest_bits": [8, 32]}


def test_grid_rows_match_the_real_compressed_model(setup):
    model, calib, ev, grid = setup
    row = widgets.lookup(grid, keep=6, drop_layers=1, expert_bits=4, rest_bits=8)
    m = quantize_rest(quantize(drop_experts(drop_layers(model, keep=len(model.blocks) - 1, calib=calib), 6, calib=calib), 4, group_size=32), 8, group_size=32)
    assert row["bytes"] == metrics.size_report(m).bytes
    assert row["quality"] == pytest.approx(ev(m))
    base = widgets.lookup(grid, keep=8, drop_layers=0, expert_bits=32, rest_bits=32)
    assert base["bytes"] == metrics.size_report(model).bytes and base["ratio"] == 1.0


def test_grid_bytes_monotone_in_every_knob(setup):
    _, _, _, grid = setup
    look = lambda **k: widgets.lookup(grid, **k)["bytes"]  # noqa: E731
    for kp in (6, 8):
        for n in (0, 1):
            for rb in (8, 32):
                assert look(keep=kp, drop_layers=n, expert_bits=4, rest_bits=rb) < look(keep=kp, drop_layers=n, expert_bits=32, rest_bits=rb)
            assert look(keep=kp, drop_layers=n, expert_bits=4, rest_bits=8) < look(keep=kp, drop_layers=n, expert_bits=4, rest_bits=32)
        assert look(keep=kp, drop_layers=1, expert_bits=4, rest_bits=8) < look(keep=kp, drop_layers=0, expert_bits=4, rest_bits=8)
    assert look(keep=6, drop_layers=0, expert_bits=32, rest_bits=32) < look(keep=8, drop_layers=0, expert_bits=32, rest_bits=32)


def test_lookup_and_grid_validation(setup):
    model, calib, ev, grid = setup
    with pytest.raises(ValueError, match=r"expert_bits: expected one of \[4, 32\]"):
        widgets.lookup(grid, keep=8, drop_layers=0, expert_bits=3, rest_bits=32)
    with pytest.raises(ValueError, match="rest_bits: missing"):
        widgets.lookup(grid, keep=8, drop_layers=0, expert_bits=4)
    with pytest.raises(ValueError, match="unknown"):
        widgets.lookup(grid, keep=8, drop_layers=0, expert_bits=4, rest_bits=32, rank=3)
    with pytest.raises(ValueError, match="keep"):
        widgets.compute_grid(model, calib, ev, keep=(1,))
    with pytest.raises(ValueError, match="expert_bits"):
        widgets.compute_grid(model, calib, ev, expert_bits=(5,))
    with pytest.raises(ValueError, match="grid"):
        widgets.plot_grid([])


def test_explorer_readout_follows_sliders(setup):
    pytest.importorskip("ipywidgets")
    _, _, _, grid = setup
    box = widgets.explorer(grid, metric="accuracy", higher_is_better=True)
    assert set(box.sliders) == set(widgets.KNOBS)
    before = box.readout.value
    assert "1.00x smaller" in before                       # starts at the fp32 baseline
    box.sliders["expert_bits"].value = 4
    box.sliders["rest_bits"].value = 8
    row = widgets.lookup(grid, keep=8, drop_layers=0, expert_bits=4, rest_bits=8)
    assert box.readout.value != before and f"{grid[0]['bytes'] / row['bytes']:.2f}x smaller" in box.readout.value


def test_show_explorer_always_shows_static_figure(setup, monkeypatch):
    _, _, _, grid = setup
    shown = []
    fig, box = widgets.show_explorer(grid, "accuracy", True, display=shown.append, sliders=True,
                                     colab_url="https://colab.example/nb.ipynb")
    assert isinstance(shown[0], Figure) and shown[0] is fig
    if box is not None:
        assert shown[-1] is box
    monkeypatch.setitem(sys.modules, "ipywidgets", None)   # ipywidgets missing: import fails
    shown.clear()
    fig, box = widgets.show_explorer(grid, "accuracy", True, display=shown.append, sliders=True)
    assert box is None and isinstance(shown[0], Figure)
    assert not any(type(s).__name__ == "VBox" for s in shown)


def test_static_fallback_shows_all_knobs_labels_and_says_sliders_need_a_kernel(setup):
    """The website's view: every knob visible (panel, colour, marker, fill), the frontier points
    numbered and listed with their knobs, and a note with the Colab link; no widget stored."""
    _, _, _, grid = setup
    shown = []
    fig, box = widgets.show_explorer(grid, "accuracy", True, display=shown.append, sliders=False,
                                     colab_url="https://colab.example/nb.ipynb")
    assert box is None
    axes = [a for a in fig.axes if a.get_title()]
    assert {a.get_title() for a in axes} == {"8 experts kept per layer", "6 experts kept per layer"}
    legend = " ".join(t.get_text() for lg in fig.legends for t in lg.get_texts())
    for word in ("experts fp32", "experts 4-bit", "rest fp32", "rest 8-bit", "0 MoE layers dropped",
                 "1 MoE layer dropped", "Pareto frontier"):
        assert word in legend, word
    front = widgets.frontier_rows(grid, higher_is_better=True)
    numbers = sorted(int(t.get_text()) for a in axes for t in a.texts)
    assert numbers == list(range(1, len(front) + 1))
    table = shown[1].styler.data  # the table's DataFrame
    assert list(table["#"]) == numbers and {"experts kept / layer", "MoE layers dropped", "expert bits",
                                            "rest bits"} <= set(table.columns)
    note = shown[2].data
    assert "need a running Python kernel" in note and "https://colab.example/nb.ipynb" in note


def test_live_kernel_is_false_when_executed_headless(monkeypatch):
    for var in ("JPY_SESSION_NAME", "VSCODE_PID", "VSCODE_CWD", "MOE_COURSE_SLIDERS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    assert widgets.live_kernel() is False
    monkeypatch.setenv("JPY_SESSION_NAME", "x.ipynb")
    assert widgets.live_kernel() is True
    monkeypatch.setenv("MOE_COURSE_SLIDERS", "0")
    assert widgets.live_kernel() is False


def test_frontier_labels_do_not_overlap():
    """viz.plot_frontier numbers the frontier points and places the numbers so that no two
    overlap; the key under the axes names every numbered variant."""
    import matplotlib.pyplot as plt

    from moe_course import viz

    rows = [{"technique": "baseline (fp32)", "bytes": 3.0e6, "quality": 6.86, "metric": "perplexity",
             "higher_is_better": False}]
    names = ["quantize everything", "3-bit experts, 4-bit rest", "trim + quantize", "trim + quantize + KD",
             "2-bit experts, 8-bit rest", "quantize experts"]
    for i, n in enumerate(names):  # crowded: neighbours almost on top of each other
        rows.append({**rows[0], "technique": n, "bytes": 4.8e5 - 2.5e4 * i, "quality": 6.862 + 0.004 * i})
    fig = viz.plot_frontier(rows, x="bytes")
    ax = fig.axes[0]
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(r) for t in ax.texts]
    assert len(boxes) == len(fig.frontier_key) >= 3
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), "two frontier labels overlap"
    key = " ".join(t.get_text() for t in ax.get_legend().get_texts())
    assert all(name in key for _, name in fig.frontier_key)
    plt.close(fig)
