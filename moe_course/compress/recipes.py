r"""Recipes: compose the compression techniques into pipelines and compare them on a Pareto frontier
(chapter 11).

No single technique wins on every axis. He et al. (2024, "Demystifying the Compression of
Mixture-of-Experts Through a Unified Framework") separate *expert slimming* (pruning and
quantization inside each expert) from *expert trimming* (dropping experts, MoE layers or whole
blocks) and recommend combining a coarse trim with 4-bit quantization, then optional fine-tuning.
MC-SMoE (Li et al., 2024, "Merge, Then Compress") chains merging, low-rank + sparse compression
and knowledge-distillation recovery. This module makes such chains one call and measures them:

* :func:`pipeline` runs ``[(name, kwargs), ...]`` steps (or plain callables ``model -> model``)
  and records after each step the TRUE storage bytes (:func:`moe_course.metrics.size_report`:
  packed quantized codes, scales and zero points, every buffer, embeddings included), the quality
  given by an ``evaluate`` callback and, optionally, the measured latency. Steps are validated
  before any work (unknown name, unknown or missing keyword, impossible order).
* :func:`pareto_frontier`: the non-dominated subset of measured variants (fewer bytes / less
  latency, better quality).
  :func:`moe_course.viz.plot_frontier` draws it; :mod:`moe_course.course_table` uses both for the
  course's table of every technique on the zoo models.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from moe_course.compress import lowrank, merging, pruning, quantization, trimming
from moe_course.compress.distillation import train_student
from moe_course.metrics import format_bytes, latency, size_report
from moe_course.train import TrainConfig

__all__ = [
    "STEPS", "pipeline", "PipelineResult", "pareto_frontier", "describe_step",
]



# --------------------------------------------------------------------------------------------
# the step registry
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Step:
    fn: Callable[..., nn.Module]
    calib: bool              # the function needs calibration data (its calib= keyword)
    rewrites_experts: bool   # needs plain (uncompressed) experts
    compresses_experts: bool  # leaves experts in a compressed form (packed, factored)
    label: Callable[[dict], str]
    doc: str


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _distill_step(model: nn.Module, *, teacher: nn.Module, data: Any, steps: int = 50, lr: float = 1e-3,
                  batch_size: int = 32, temperature: float = 2.0, alpha: float = 0.5, seed: int = 0) -> nn.Module:
    """Knowledge-distillation recovery: train ``model`` (in place) towards ``teacher`` (MC-SMoE's
    recovery step, Li et al. 2024; Hinton et al. 2015's loss, :func:`moe_course.compress.distillation.kd_loss`)."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("distill: the model has no trainable parameters left to recover")
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 10),
                      eval_every=0, eval_batches=1, seed=seed)
    return train_student(model, teacher, data, cfg=cfg, temperature=temperature, alpha=alpha, progress=False).eval()


