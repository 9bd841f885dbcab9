"""Interactive explorers (ipywidgets) that degrade to a static matplotlib figure.

The recipe explorer (chapter 11) turns the knobs of a trim-then-quantize recipe (He et al.,
2024: experts kept per layer, MoE layers dropped, bits of the experts, bits of the rest) and
shows the true size and the measured quality at once. Moving a slider must be instant, so
nothing is compressed while you drag: :func:`compute_grid` measures every combination of knob
values on a real model beforehand, and the explorer only looks rows up (:func:`lookup`).

Static pages (the website, GitHub, a notebook opened without a kernel) cannot run widgets, so
:func:`show_explorer` always shows the static view first (:func:`plot_grid`: every grid point
with all four knobs, the numbered Pareto frontier and its table) with a note that the sliders need
a running kernel, and adds the sliders only in a live kernel (:func:`live_kernel`) with
``ipywidgets``: a headless execution stores no widget state in the notebook.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch.nn as nn

__all__ = ["KNOBS", "compute_grid", "lookup", "plot_grid", "frontier_rows", "frontier_table", "live_kernel",
           "explorer", "show_explorer", "readout"]

KNOBS = ("keep", "drop_layers", "expert_bits", "rest_bits")
_KNOB_LABELS = {"keep": "experts kept / layer", "drop_layers": "MoE layers dropped",
                "expert_bits": "expert bits", "rest_bits": "rest bits"}
FP32 = 32


def _values(name: str, values: Any, check: Callable[[Any], bool], what: str) -> tuple:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name}: expected a non-empty list of {what}, got {values!r}")
    for v in values:
        if isinstance(v, bool) or not check(v):
            raise ValueError(f"{name}: expected a list of {what}, got {v!r} in {list(values)}")
    return tuple(dict.fromkeys(values))


def compute_grid(model: nn.Module, calib: Any, evaluate: Callable[[nn.Module], float], *,
                 keep: Sequence[int] | None = None, drop_layers: Sequence[int] = (0, 1),
                 expert_bits: Sequence[int] = (FP32, 8, 4, 3, 2), rest_bits: Sequence[int] = (FP32, 4),
                 group_size: int | None = 32, embedding_bits: int = 8) -> list[dict[str, Any]]:
    """Measure every combination of the recipe's knobs on ``model``: one row per combination.

    The recipe is :func:`~moe_course.compress.trimming.drop_layers` (``drop_layers`` MoE layers),
    :func:`~moe_course.compress.trimming.drop_experts` (``keep`` experts per layer), then
    :func:`~moe_course.compress.quantization.quantize` of the experts (``expert_bits``; 32 means
    fp32) and :func:`~moe_course.compress.quantization.quantize_rest` of the rest (``rest_bits``; the
    embeddings at ``max(rest_bits, embedding_bits)``). Shared prefixes are computed once.

    Args:
        model: a trained MoE model (not modified).
        calib: calibration data (a slice of the TRAINING split).
        evaluate: ``f(model) -> float`` quality (e.g. validation perplexity or accuracy).
        keep: experts kept per layer (default: E, 3E/4, E/2, never below k).
    Returns:
        rows ``{keep, drop_layers, expert_bits, rest_bits, bytes, ratio, quality}`` (``ratio`` =
        the unmodified model's bytes / bytes).
    """
    from moe_course.compress.quantization import SUPPORTED_BITS, quantize, quantize_rest
    from moe_course.compress.trimming import drop_experts, drop_layers as _drop_layers
    from moe_course.layers import require_moe_layers
    from moe_course.metrics import size_report

    layers = require_moe_layers(model, "explore")
    if not callable(evaluate):
        raise TypeError(f"evaluate: expected a callable model -> float, got {type(evaluate).__name__}")
    E, k, L = min(l.num_experts for l in layers), max(l.k for l in layers), len(layers)
    if keep is None:
        keep = sorted({E, max(k, 3 * E // 4), max(k, E // 2)}, reverse=True)
    keep = _values("keep", keep, lambda v: isinstance(v, int) and k <= v <= E, f"ints in [k={k}, E={E}]")
    drop_layers = _values("drop_layers", drop_layers, lambda v: isinstance(v, int) and 0 <= v < L,
                          f"ints in [0, {L - 1}]")
    bits_ok = lambda v: v == FP32 or v in SUPPORTED_BITS  # noqa: E731
    expert_bits = _values("expert_bits", expert_bits, bits_ok, f"bit widths in {SUPPORTED_BITS} or 32 (fp32)")
    rest_bits = _values("rest_bits", rest_bits, bits_ok, f"bit widths in {SUPPORTED_BITS} or 32 (fp32)")
    base = size_report(model).bytes
    rows = []
    for n in drop_layers:
        m1 = _drop_layers(model, L - n, calib=calib) if n else model
        for kp in keep:
            m2 = drop_experts(m1, kp, calib=calib) if kp < E else m1
            for eb, rb in itertools.product(expert_bits, rest_bits):
                m3 = quantize(m2, eb, group_size=group_size) if eb != FP32 else m2
                if rb != FP32:
                    m3 = quantize_rest(m3, rb, group_size=group_size, embedding_bits=max(rb, embedding_bits), inplace=m3 is not m2)
                b = size_report(m3).bytes
                rows.append({"keep": kp, "drop_layers": n, "expert_bits": eb, "rest_bits": rb, "bytes": b,
                             "ratio": base / b, "quality": float(evaluate(m3))})
    return rows


def _check_grid(grid: Any) -> list[Mapping[str, Any]]:
    if isinstance(grid, Mapping) or not isinstance(grid, Sequence) or not grid:
        raise ValueError("grid: expected the non-empty list of rows returned by compute_grid")
    for r in grid:
        if not isinstance(r, Mapping) or any(key not in r for key in (*KNOBS, "bytes", "quality")):
            raise ValueError(f"grid: every row needs the keys {(*KNOBS, 'bytes', 'quality')}, got {r!r}")
    return list(grid)


def knob_values(grid: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    """The sorted values each knob takes in ``grid``."""
    grid = _check_grid(grid)
    return {kn: sorted({r[kn] for r in grid}) for kn in KNOBS}


def lookup(grid: Sequence[Mapping[str, Any]], **knobs: Any) -> Mapping[str, Any]:
    """The grid row with these knob values (every knob of :data:`KNOBS`), e.g.
    ``lookup(grid, keep=8, drop_layers=1, expert_bits=3, rest_bits=4)``."""
    grid = _check_grid(grid)
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        raise ValueError(f"knobs: unknown {unknown}; expected {KNOBS}")
    allowed = knob_values(grid)
    for kn in KNOBS:
        if kn not in knobs:
            raise ValueError(f"{kn}: missing; expected one of {allowed[kn]}")
        if knobs[kn] not in allowed[kn]:
            raise ValueError(f"{kn}: expected one of {allowed[kn]}, got {knobs[kn]!r}")
    for r in grid:
        if all(r[kn] == knobs[kn] for kn in KNOBS):
            return r
    raise ValueError(f"grid has no row for {knobs}")


def readout(row: Mapping[str, Any], baseline: Mapping[str, Any], metric: str = "quality") -> str:
    """One line: true size, ratio and quality (with its change against ``baseline``)."""
    from moe_course.metrics import format_bytes

    q, q0 = float(row["quality"]), float(baseline["quality"])
    change = 100 * (q / q0 - 1) if q0 else float("nan")
    return (f"{format_bytes(row['bytes'])} ({baseline['bytes'] / row['bytes']:.2f}x smaller) | "
            f"{metric} {q:.4g} ({change:+.1f}% vs {q0:.4g})")


def _baseline(grid):
    fp = [r for r in grid if r["expert_bits"] == FP32 and r["rest_bits"] == FP32 and r["drop_layers"] == 0]
    return max(fp, key=lambda r: (r["keep"], r["bytes"])) if fp else max(grid, key=lambda r: r["bytes"])


def plot_grid(grid: Sequence[Mapping[str, Any]], metric: str = "quality", higher_is_better: bool = False,
              highlight: Mapping[str, Any] | None = None, ax=None, title: str | None = None):
    """Static view of the whole grid with all four knobs: one panel per ``keep`` value (experts
    kept per layer), colour = expert bit width, marker = bit width of the rest, hollow = MoE
    layers dropped; the Pareto frontier of the whole grid is a line whose points are numbered
    (cheapest first; :func:`frontier_rows` lists them with their knobs) and ``highlight`` (a row)
    is circled. ``ax`` may be one axes (then every ``keep`` value shares it). Returns the Figure;
    ``fig.frontier`` holds the numbered frontier rows."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from moe_course.viz import COURSE_STYLE, PALETTE, bytes_axis, place_labels

    grid = _check_grid(grid)
    keeps = sorted({r["keep"] for r in grid}, reverse=True)
    bits = sorted({r["expert_bits"] for r in grid}, reverse=True)
    rests = sorted({r["rest_bits"] for r in grid}, reverse=True)
    drops = sorted({r["drop_layers"] for r in grid})
    markers = dict(zip(rests, "os^Dvp"))
    colours = {b: PALETTE[i % len(PALETTE)] for i, b in enumerate(bits)}
    front = frontier_rows(grid, higher_is_better)
    number = {id(r): i + 1 for i, r in enumerate(front)}
    bname = lambda b: "fp32" if b == FP32 else f"{b}-bit"  # noqa: E731
    with plt.rc_context(COURSE_STYLE):
        if ax is None:
            fig, axes = plt.subplots(1, len(keeps), figsize=(7.5, 4.0), sharey=True, squeeze=False)
            axes = list(axes[0])
        else:
            fig, axes = ax.figure, [ax] * len(keeps)
        for a, kp in zip(axes, keeps):
            for r in (r for r in grid if r["keep"] == kp):
                c = colours[r["expert_bits"]]
                a.scatter([r["bytes"]], [r["quality"]], s=30, marker=markers[r["rest_bits"]], zorder=2,
                          facecolors=c if r["drop_layers"] == 0 else "none", edgecolors=c)
            fr = [r for r in front if r["keep"] == kp]
            if fr:
                a.plot([r["bytes"] for r in fr], [r["quality"] for r in fr], color="#333333", lw=0.8,
                       zorder=1)
            a.set_xscale("log")
            bytes_axis(a)
            a.set_xlabel("true size (log scale)")
            a.set_title(f"{kp} experts kept per layer", fontsize=10)
            place_labels(a, [(r["bytes"], r["quality"]) for r in fr], [str(number[id(r)]) for r in fr],
                         fontsize=10, avoid=[(r["bytes"], r["quality"]) for r in grid if r["keep"] == kp])
            if highlight is not None and highlight["keep"] == kp:
                a.scatter([highlight["bytes"]], [highlight["quality"]], s=160, facecolors="none",
                          edgecolors="#C44E52", lw=2, zorder=5)
        axes[0].set_ylabel(f"{metric}\n({'higher' if higher_is_better else 'lower'} is better)")
        handles = [Line2D([], [], marker="o", ls="none", color=colours[b], label=f"experts {bname(b)}")
                   for b in bits]
        handles += [Line2D([], [], marker=markers[b], ls="none", color="#555555", label=f"rest {bname(b)}")
                    for b in rests]
        handles += [Line2D([], [], marker="o", ls="none", color="#555555",
                           markerfacecolor="#555555" if n == 0 else "none",
                           label=f"{n} MoE layer{'s' if n != 1 else ''} dropped") for n in drops]
        handles.append(Line2D([], [], color="#333333", lw=0.8, label="Pareto frontier (numbered)"))
        fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=9, frameon=False,
                   bbox_to_anchor=(0.5, -0.02))
        if title:
            fig.suptitle(title, fontsize=11)
        with warnings.catch_warnings():  # place_labels drew the figure once already
            warnings.simplefilter("ignore", UserWarning)
            fig.tight_layout(rect=(0, 0.16 + 0.04 * (len(handles) > 8), 1, 1))
    fig.frontier = front
    return fig


