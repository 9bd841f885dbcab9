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
    fig, box = widgets.show_explorer(grid, "accuracy", True, display=shown.append)
    assert isinstance(shown[0], Figure) and shown[0] is fig
    if box is not None:
        assert shown[1] is box
    monkeypatch.setitem(sys.modules, "ipywidgets", None)   # ipywidgets missing: import fails
    shown.clear()
    fig, box = widgets.show_explorer(grid, "accuracy", True, display=shown.append)
    assert box is None and len(shown) == 1 and isinstance(shown[0], Figure)