def _registry() -> dict[str, _Step]:
    def q_label(k):
        s = f"quantize({k.get('bits')} bit"
        if k.get("targets") == "all":
            s += f", rest {k.get('other_bits', 8)} bit"
        return s + (f", g{k['group_size']}" if k.get("group_size") else "") + ")"

    return {
        "prune": _Step(pruning.prune_experts, True, True, False,
                       lambda k: f"prune({k.get('method', 'frequency')}, keep {_fmt(k.get('keep'))})",
                       "expert pruning by frequency or NAEE reconstruction (Lu et al. 2024)"),
        "prune_magnitude": _Step(pruning.prune_magnitude, False, True, False,
                                 lambda k: f"prune_magnitude(keep {_fmt(k.get('keep'))})",
                                 "unstructured magnitude pruning (zeros, no bytes saved when stored dense)"),
        "skip": _Step(pruning.skip_experts, True, True, False, lambda k: "skip(dynamic)",
                      "dynamic expert skipping (NAEE, Lu et al. 2024)"),
        "drop_experts": _Step(trimming.drop_experts, True, True, False,
                              lambda k: f"drop_experts(keep {_fmt(k.get('keep'))})",
                              "expert drop by mean router probability (He et al. 2024)"),
        "drop_layers": _Step(trimming.drop_layers, True, False, False, lambda k: f"drop_layers(keep {_fmt(k.get('keep'))})",
                             "MoE layer drop by residual similarity (He et al. 2024)"),
        "drop_blocks": _Step(trimming.drop_blocks, True, False, False, lambda k: f"drop_blocks(keep {_fmt(k.get('keep'))})",
                             "block drop by hidden-state similarity (He et al. 2024)"),
        "merge": _Step(merging.merge_experts, True, True, False,
                       lambda k: f"merge(->{_fmt(k.get('keep'))})", "M-SMoE merging (Li et al. 2024)"),
        "hc_smoe": _Step(merging.hc_smoe, True, True, False,
                         lambda k: f"hc_smoe(->{_fmt(k.get('keep'))})",
                         "hierarchical-clustering merging (Chen et al. 2025)"),
        "mc_smoe": _Step(merging.mc_smoe, True, True, True,
                         lambda k: f"mc_smoe(->{_fmt(k.get('keep'))}, r{k.get('rank')}, "
                                   f"{_fmt(k.get('keep_sparse'))} sparse)",
                         "merge, then low-rank + sparse (MC-SMoE, Li et al. 2024)"),
        "lowrank": _Step(lowrank.lowrank_experts, False, True, True,
                         lambda k: f"lowrank({'energy ' if isinstance(k.get('keep'), float) else 'r'}{_fmt(k.get('keep'))})",
                         "truncated SVD of the trained experts (Eckart-Young)"),
        "share": _Step(lowrank.share_experts, False, True, True, lambda k: f"share(r{k.get('keep')})",
                       "shared base + low-rank deltas"),
        "quantize": _Step(quantization.quantize, False, True, True, q_label,
                          "RTN weight-only quantization with packed storage (MoQE, Kim et al. 2023)"),
        "quantize_rest": _Step(quantization.quantize_rest, False, False, False,
                               lambda k: f"quantize_rest({k.get('bits', 8)} bit"
                                         + (f", emb {k['embedding_bits']} bit" if k.get("embedding_bits") else "") + ")",
                               "attention / embeddings / head at their own bit width"),
        "distill": _Step(_distill_step, False, False, False,
                         lambda k: f"distill({k.get('steps', 50)} steps)",
                         "knowledge-distillation recovery from the input model (MC-SMoE's KD, Li et al. 2024)"),
    }


STEPS: tuple[str, ...] = ("prune", "prune_magnitude", "skip", "drop_experts", "drop_layers", "drop_blocks", "merge",
                          "hc_smoe", "mc_smoe", "lowrank", "share", "quantize", "quantize_rest", "distill")
_PIPELINE_OWNED = {"model", "calib", "inplace", "teacher"}  # filled in by pipeline(), never by the user


def describe_step(step: Any) -> str:
    """A short label of one step, e.g. ``merge(->4) `` or ``quantize(4 bit, g32)``."""
    if callable(step) and not isinstance(step, (tuple, list)):
        return getattr(step, "__name__", type(step).__name__)
    name, kwargs = step
    reg = _registry()
    if name not in reg:
        raise ValueError(f"step: unknown step {name!r}; allowed names: {', '.join(STEPS)}")
    return reg[name].label(dict(kwargs))