def frontier_rows(grid: Sequence[Mapping[str, Any]], higher_is_better: bool = False) -> list[Mapping[str, Any]]:
    """The grid's Pareto frontier of size against quality, cheapest first (the numbered points
    of :func:`plot_grid`)."""
    from moe_course.compress.recipes import pareto_frontier

    grid = _check_grid(grid)
    return sorted(pareto_frontier(grid, x="bytes", y="quality", higher_is_better=higher_is_better),
                  key=lambda r: r["bytes"])


def frontier_table(grid: Sequence[Mapping[str, Any]], metric: str = "quality", higher_is_better: bool = False):
    """The numbered frontier points of :func:`plot_grid` with all four knobs, as a DataFrame."""
    import pandas as pd

    rows = frontier_rows(grid, higher_is_better)
    bname = lambda b: "fp32" if b == FP32 else f"{b}"  # noqa: E731
    return pd.DataFrame([{"#": i + 1, _KNOB_LABELS["keep"]: r["keep"],
                          _KNOB_LABELS["drop_layers"]: r["drop_layers"],
                          _KNOB_LABELS["expert_bits"]: bname(r["expert_bits"]),
                          _KNOB_LABELS["rest_bits"]: bname(r["rest_bits"]),
                          "bytes": int(r["bytes"]), "ratio": float(r.get("ratio", float("nan"))),
                          metric: float(r["quality"])} for i, r in enumerate(rows)])


