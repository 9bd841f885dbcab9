"""The course's plots, in plain matplotlib (used from chapter 1 to chapter 11).

Every function returns the :class:`~matplotlib.figure.Figure` it drew on, never calls
``plt.show()``, draws into ``ax`` when one is given, and uses the course style
(:data:`COURSE_STYLE`) without changing the global ``rcParams``; call :func:`use_course_style`
to make your own plots match. Figures are created with ``pyplot`` so notebooks show them; end
the cell with ``;`` or assign the figure to avoid showing it twice, and ``plt.close(fig)`` when
producing many.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from cycler import cycler
from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch

__all__ = [
    "COURSE_STYLE",
    "PALETTE",
    "use_course_style",
    "table",
    "Table",
    "plot_architecture",
    "plot_expert_utilization",
    "plot_routing_heatmap",
    "plot_loss_curves",
    "plot_race",
    "plot_frontier",
]

PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]
_ACCENT, _IDLE, _ROUTER, _SHARED, _PLAIN = "#DD8452", "#EDEDED", "#C9C2E6", "#BFE0C4", "#DCE6F2"

COURSE_STYLE: dict[str, Any] = {
    "figure.dpi": 100,
    "savefig.dpi": 100,
    "figure.figsize": (6.4, 4.0),
    "figure.constrained_layout.use": True,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": cycler(color=PALETTE),
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 10,
    "legend.frameon": False,
    "image.cmap": "viridis",
}


def use_course_style() -> None:
    """Apply :data:`COURSE_STYLE` to the global ``rcParams`` (dpi 100, light grid, small fonts)."""
    plt.rcParams.update(COURSE_STYLE)


class Table:
    """A formatted results table: HTML in notebooks and on the website (it wraps, never clips),
    the same numbers as aligned text in a terminal. ``.styler`` is the pandas ``Styler``."""

    def __init__(self, styler: Any, text: str):
        self.styler, self._text = styler, text

    def _repr_html_(self) -> str:
        return self.styler.to_html()

    def __repr__(self) -> str:
        return self._text

    def to_html(self) -> str:
        return self.styler.to_html()


def table(df: Any, digits: int | Mapping[str, int] = 3, index: bool = False, caption: str | None = None) -> Table:
    """A DataFrame as the book shows results: numbers formatted to ``digits`` decimals (per column
    with a mapping; integers get thousands separators), no meaningless 0..n index unless
    ``index=True``. Make it the last expression of a cell, or ``display(viz.table(df))``. The HTML
    is deterministic (its element ids come from the content), so notebooks can check it."""
    import hashlib

    import pandas as pd

    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"df: expected a pandas DataFrame, got {type(df).__name__}")
    fmt = {}
    for col in df.columns:
        if pd.api.types.is_bool_dtype(df[col]):
            continue
        if pd.api.types.is_integer_dtype(df[col]):
            fmt[col] = "{:,}"
        elif pd.api.types.is_float_dtype(df[col]):
            n = digits.get(col, 3) if isinstance(digits, Mapping) else digits
            fmt[col] = f"{{:,.{n}f}}"
    uid = hashlib.sha1(df.to_csv().encode() + repr(sorted(fmt.items())).encode()).hexdigest()[:10]
    styler = df.style.format(fmt, na_rep="–").set_uuid(uid)
    if not index:
        styler = styler.hide(axis="index")
    if caption:
        styler = styler.set_caption(caption)
    shown = df.copy()
    for col, f in fmt.items():
        shown[col] = [("–" if pd.isna(v) else f.format(v)) for v in df[col]]
    text = shown.to_string(index=index)
    return Table(styler, (caption + "\n" if caption else "") + text)


def _styled(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with plt.rc_context(COURSE_STYLE):
            return fn(*args, **kwargs)

    return wrapper


def figure_and_axes(ax, figsize: tuple[float, float]):
    """``(figure, ax)``: a new figure of ``figsize`` when ``ax`` is None, else ``ax`` and its figure."""
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def _numpy(x: Any) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


# --------------------------------------------------------------------------------------------
# architecture diagram
# --------------------------------------------------------------------------------------------
# The diagrams are drawn in inches (one data unit = one inch at the figure's size), so a font
# size in points is what the reader sees at page width: the figure is at most 6.4 in wide
# (the column is ~800 px at 100 dpi) and every label is >= 10 pt, which stays legible when a
# phone scales the figure to ~360 px.
_ARCH_WIDTH = 6.4
_ARCH_TEXT = 11  # box labels
_ARCH_SMALL = 10  # wire labels, the smallest text of the diagrams


def _box(ax, x, y, w, h, text, color=_PLAIN, edge="#444444", size=_ARCH_TEXT, bold=False, lw=1.0):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=color, edgecolor=edge, linewidth=lw))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=max(size, _ARCH_SMALL),
            fontweight="bold" if bold else "normal", linespacing=1.15)


def _arrow(ax, start, end, color="#444444", style="-|>", ls="-", lw=1.2, rad=0.0, label=None,
           size=_ARCH_SMALL):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=12, color=color,
                                 linestyle=ls, linewidth=lw, connectionstyle=f"arc3,rad={rad}",
                                 shrinkA=1, shrinkB=1))
    if label:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.06, label,
                fontsize=max(size, _ARCH_SMALL), ha="center", va="bottom", color=color)


def _polyline_arrow(ax, points, color="#444444", ls="-", lw=1.2):
    """Straight segments through ``points`` with an arrow head on the last one (routed wires)."""
    xs, ys = zip(*points[:-1])
    ax.plot(xs, ys, color=color, ls=ls, lw=lw, solid_capstyle="butt")
    _arrow(ax, points[-2], points[-1], color=color, ls=ls, lw=lw)


def _inches(ax, width: float, height: float) -> None:
    """Data coordinates in inches: x in [0, width], y in [0, height], equal aspect, no axes."""
    ax.set_xlim(-0.05, width + 0.05)
    ax.set_ylim(0, height)
    ax.set_aspect("equal")
    ax.set_axis_off()


def _spec(obj: Any) -> dict[str, Any]:
    """Numbers a diagram needs from an MoE layer, a model, or a config (dataclass or dict)."""
    from .layers import MoELayer, SoftMoE, moe_layers

    if isinstance(obj, MoELayer):
        shared = getattr(obj, "shared", None)
        return {
            "scope": "layer",
            "ffn": "soft" if isinstance(obj, SoftMoE) else "moe",
            "num_experts": obj.num_experts, "k": obj.k, "d_model": obj.d_model,
            "d_hidden": obj.experts.d_hidden, "activation": obj.experts.activation,
            "num_shared_experts": shared.num_experts if shared is not None else 0,
            "capacity_factor": getattr(obj, "capacity_factor", None),
        }
    if isinstance(obj, torch.nn.Module):
        cfg = getattr(obj, "config", None)
        layers = moe_layers(obj)
        if cfg is not None:
            spec = _spec(cfg)
            if layers:  # a compressed model's layers may differ from its config: draw what is there
                real = _spec(layers[0])
                spec.update({k: v for k, v in real.items() if k != "scope"})
            return spec
        if not layers:
            raise ValueError(f"model_or_config: {type(obj).__name__} has no .config and no MoE layers to draw")
        return {**_spec(layers[0]), "n_moe_layers": len(layers)}
    if isinstance(obj, Mapping):
        fields = dict(obj)
    elif hasattr(obj, "__dataclass_fields__") or hasattr(obj, "__dict__"):
        fields = {name: getattr(obj, name) for name in dir(obj) if not name.startswith("_")
                  and not callable(getattr(obj, name, None))}
    else:
        raise TypeError(f"model_or_config: expected an MoE layer, a model, or a config, got {type(obj).__name__}")
    needed = ("d_model", "d_hidden")
    missing = [n for n in needed if n not in fields]
    if missing:
        raise ValueError(f"model_or_config: config lacks {missing}; got fields {sorted(fields)}")
    return {"scope": "model" if "n_layers" in fields else "layer", "ffn": "moe", "num_experts": 1, "k": 1,
            "activation": "gelu", "num_shared_experts": 0, "capacity_factor": None, **fields}


def _title_lines(parts: Sequence[str], width: int = 58) -> str:
    """Join ``parts`` with ", " into lines of at most ``width`` characters (titles never clip)."""
    lines, cur = [], ""
    for p in parts:
        if cur and len(cur) + 2 + len(p) > width:
            lines.append(cur + ",")
            cur = p
        else:
            cur = f"{cur}, {p}" if cur else p
    return "\n".join(lines + [cur])


_SLOT = 0.42  # height of one expert slot, inches


def _layer_height(s: dict[str, Any]) -> float:
    E, kind = int(s["num_experts"]), s["ffn"]
    shown = min(E, 8) if kind != "dense" else 2
    shared = int(s.get("num_shared_experts") or 0) if kind == "moe" else 0
    return (max(shown, 2) + shared) * _SLOT + 1.3


def _draw_layer(ax, s: dict[str, Any]) -> None:
    """tokens -> router -> top-k experts (highlighted) -> weighted sum -> + residual -> output."""
    kind, E, d, h = s["ffn"], int(s["num_experts"]), s["d_model"], s["d_hidden"]
    k = E if kind == "soft" else (1 if kind == "dense" else int(s["k"]))
    n_shared = int(s.get("num_shared_experts") or 0) if kind == "moe" else 0
    W, H = _ARCH_WIDTH - 0.2, _layer_height(s)
    _inches(ax, W, H)
    # Which boxes to show: all experts up to 8, else the first 5, a gap, and the last 2.
    shown = list(range(E)) if E <= 8 else [0, 1, 2, 3, 4, None, E - 2, E - 1]
    if kind == "dense":
        shown = []
    chosen = (set(range(E)) if kind in ("soft", "dense")
              else {i for i in (1, 3, 0, 4, 2, 5, 6, 7)[:k] if i < E})
    if kind == "moe" and k > len(chosen):
        chosen = set(range(min(k, E)))
    slots = max(len(shown), 2) + n_shared
    bottom = 0.75
    top = bottom + slots * _SLOT
    mid = bottom + max(len(shown), 2) * _SLOT / 2 + n_shared * _SLOT
    ex_x, ex_w, bh = 2.45, 1.25, 0.32
    sigma, plus = (4.25, mid), (4.8, mid)
    act = "SwiGLU" if s.get("activation") == "swiglu" else "GELU"

    _box(ax, 0.0, mid - 0.31, 0.85, 0.62, "tokens\n[T, d]")
    _box(ax, 5.1, mid - 0.31, W - 5.1, 0.62, "output\n[T, d]")
    if kind == "dense":
        _box(ax, ex_x - 0.6, mid - 0.4, ex_w + 1.2, 0.8, f"dense MLP\n{d}→{h}→{d}", color=_ACCENT)
        _arrow(ax, (0.85, mid), (ex_x - 0.6, mid))
        _arrow(ax, (ex_x + ex_w + 0.6, mid), (plus[0] - 0.15, mid))
    else:
        router_label = "gate\nsoftmax" if kind == "soft" else f"router\ntop-{k}"
        _box(ax, 1.1, mid - 0.45, 1.0, 0.9, router_label, color=_ROUTER)
        _arrow(ax, (0.85, mid), (1.1, mid))
        for slot, i in enumerate(shown):
            y = top - (slot + 0.5) * _SLOT
            if i is None:
                ax.text(ex_x + ex_w / 2, y, "⋮", ha="center", va="center", fontsize=14)
                continue
            on = i in chosen
            _box(ax, ex_x, y - bh / 2, ex_w, bh, f"expert {i}", color=_ACCENT if on else _IDLE,
                 edge="#444444" if on else "#AAAAAA", lw=1.4 if on else 0.8)
            if on:
                _arrow(ax, (2.1, mid), (ex_x, y), color=_ACCENT, lw=1.3)
                _arrow(ax, (ex_x + ex_w, y), (sigma[0] - 0.2, sigma[1]), color=_ACCENT, lw=1.3)
        for j in range(n_shared):
            y = top - (max(len(shown), 2) + j + 0.5) * _SLOT
            _box(ax, ex_x, y - bh / 2, ex_w, bh, f"shared {j}", color=_SHARED)
            _polyline_arrow(ax, [(0.7, mid - 0.31), (0.7, y), (ex_x, y)], color="#2E7D32")
            _arrow(ax, (ex_x + ex_w, y), (sigma[0] - 0.2, sigma[1]), color="#2E7D32")
        ax.add_patch(Circle(sigma, 0.2, facecolor="white", edgecolor="#444444"))
        ax.text(*sigma, "Σ", ha="center", va="center", fontsize=12)
        gate_y = top + 0.15
        _polyline_arrow(ax, [(1.6, mid + 0.45), (1.6, gate_y), (sigma[0], gate_y),
                             (sigma[0], sigma[1] + 0.2)], color="#6A5ACD", ls="--")
        ax.text((1.6 + sigma[0]) / 2, gate_y + 0.04,
                f"gate weights g ({'all N' if kind == 'soft' else 'top-' + str(k)})",
                color="#6A5ACD", fontsize=_ARCH_SMALL, ha="center", va="bottom")
        _arrow(ax, (sigma[0] + 0.2, mid), (plus[0] - 0.15, mid))
    ax.add_patch(Circle(plus, 0.15, facecolor="white", edgecolor="#444444"))
    ax.text(*plus, "+", ha="center", va="center", fontsize=12)
    res_y = 0.3
    _polyline_arrow(ax, [(0.42, mid - 0.31), (0.42, res_y), (plus[0], res_y), (plus[0], plus[1] - 0.15)],
                    color="#888888", ls=":")
    ax.text(2.6, res_y + 0.04, "residual: the block adds x back", fontsize=_ARCH_SMALL,
            color="#666666", ha="center", va="bottom")
    _arrow(ax, (plus[0] + 0.15, mid), (5.1, mid))

    if kind == "soft":
        parts = [f"Soft MoE layer: all {E} experts run, softmax-weighted"]
    elif kind == "dense":
        parts = ["Dense feed-forward layer"]
    else:
        parts = [f"Sparse MoE layer: top-{k} of {E} experts"
                 + (f" + {n_shared} shared" if n_shared else "")]
        if s.get("capacity_factor"):
            parts.append(f"capacity factor {s['capacity_factor']}")
    parts += [f"d_model={d}", f"d_hidden={h}", act]
    if s.get("n_moe_layers", 1) > 1:
        parts.append(f"first of {s['n_moe_layers']} MoE layers")
    ax.set_title(_title_lines(parts), fontsize=_ARCH_TEXT)


_STACK_HEIGHT = 1.75


def _draw_stack(ax, s: dict[str, Any]) -> None:
    """Input -> embedding/stem -> n_layers x [norm, mixer, norm, FFN] -> head, left to right."""
    W = _ARCH_WIDTH - 0.2
    _inches(ax, W, _STACK_HEIGHT)
    lm = "vocab_size" in s
    mixer = "attention" if lm else s.get("mixer", "conv")
    heads = s.get("n_heads")
    ffn = s["ffn"]
    if ffn == "moe":
        ffn_label = f"MoE FFN\ntop-{s['k']} of {s['num_experts']}"
        if s.get("num_shared_experts"):
            ffn_label += f"\n+ {s['num_shared_experts']} shared"
    elif ffn == "soft":
        ffn_label = f"soft MoE\n{s['num_experts']} experts"
    else:
        ffn_label = "dense MLP"
    if lm:
        inp = f"token ids\n[B, T≤{s.get('context_length', '?')}]"
        emb = f"embedding\nvocab {s['vocab_size']}\n+ position"
        head = "LayerNorm\nLM head\n(tied)"
    else:
        inp = f"signal\n[B, {s.get('input_length', '?')}]"
        emb = f"conv stem\n{s.get('num_tokens', '?')} tokens\n+ position"
        head = f"mean pool\nlinear\n{s.get('num_classes', '?')} classes"
    bw, y0, bh, gap = 1.0, 0.2, 1.0, 0.28
    _box(ax, 0.0, y0, bw, bh, inp)
    _box(ax, bw + gap, y0, bw, bh, emb)
    g0 = 2 * (bw + gap) - 0.1
    g1 = W - bw - gap + 0.1
    ax.add_patch(FancyBboxPatch((g0, y0 - 0.12), g1 - g0, bh + 0.24,
                                boxstyle="round,pad=0.02,rounding_size=0.1",
                                facecolor="#F7F7F7", edgecolor="#888888", linestyle="--"))
    ax.text((g0 + g1) / 2, y0 + bh + 0.16, f"× {s['n_layers']} blocks, each sublayer residual",
            fontsize=_ARCH_SMALL, ha="center", va="bottom", color="#444444")
    inner = [(f"LayerNorm\nattention\n{heads} heads" if mixer == "attention"
              else "LayerNorm\nconv mixer", _ROUTER)] if mixer != "none" else []
    inner.append(("LayerNorm\n" + ffn_label, _ACCENT if ffn != "dense" else _PLAIN))
    iw = (g1 - g0 - 0.2 - 0.2 * (len(inner) - 1)) / len(inner)
    x = g0 + 0.1
    for j, (label, color) in enumerate(inner):
        _box(ax, x, y0, iw, bh, label, color=color, size=_ARCH_SMALL if ffn == "moe" else _ARCH_TEXT)
        if j:
            _arrow(ax, (x - 0.2, y0 + bh / 2), (x, y0 + bh / 2))
        x += iw + 0.2
    _box(ax, W - bw, y0, bw, bh, head)
    _arrow(ax, (bw, y0 + bh / 2), (bw + gap, y0 + bh / 2))
    _arrow(ax, (2 * bw + gap, y0 + bh / 2), (g0 + 0.1, y0 + bh / 2))
    _arrow(ax, (g1 - 0.1, y0 + bh / 2), (W - bw, y0 + bh / 2))
    kind = ("" if ffn == "dense" else "MoE ") + ("Transformer LM" if lm else "classifier")
    ax.set_title(f"{kind}: {s['n_layers']} blocks, d_model={s['d_model']}", fontsize=_ARCH_TEXT)


@_styled
def plot_architecture(model_or_config: Any, ax=None) -> Figure:
    """Block diagram of an MoE layer, or of a whole model above its MoE layer.

    ``model_or_config``: a :class:`~moe_course.layers.MoELayer` (one panel: tokens -> router ->
    top-k experts highlighted -> weighted sum -> residual add -> output), or a model with a
    ``.config`` / a config (``LMConfig``, ``ClassifierConfig`` or a dict with their fields): the
    stack of blocks (mixer + MoE feed-forward, ``× n_layers``) labelled with the config's numbers,
    above the layer diagram. ``ax`` is only accepted for the one-panel layer diagram.

    The figure is 6.4 in wide and all its text is at least 10 pt, so it is drawn at page width
    without scaling (and stays legible at phone width).
    """
    s = _spec(model_or_config)
    if s["scope"] == "layer":
        fig, ax = figure_and_axes(ax, (_ARCH_WIDTH, _layer_height(s) + 0.5))
        _draw_layer(ax, s)
        return fig
    if ax is not None:
        raise ValueError("ax: a whole-model diagram has two panels; pass ax=None (or draw an MoE layer)")
    hl = _layer_height(s)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(_ARCH_WIDTH, _STACK_HEIGHT + hl + 0.9),
                                      height_ratios=[_STACK_HEIGHT + 0.3, hl + 0.6])
    _draw_stack(top, s)
    _draw_layer(bottom, s)
    return fig


# --------------------------------------------------------------------------------------------
# routing plots
# --------------------------------------------------------------------------------------------
def _frequencies(stats: Any) -> list[tuple[str, np.ndarray, float | None]]:
    """(title, frequency [E], load CV or None) per layer from stats, one layer, or arrays."""
    if hasattr(stats, "layers"):
        stats = list(stats.layers)
    if hasattr(stats, "frequency"):
        stats = [stats]
    if torch.is_tensor(stats) or isinstance(stats, np.ndarray):
        arr = _numpy(stats).astype(float)
        arr = arr[None] if arr.ndim == 1 else arr
        if arr.ndim != 2:
            raise ValueError(f"stats: expected frequencies [E] or [L, E], got shape {arr.shape}")
        return [(f"layer {i}", row / row.sum() if row.sum() else row, None) for i, row in enumerate(arr)]
    if isinstance(stats, Sequence) and stats and not isinstance(stats, (str, bytes)):
        out = []
        for i, s in enumerate(stats):
            if hasattr(s, "frequency"):
                out.append((f"layer {getattr(s, 'index', i)}", _numpy(s.frequency).astype(float),
                            getattr(s, "load_cv", None)))
            else:
                row = _numpy(s).astype(float)
                out.append((f"layer {i}", row / row.sum() if row.sum() else row, None))
        return out
    raise TypeError(f"stats: expected RoutingStats, LayerRoutingStats or frequencies, got {type(stats).__name__}")


@_styled
def plot_expert_utilization(stats: Any, layer: int | Sequence[int] | None = None, ax=None,
                            title: str | None = None) -> Figure:
    """Bars of the share of top-k assignments each expert receives, one panel per layer.

    The dashed line is the balanced share ``1/E`` that the Switch load-balancing loss (Fedus et
    al. 2022, eq. 4) pushes towards. ``stats``: :class:`~moe_course.metrics.RoutingStats`, one
    layer's stats, or frequencies ``[E]`` / ``[L, E]``. ``layer``: an index or indices (default:
    all). ``ax`` only for a single layer.
    """
    items = _frequencies(stats)
    if layer is not None:
        wanted = [layer] if isinstance(layer, int) else list(layer)
        for i in wanted:
            if not -len(items) <= i < len(items):
                raise ValueError(f"layer: expected an index in [0, {len(items)}), got {i}")
        items = [items[i] for i in wanted]
    if ax is not None and len(items) != 1:
        raise ValueError(f"ax: one axes can hold one layer, got {len(items)}; pass layer=i or ax=None")
    n = len(items)
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    if ax is None:
        fig, axes = plt.subplots(nrows, ncols, figsize=(3.1 * ncols, 2.5 * nrows + 0.3), sharey=True, squeeze=False)
        axes = axes.ravel()
    else:
        fig, axes = ax.figure, [ax]
    for a, (name, freq, cv) in zip(axes, items):
        E = len(freq)
        a.bar(np.arange(E), freq, color=PALETTE[0], width=0.8)
        a.axhline(1 / E, color=PALETTE[3], ls="--", lw=1.2, label="uniform 1/E")
        a.set_title(name + (f"  (CV {cv:.2f})" if cv is not None and cv == cv else ""))
        a.set_xlabel("expert")
        a.set_xticks(np.arange(E) if E <= 16 else np.linspace(0, E - 1, 9).round().astype(int))
        a.grid(axis="x", visible=False)
    top = max(max(float(np.max(f)) for _, f, _ in items), max(1 / len(f) for _, f, _ in items))
    axes[0].set_ylim(0, top * 1.25)  # headroom for the legend (the y axis is shared)
    axes[0].set_ylabel("share of assignments")
    axes[0].legend(loc="upper right", ncol=1)
    for a in list(axes)[n:]:
        a.set_visible(False)
    if title:
        fig.suptitle(title)
    return fig


def _token_label(t: str) -> str:
    return {" ": "␣", "\n": "↵", "\t": "⇥"}.get(t, t)


@_styled
def plot_routing_heatmap(tokens: Sequence[str] | str | None, indices_or_probs: Any, num_experts: int | None = None,
                         weights: Any = None, ax=None, title: str | None = None, max_tokens: int = 64) -> Figure:
    """Token-by-expert heatmap of one layer's routing (e.g. the characters of a text vs experts).

    ``indices_or_probs``: router probabilities ``[T, E]`` (float), chosen experts ``[T, k]``
    (integer; cells show the gate ``weights [T, k]`` when given, else 1), a
    :class:`~moe_course.layers.RouterOutput`, or one layer of
    :func:`~moe_course.metrics.routing_stats` (probabilities, with the top-k choices ringed).
    ``tokens``: ``T`` labels (a string is split into characters), or ``None`` for positions.
    The first ``max_tokens`` tokens are drawn.
    """
    chosen = None
    routed = indices_or_probs
    if hasattr(routed, "indices") and (getattr(routed, "probs", None) is not None
                                       or getattr(routed, "logits", None) is not None):
        # a RouterOutput, or a LayerRoutingStats with its kept logits
        probs = routed.probs if getattr(routed, "probs", None) is not None else routed.logits.float().softmax(-1)
        values = _numpy(probs).reshape(-1, probs.shape[-1]).astype(float)
        chosen = _numpy(routed.indices).reshape(-1, routed.indices.shape[-1])[: values.shape[0]]
        label = "router probability"
    else:
        arr = indices_or_probs if torch.is_tensor(indices_or_probs) else torch.as_tensor(np.asarray(indices_or_probs))
        if arr.dim() != 2:
            raise ValueError(f"indices_or_probs: expected a [T, E] or [T, k] tensor, got shape {tuple(arr.shape)}")
        if arr.is_floating_point():
            values, label = _numpy(arr).astype(float), "router probability"
        else:
            idx = arr.long().cpu()
            E = num_experts if num_experts is not None else int(idx.max()) + 1 if idx.numel() else 1
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= E):
                raise ValueError(f"indices_or_probs: expert indices must be in [0, num_experts={E})")
            fill = torch.ones(idx.shape) if weights is None else torch.as_tensor(_numpy(weights), dtype=torch.float32)
            if fill.shape != idx.shape:
                raise ValueError(f"weights: expected shape {tuple(idx.shape)} like the indices, got {tuple(fill.shape)}")
            values = torch.zeros(idx.shape[0], E).scatter_(1, idx, fill).numpy()
            label = "gate weight" if weights is not None else "selected"
            chosen = idx.numpy()
    if isinstance(tokens, str):
        tokens = list(tokens)
    if tokens is not None and len(tokens) != values.shape[0]:
        raise ValueError(f"tokens: expected {values.shape[0]} labels (one per routed token), got {len(tokens)}")
    T = min(values.shape[0], max_tokens)
    values = values[:T]
    fig, ax = figure_and_axes(ax, (10.0, 3.4))
    im = ax.imshow(values.T, aspect="auto", cmap="Blues" if label == "selected" else "viridis",
                   vmin=0, vmax=1 if label != "router probability" else max(float(values.max()), 1e-9),
                   interpolation="nearest")
    if chosen is not None and label == "router probability":
        ts, es = np.nonzero(_mask(chosen[:T], values.shape[1]))
        ax.scatter(ts, es, s=30, facecolors="none", edgecolors=_ACCENT, linewidths=1.2, label="top-k")
        ax.legend(loc="upper right", bbox_to_anchor=(1.0, 1.18), ncol=1)
    E = values.shape[1]
    ax.set_yticks(np.arange(E) if E <= 16 else np.linspace(0, E - 1, 9).round().astype(int))
    ax.set_ylabel("expert")
    if tokens is not None:
        ax.set_xticks(np.arange(T))
        ax.set_xticklabels([_token_label(str(t)) for t in tokens[:T]], fontsize=8, family="monospace")
        ax.set_xlabel("token")
    else:
        ax.set_xlabel("token position")
    ax.grid(False)
    fig.colorbar(im, ax=ax, label=label, fraction=0.04, pad=0.01)
    if title:
        ax.set_title(title)
    return fig


def _mask(indices: np.ndarray, E: int) -> np.ndarray:
    m = np.zeros((indices.shape[0], E), dtype=bool)
    m[np.arange(indices.shape[0])[:, None], indices] = True
    return m


# --------------------------------------------------------------------------------------------
# training curves and timing races
# --------------------------------------------------------------------------------------------
def _field(h: Any, name: str, default: Any = None) -> Any:
    if isinstance(h, Mapping):
        return h.get(name, default)
    return getattr(h, name, default)


def _is_history(h: Any) -> bool:
    return _field(h, "train_loss") is not None


def _ema(values: np.ndarray, smoothing: float) -> np.ndarray:
    """Debiased exponential moving average (as TensorBoard draws it); 0 = no smoothing."""
    out, acc = np.empty_like(values, dtype=float), 0.0
    for i, v in enumerate(values):
        acc = smoothing * acc + (1 - smoothing) * v
        out[i] = acc / (1 - smoothing ** (i + 1)) if smoothing > 0 else v
    return out


@_styled
def plot_loss_curves(history_or_histories: Any, smoothing: float = 0.9, metric: str | None = None,
                     ax=None, logy: bool = False, title: str | None = None) -> Figure:
    """Training loss (raw, faint, and smoothed) with evaluation points, for one or several runs.

    Accepts a :class:`~moe_course.train.History` (``steps``, ``train_loss``, ``eval_steps``,
    ``eval_metrics`` list of dicts) or anything with those fields (a dict from ``to_dict()``),
    or a dict ``{name: history}``. A second panel shows ``metric`` (default: the first eval
    metric other than ``loss``, e.g. ``perplexity`` or ``accuracy``) unless ``ax`` is given.
    """
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing: expected a number in [0, 1), got {smoothing!r}")
    runs = {"": history_or_histories} if _is_history(history_or_histories) else history_or_histories
    if not isinstance(runs, Mapping) or not runs or not all(_is_history(h) for h in runs.values()):
        raise TypeError("history_or_histories: expected a History (with train_loss) or a non-empty dict "
                        "{name: History}")
    evals = {name: (list(_field(h, "eval_steps", []) or []), list(_field(h, "eval_metrics", []) or []))
             for name, h in runs.items()}
    if metric is None:
        keys = [k for _, ms in evals.values() for m in ms for k in m if k != "loss"]
        metric = keys[0] if keys else None
    two = metric is not None and ax is None
    if ax is None:
        fig, axes = plt.subplots(1, 2 if two else 1, figsize=(7.5, 3.4) if two else (6.4, 3.8), squeeze=False)
        loss_ax, metric_ax = axes[0][0], (axes[0][1] if two else None)
    else:
        fig, loss_ax, metric_ax = ax.figure, ax, None
    for i, (name, h) in enumerate(runs.items()):
        color = PALETTE[i % len(PALETTE)]
        loss = np.asarray(_field(h, "train_loss"), dtype=float)
        steps = np.asarray(_field(h, "steps", None) or range(len(loss)), dtype=float)
        prefix = f"{name} " if name else ""
        if len(loss):
            loss_ax.plot(steps, loss, color=color, alpha=0.2, lw=0.8)
            loss_ax.plot(steps, _ema(loss, smoothing), color=color, lw=1.6, label=f"{prefix}train")
        e_steps, e_metrics = evals[name]
        pts = [(s, m["loss"]) for s, m in zip(e_steps, e_metrics) if "loss" in m]
        if pts:
            loss_ax.plot(*zip(*pts), "o--", color=color, ms=4, lw=1.2, label=f"{prefix}eval")
        if metric_ax is not None:
            pts = [(s, m[metric]) for s, m in zip(e_steps, e_metrics) if metric in m]
            if pts:
                metric_ax.plot(*zip(*pts), "o-", color=color, ms=4, label=name or None)
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")
    if logy:
        loss_ax.set_yscale("log")
    loss_ax.legend()
    if metric_ax is not None:
        metric_ax.set_xlabel("step")
        metric_ax.set_ylabel(f"eval {metric}")
        if len(runs) > 1:
            metric_ax.legend()
    if title:
        fig.suptitle(title)
    return fig


@_styled
def plot_race(results: Mapping[str, Mapping[Any, float] | float], ax=None, title: str | None = None,
              xlabel: str = "tokens T", ylabel: str = "time (ms)", log: bool = True) -> Figure:
    """Timing comparison of strategies: ``{strategy: {T: ms}}`` as lines over ``T`` (log-log),
    or as bars when each strategy has a single measurement (``{strategy: ms}`` also works)."""
    if not isinstance(results, Mapping) or not results:
        raise ValueError("results: expected a non-empty dict {strategy: {T: ms}} or {strategy: ms}")
    series = {name: (dict(v) if isinstance(v, Mapping) else {None: float(v)}) for name, v in results.items()}
    xs = sorted({x for v in series.values() for x in v if x is not None})
    fig, ax = figure_and_axes(ax, (6.4, 4.0))
    if len(xs) <= 1:
        names = list(series)
        vals = [next(iter(series[n].values())) for n in names]
        bars = ax.bar(names, vals, color=[PALETTE[i % len(PALETTE)] for i in range(len(names))])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_ylabel(ylabel)
        if xs:
            ax.set_xlabel(f"{xlabel} = {xs[0]}")
        if log and min(vals) > 0 and max(vals) / min(vals) > 30:
            ax.set_yscale("log")
        ax.grid(axis="x", visible=False)
    else:
        for i, (name, v) in enumerate(series.items()):
            pts = sorted((x, y) for x, y in v.items() if x is not None)
            ax.plot(*zip(*pts), "o-", color=PALETTE[i % len(PALETTE)], label=name, ms=4)
        if log:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.minorticks_off()
        if all(isinstance(x, (int, float)) for x in xs):
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend()
    if title:
        ax.set_title(title)
    return fig


# --------------------------------------------------------------------------------------------
# recipes: quality against size or latency, with the Pareto frontier (chapter 11)
# --------------------------------------------------------------------------------------------
_FRONTIER_X = {"bytes": "true size (log scale)", "latency_ms": "measured latency of one batch (ms)"}


_LABEL_BOX = {"boxstyle": "round,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.8}


def bytes_axis(ax, axis: str = "x") -> None:
    """A log-scale byte axis with readable ticks: 1, 2 and 5 times powers of ten, written as
    ``200 kB`` / ``1 MB``, and no minor labels (matplotlib's default crowds them)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    def fmt(v, _pos=None):
        for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if v >= size:
                return f"{v / size:g} {unit}"
        return f"{v:g} B"

    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    target.set_major_formatter(FuncFormatter(fmt))
    target.set_minor_formatter(NullFormatter())


def place_labels(ax, points: Sequence[tuple[float, float]], texts: Sequence[str], fontsize: float = 10,
                 color: str = "#333333", avoid: Sequence[tuple[float, float]] = ()) -> list:
    """Annotate ``points`` (data coordinates) with ``texts`` so that no two labels overlap each
    other or cover a point of ``avoid`` (nor their own marker): for each label, the first of a few
    candidate offsets around its point whose box is free. Returns the annotations."""
    fig = ax.figure
    fig.canvas.draw()  # fixes the limits and the renderer: boxes in display pixels
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    taken = []  # boxes (x0, y0, x1, y1) in display pixels
    for ax_, ay in [*avoid, *points]:
        cx, cy = to_px((ax_, ay))
        taken.append((cx - 4, cy - 4, cx + 4, cy + 4))
    offsets = [(4, 4), (4, -4), (-4, 4), (-4, -4), (4, 14), (4, -14), (-4, 14), (-4, -14), (12, 0), (-12, 0),
               (4, 24), (4, -24), (-4, 24), (-4, -24)]
    out = []
    for (xv, yv), text in zip(points, texts):
        best = None
        for dx, dy in offsets:
            ha = "left" if dx >= 0 else "right"
            va = "bottom" if dy >= 0 else "top"
            ann = ax.annotate(text, (xv, yv), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                              color=color, ha=ha, va=va, zorder=6, bbox=_LABEL_BOX)
            bb = ann.get_window_extent(renderer)
            box = (bb.x0, bb.y0, bb.x1, bb.y1)
            free = all(box[2] <= t[0] or box[0] >= t[2] or box[3] <= t[1] or box[1] >= t[3] for t in taken)
            frame = ax.get_window_extent(renderer)
            inside = frame.contains(bb.x0, bb.y0) and frame.contains(bb.x1, bb.y1)
            if free and inside:
                best = (ann, box)
                break
            ann.remove()
        if best is None:  # nothing free: the first offset, still readable next to its point
            ann = ax.annotate(text, (xv, yv), xytext=offsets[0], textcoords="offset points", fontsize=fontsize,
                              color=color, zorder=6, bbox=_LABEL_BOX)
            bb = ann.get_window_extent(renderer)
            best = (ann, (bb.x0, bb.y0, bb.x1, bb.y1))
        taken.append(best[1])
        out.append(best[0])
    return out


@_styled
def plot_frontier(rows: Sequence[Mapping[str, Any]], x: str = "bytes", ax=None, title: str | None = None,
                  label_all: bool = False, zoom: bool = True, numbered: bool = True) -> Figure:
    """Quality against ``x`` (``"bytes"`` or ``"latency_ms"``) for rows of
    :func:`moe_course.course_table.compression_table` (keys ``technique``, ``quality``,
    ``metric``, ``higher_is_better`` and ``x``). Every variant is a dot, the Pareto frontier
    (:func:`~moe_course.compress.recipes.pareto_frontier`) a line through the non-dominated
    variants, the first row (the baseline) a star. ``numbered`` (default) marks the frontier
    variants 1, 2, ... (cheapest first) and names them in a key under the axes, so that long
    names never overlap; otherwise the names are written next to the points, placed so that they
    do not overlap (:func:`place_labels`). ``zoom`` frames the quality axis around the frontier
    and draws variants far worse than it as arrows on the edge. Returns the Figure; the numbered
    variants are in ``fig.frontier_key`` (a list of ``(number, technique)``)."""
    from matplotlib.lines import Line2D

    from moe_course.compress.recipes import pareto_frontier

    if x not in _FRONTIER_X:
        raise ValueError(f"x: expected one of {tuple(_FRONTIER_X)}, got {x!r}")
    rows = list(rows) if rows is not None else []
    if not rows or not all(isinstance(r, Mapping) for r in rows):
        raise ValueError("rows: expected a non-empty list of dicts (compression_table rows)")
    missing = [k for k in (x, "quality", "technique") if k not in rows[0]]
    if missing:
        raise ValueError(f"rows: each row needs the keys {missing}")
    hib = bool(rows[0].get("higher_is_better", False))
    metric = rows[0].get("metric", "quality")
    front = sorted(pareto_frontier(rows, x=x, y="quality", higher_is_better=hib), key=lambda r: float(r[x]))
    on_front = {id(r) for r in front}
    fig, ax = figure_and_axes(ax, (6.4, 4.2))
    xs = np.array([float(r[x]) for r in rows])
    ys = np.array([float(r["quality"]) for r in rows])
    ax.scatter(xs, ys, s=22, color=PALETTE[7], alpha=0.8, label="variant", zorder=2)
    fx = [float(r[x]) for r in front]
    fy = [float(r["quality"]) for r in front]
    ax.step(fx, fy, where="post", color=PALETTE[1], lw=1.5, zorder=3)
    ax.scatter(fx, fy, s=36, color=PALETTE[1], label="Pareto frontier", zorder=4)
    ax.scatter([xs[0]], [ys[0]], marker="*", s=160, color=PALETTE[0], label=str(rows[0]["technique"]), zorder=5)
    if x == "bytes":
        ax.set_xscale("log")
        bytes_axis(ax)
    shown = np.ones(len(rows), dtype=bool)
    if zoom:  # frame the frontier: variants far worse than it are drawn on the edge as arrows
        ref = np.array(fy + [ys[0]])
        lo, hi = float(ref.min()), float(ref.max())
        span = max(hi - lo, 1e-3 * max(abs(hi), 1.0))
        y0, y1 = (lo - 3 * span, hi + 0.5 * span) if hib else (lo - 0.5 * span, hi + 3 * span)
        out = (ys < y0) | (ys > y1)
        shown = ~out
        if out.any():
            edge = np.where(ys < y0, y0 + 0.02 * (y1 - y0), y1 - 0.02 * (y1 - y0))
            ax.scatter(xs[out], edge[out], marker="v" if hib else "^", s=30, color=PALETTE[7], zorder=2,
                       label=f"{int(out.sum())} far worse (off the chart)")
        ax.set_ylim(y0, y1)
    ax.set_xlabel(_FRONTIER_X[x])
    ax.set_ylabel(f"{metric} ({'higher' if hib else 'lower'} is better)")
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles, labels, loc="best", fontsize=9)
    key = [(i + 1, str(r["technique"])) for i, r in enumerate(front)]
    if numbered:
        place_labels(ax, list(zip(fx, fy)), [str(n) for n, _ in key], fontsize=10,
                     avoid=list(zip(xs[shown], ys[shown])))
        if label_all:
            rest = [r for r, s in zip(rows, shown) if s and id(r) not in on_front]
            place_labels(ax, [(float(r[x]), float(r["quality"])) for r in rest],
                         [str(r["technique"]) for r in rest], fontsize=8, color="#888888")
        blank = Line2D([], [], linestyle="none")
        ax.add_artist(ax.get_legend())
        ax.legend([blank] * len(key), [f"{n}  {t}" for n, t in key], loc="upper center",
                  bbox_to_anchor=(0.5, -0.2), ncol=1, fontsize=9, frameon=False, handlelength=0,
                  handletextpad=0, title="frontier (cheapest first)", title_fontsize=9)
    else:
        labelled = [r for r, s in zip(rows, shown) if s and (label_all or id(r) in on_front)]
        place_labels(ax, [(float(r[x]), float(r["quality"])) for r in labelled],
                     [str(r["technique"]) for r in labelled], fontsize=8)
    if title:
        ax.set_title(title)
    fig.frontier_key = key
    return fig