def _check_steps(steps: Any, calib: Any, train_data: Any) -> list[tuple[str, Any, dict]]:
    """Normalise and validate every step before any work: ``[(kind, fn_or_name, kwargs)]``."""
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
        raise TypeError(f"steps: expected a list of (name, kwargs) pairs or callables, got {type(steps).__name__}")
    steps = list(steps)
    reg = _registry()
    out, compressed_by = [], None
    for i, step in enumerate(steps):
        where = f"steps[{i}]"
        if callable(step) and not isinstance(step, (tuple, list)):
            out.append(("callable", step, {}))
            continue
        if isinstance(step, str):
            step = (step, {})
        if not isinstance(step, (tuple, list)) or len(step) != 2:
            raise ValueError(f"{where}: expected a (name, kwargs) pair or a callable model -> model, got {step!r}; "
                             f"allowed names: {', '.join(STEPS)}")
        name, kwargs = step
        if name not in reg:
            raise ValueError(f"{where}: unknown step {name!r}; allowed names: {', '.join(STEPS)}")
        if kwargs is None:
            kwargs = {}
        if not isinstance(kwargs, Mapping):
            raise ValueError(f"{where} ({name}): kwargs must be a dict, got {type(kwargs).__name__}")
        kwargs = dict(kwargs)
        spec = reg[name]
        sig = inspect.signature(spec.fn)
        params = {k: p for k, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        takes_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
        allowed = [k for k in params if k not in _PIPELINE_OWNED and (name != "distill" or k != "data")]
        if name == "distill":
            allowed.append("data")
        bad = [k for k in kwargs if k in _PIPELINE_OWNED or (k not in allowed and not takes_any)]
        if bad:
            raise ValueError(f"{where} ({name}): unexpected keyword(s) {bad}; allowed: {sorted(allowed)}")
        missing = [k for k, p in params.items() if p.default is p.empty and k not in _PIPELINE_OWNED
                   and k not in kwargs and k != "data"]
        if missing:
            raise ValueError(f"{where} ({name}): missing required keyword(s) {missing}")
        if spec.calib and calib is None:
            raise ValueError(f"{where} ({name}): needs calibration data: pass calib= (a slice of the TRAINING split)")
        if name == "distill" and kwargs.get("data") is None and train_data is None and calib is None:
            raise ValueError(f"{where} (distill): needs training data: pass train_data= (or calib=, or data= in its kwargs)")
        if spec.rewrites_experts and compressed_by is not None:
            raise ValueError(f"{where} ({name}): needs plain experts, but {compressed_by} already stored them in a "
                             f"compressed form; put {name!r} before it")
        for key in ("bits", "other_bits", "embedding_bits"):
            v = kwargs.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v not in quantization.SUPPORTED_BITS:
                raise ValueError(f"{where} ({name}): {key} must be one of {quantization.SUPPORTED_BITS}, got {v!r}")
        for key in ("keep", "rank", "steps"):
            v = kwargs.get(key)
            lowest = 0 if key == "keep" and name == "share" else 1
            if isinstance(v, int) and not isinstance(v, bool) and v < lowest:
                raise ValueError(f"{where} ({name}): {key} must be >= {lowest}, got {v!r}")
            if isinstance(v, float) and not 0 < v <= 1:
                raise ValueError(f"{where} ({name}): {key} as a fraction must be in (0, 1], got {v!r}")
        if spec.compresses_experts and compressed_by is None:
            compressed_by = f"steps[{i}] ({name})"
        out.append((name, spec, kwargs))
    return out


# --------------------------------------------------------------------------------------------
# pipeline
# --------------------------------------------------------------------------------------------
@dataclass
class PipelineResult:
    """What :func:`pipeline` returns: the final ``model`` and one row per stage (``rows[0]`` is the input)."""

    model: nn.Module
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final(self) -> dict[str, Any]:
        return self.rows[-1]

    @property
    def ratio(self) -> float:
        """Input bytes / final bytes."""
        return self.rows[0]["bytes"] / self.rows[-1]["bytes"]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows).set_index("stage")

    def to_markdown(self) -> str:
        cols = [c for c in ("stage", "step", "bytes", "ratio", "quality", "latency_ms", "seconds")
                if any(r.get(c) is not None for r in self.rows)]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in self.rows:
            cells = []
            for c in cols:
                v = r.get(c)
                cells.append("-" if v is None else f"{v:,}" if isinstance(v, int) else
                             f"{v:.4g}" if isinstance(v, float) else str(v))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def __repr__(self) -> str:
        out = [f"PipelineResult: {self.rows[0]['bytes']:,} -> {self.rows[-1]['bytes']:,} bytes "
               f"({self.ratio:.2f}x smaller)"]
        for r in self.rows:
            q = "" if r.get("quality") is None else f"  quality {r['quality']:.4g}"
            lat = "" if r.get("latency_ms") is None else f"  {r['latency_ms']:.3g} ms"
            out.append(f"  {r['stage']}. {r['step']:<42} {format_bytes(r['bytes']):>10} ({r['ratio']:.2f}x){q}{lat}")
        return "\n".join(out)

    _repr_markdown_ = to_markdown