def live_kernel() -> bool:
    """Whether sliders can work here: a notebook server (Jupyter sets ``JPY_SESSION_NAME`` for its
    kernels), Colab or VS Code. A headless execution (``moe-course execute``, nbclient, nbval)
    is not one, so the book stores no widget (its state would make the static page fetch
    JavaScript from a CDN and still not move). ``MOE_COURSE_SLIDERS=1`` / ``0`` overrides."""
    import os
    import sys

    force = os.environ.get("MOE_COURSE_SLIDERS")
    if force in ("0", "1"):
        return force == "1"
    return ("google.colab" in sys.modules or "JPY_SESSION_NAME" in os.environ
            or "VSCODE_PID" in os.environ or "VSCODE_CWD" in os.environ)


def explorer(grid: Sequence[Mapping[str, Any]], metric: str = "quality", higher_is_better: bool = False):
    """The sliders (one per knob) and a live readout of size and quality; needs ``ipywidgets``
    (raises ``ImportError`` without it; :func:`show_explorer` falls back to the static figure)."""
    import ipywidgets as W

    grid = _check_grid(grid)
    values = knob_values(grid)
    base = _baseline(grid)
    sliders = {kn: W.SelectionSlider(options=values[kn], value=base[kn], description=_KNOB_LABELS[kn],
                                     continuous_update=True, style={"description_width": "140px"},
                                     layout=W.Layout(width="420px"))
               for kn in KNOBS}
    label = W.HTML()

    def update(_=None):
        row = lookup(grid, **{kn: s.value for kn, s in sliders.items()})
        label.value = f"<b>{readout(row, base, metric)}</b>"

    for s in sliders.values():
        s.observe(update, names="value")
    update()
    box = W.VBox([*sliders.values(), label])
    box.grid, box.sliders, box.readout = grid, sliders, label
    return box


def show_explorer(grid: Sequence[Mapping[str, Any]], metric: str = "quality", higher_is_better: bool = False,
                  title: str | None = None, display: Callable[[Any], Any] | None = None,
                  colab_url: str | None = None, sliders: bool | None = None):
    """Show the static view (always: the website and GitHub show it): the figure of the whole
    grid (:func:`plot_grid`), the table of its numbered frontier points with all four knobs and
    a note that the sliders need a running kernel (with a link to ``colab_url``); then the
    sliders when ``sliders`` is true (default :func:`live_kernel`) and ``ipywidgets`` is
    available. Returns ``(figure, widget_or_None)``."""
    if display is None:
        from IPython.display import display
    import matplotlib.pyplot as plt

    from moe_course.viz import table

    fig = plot_grid(grid, metric, higher_is_better, title=title)
    display(fig)
    plt.close(fig)  # shown once: the inline backend would show it again at the end of the cell
    display(table(frontier_table(grid, metric, higher_is_better), digits={"ratio": 2, metric: 3},
                  caption="the numbered frontier points and their four knobs"))
    if sliders is None:
        sliders = live_kernel()
    note = ("The four sliders (experts kept per layer, MoE layers dropped, expert bits, rest bits) "
            "need a running Python kernel")
    if not sliders:
        try:
            from IPython.display import Markdown
        except ImportError:  # pragma: no cover - IPython ships with the notebook stack
            Markdown = str  # noqa: N806
        link = f": [open this notebook in Colab]({colab_url}) or run it locally" if colab_url else \
            ": run this notebook locally or in Colab"
        display(Markdown(f"*{note}{link}; the figure and table above show every combination.*"))
        return fig, None
    try:
        box = explorer(grid, metric, higher_is_better)
    except ImportError:
        display(f"{note}, and ipywidgets is not installed (pip install ipywidgets).")
        return fig, None
    display(box)
    return fig, box