def _quality(evaluate: Callable | None, model: nn.Module) -> float | None:
    if evaluate is None:
        return None
    with torch.no_grad():
        v = evaluate(model)
    if isinstance(v, Mapping):
        key = next((k for k in ("perplexity", "accuracy", "quality") if k in v), next(iter(v)))
        v = v[key]
    return float(v)


def pipeline(model: nn.Module, steps: Sequence[Any], *, calib: Any = None, evaluate: Callable | None = None,
             train_data: Any = None, latency_batch: Any = None, latency_repeats: int = 5,
             inplace: bool = False) -> PipelineResult:
    """Run compression steps one after another and measure every stage.

    Hybrid pipelines as in MC-SMoE (Li et al., 2024: merge, then low-rank + sparse, then KD
    recovery) and He et al. (2024: trim, then quantize, then optionally fine-tune).

    Args:
        model: a trained MoE model; left untouched unless ``inplace=True``.
        steps: a list of ``(name, kwargs)`` pairs with ``name`` in :data:`STEPS` (e.g.
            ``[("drop_layers", {"keep": 3}), ("quantize", {"bits": 3, "group_size": 32})]``), or
            callables ``model -> model``. All are validated before any work: an unknown name,
            an unknown or missing keyword, a step needing ``calib`` without it, or a step needing
            plain experts after one that compressed them raises ``ValueError`` naming the step.
            ``"distill"`` trains the current model towards the INPUT model (the teacher) on
            ``train_data`` (or its ``data=`` kwarg, or ``calib``).
        calib: calibration data (a slice of the TRAINING split) for data-driven steps.
        evaluate: ``f(model) -> float`` (or a dict of metrics; ``perplexity``/``accuracy`` is
            used), e.g. ``lambda m: moe_course.train.evaluate(m, val)["perplexity"]``.
        inplace: compress ``model`` itself.
        train_data: training data for ``"distill"`` steps.
        latency_batch: when given, the median latency of one forward pass on it is recorded
            (:func:`moe_course.metrics.latency`).

    Returns:
        :class:`PipelineResult` with the final model and rows ``{stage, step, bytes, ratio, params,
        quality, latency_ms, seconds}`` (``ratio`` = input bytes / bytes).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if evaluate is not None and not callable(evaluate):
        raise TypeError(f"evaluate: expected a callable model -> float, got {type(evaluate).__name__}")
    plan = _check_steps(steps, calib, train_data)
    teacher = model
    current = model if inplace else copy.deepcopy(model)
    # In place, a step can still fail at run time (after the checks above): keep a backup so
    # the model is restored, never left half compressed. It doubles as the frozen KD teacher.
    backup = copy.deepcopy(model) if inplace else None
    if backup is not None and any(kind == "distill" for kind, _, _ in plan):
        teacher = backup
    try:
        return _run(plan, model, current, teacher, calib, evaluate, train_data, latency_batch, latency_repeats)
    except BaseException:
        if backup is not None:
            model.__dict__.clear()
            model.__dict__.update(backup.__dict__)
        raise


def _run(plan, model, current, teacher, calib, evaluate, train_data, latency_batch, latency_repeats):
    current.eval()

    def measure(stage: int, label: str, seconds: float) -> dict[str, Any]:
        rep = size_report(current)
        row = {"stage": stage, "step": label, "bytes": rep.bytes, "params": rep.total_params,
               "ratio": None, "quality": _quality(evaluate, current), "latency_ms": None, "seconds": seconds}
        if latency_batch is not None:
            row["latency_ms"] = latency(current, latency_batch, repeats=latency_repeats, warmup=1).median_ms
        return row

    rows = [measure(0, "input", 0.0)]
    for i, (kind, spec, kwargs) in enumerate(plan, start=1):
        t0 = time.perf_counter()
        try:
            if kind == "callable":
                label = describe_step(spec)
                nxt = spec(current)
                if not isinstance(nxt, nn.Module):
                    raise TypeError(f"returned {type(nxt).__name__}, expected an nn.Module")
            else:
                label = spec.label(kwargs)
                kw = dict(kwargs)
                if kind == "distill":
                    data = kw.pop("data", None)
                    data = data if data is not None else train_data if train_data is not None else calib
                    nxt = spec.fn(current, teacher=teacher, data=data, **kw)
                elif spec.calib:
                    nxt = spec.fn(current, calib=calib, inplace=True, **kw)
                else:
                    nxt = spec.fn(current, inplace=True, **kw)
        except (ValueError, TypeError) as err:
            raise type(err)(f"steps[{i - 1}] ({kind}): {err}") from err
        current = nxt.eval()
        rows.append(measure(i, label, time.perf_counter() - t0))
    for r in rows:
        r["ratio"] = rows[0]["bytes"] / r["bytes"]
    return PipelineResult(current, rows)


# --------------------------------------------------------------------------------------------
# Pareto frontier
# --------------------------------------------------------------------------------------------
def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def pareto_frontier(points: Iterable[Mapping[str, Any]], x: str = "bytes", y: str = "quality",
                    higher_is_better: bool | None = None) -> list[Mapping[str, Any]]:
    """The non-dominated points: lower ``x`` (bytes, latency) is better, ``y`` is better higher or lower.

    A point is dominated when another is at least as good on both axes and strictly better on
    one. Exact duplicates do not dominate each other (both stay). Points whose ``x`` or ``y`` is
    missing or NaN are left out. The frontier is returned sorted by ``x`` (ties by ``y``, best first).

    Args:
        points: dicts (e.g. :func:`moe_course.course_table.compression_table` rows).
        x, y: the keys of the cost and quality axes.
        higher_is_better: direction of ``y``; ``None`` reads the points' ``"higher_is_better"`` key.
    """
    if isinstance(points, Mapping) or not isinstance(points, Iterable):
        raise TypeError(f"points: expected a list of dicts, got {type(points).__name__}")
    pts = list(points)
    for i, p in enumerate(pts):
        if not isinstance(p, Mapping):
            raise TypeError(f"points[{i}]: expected a dict, got {type(p).__name__}")
    if not isinstance(x, str) or not isinstance(y, str):
        raise TypeError("x, y: expected the names (str) of two keys of the points")
    if higher_is_better is None:
        flags = {p.get("higher_is_better") for p in pts}
        if len(flags) != 1 or not isinstance(next(iter(flags)), bool):
            raise ValueError("higher_is_better: expected True or False (the points do not all carry one "
                             "'higher_is_better' value)")
        higher_is_better = next(iter(flags))
    if not isinstance(higher_is_better, bool):
        raise TypeError(f"higher_is_better: expected a bool, got {higher_is_better!r}")
    sign = -1.0 if higher_is_better else 1.0   # minimise (x, sign * y)
    valid = [(i, _num(p.get(x)), sign * _num(p.get(y))) for i, p in enumerate(pts)]
    valid = [t for t in valid if not (math.isnan(t[1]) or math.isnan(t[2]))]
    valid.sort(key=lambda t: (t[1], t[2], t[0]))
    keep, best = [], math.inf
    j = 0
    while j < len(valid):   # scan groups of equal x: within a group only the best y can survive
        k = j
        while k < len(valid) and valid[k][1] == valid[j][1]:
            k += 1
        y0 = valid[j][2]
        if y0 < best:
            keep.extend(t[0] for t in valid[j:k] if t[2] == y0)
            best = y0
        j = k
    return [pts[i] for i in keep]
