"""Argument checks shared by the package (the functions of chapters 1 to 13 use them; the bad-input
table in ``tests/test_bad_input.py`` lists what each one refuses).

Every check raises early, before any copy or mutation, with a message that starts with the
argument's name and says what was expected, so a learner's mistake points at the argument that
caused it. The checks here are one-shot (compression, calibration): none of them runs inside a
model's forward pass, where a data-dependent check would synchronise the GPU on every call.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

# What produced each compressed kind of experts, and what to do instead (see dense_experts).
_STEP_OF = {
    "QuantizedExperts": ("quantize", "quantize last: apply {action} to the model before quantizing it"),
    "LowRankExperts": ("lowrank_experts", "apply {action} before the low-rank factorization (or to the original model)"),
    "SharedExperts": ("share_experts", "apply {action} before weight sharing (or to the original model)"),
    "LowRankSparseExperts": ("mc_smoe", "apply {action} before mc_smoe (or to the original model)"),
}


def finite(name: str, t: Any) -> None:
    """``name`` must hold no NaN or inf (floating tensors only; others pass)."""
    if torch.is_tensor(t) and (t.is_floating_point() or t.is_complex()) and t.numel():
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            n_nan = int(torch.isnan(t).sum())
            raise ValueError(f"{name}: expected finite values, got {n_nan} NaN and {int(bad.sum()) - n_nan} inf "
                             f"in a tensor of shape {tuple(t.shape)}")


def finite_model(model: nn.Module, name: str = "model") -> None:
    """Every floating parameter (and packed quantization scale) of ``model`` must be finite.

    Other buffers are skipped: attention masks legitimately hold ``-inf``."""
    scales = ((n, b) for n, b in model.named_buffers() if n.endswith("_scale"))
    for kind, items in (("parameter", model.named_parameters()), ("buffer", scales)):
        for pname, t in items:
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}: expected finite weights, but {kind} {pname!r} holds NaN or inf "
                                 "(a diverged training run? reload or retrain the model before compressing it)")


def dense_experts(layers: list, action: str) -> None:
    """Each MoE layer must still store plain :class:`~moe_course.layers.Experts` (not packed or factored).

    Quantized or factored experts would be silently expanded back to full fp32 matrices (or, for
    in-place edits of their properties, not changed at all), so ``action`` refuses them. (Compressed
    experts say so: ``CompressedExperts.compressed`` is True.)
    """
    for i, layer in enumerate(layers):
        kind = type(layer.experts).__name__
        if getattr(layer.experts, "compressed", True):
            step, advice = _STEP_OF.get(kind, (None, "apply {action} to the uncompressed model"))
            what = f"was compressed by {step}() ({kind})" if step else f"stores {kind}"
            raise TypeError(f"model: {action} needs MoE layers with dense Experts, but MoE layer {i} {what}; "
                            + advice.format(action=action))


def router_kind(layers: list, action: str, allowed: tuple[str, ...]) -> None:
    """Each MoE layer's router must be one of the class names ``allowed`` (merged / skipping routers
    carry state that expert removal or re-skipping would break)."""
    for i, layer in enumerate(layers):
        kind = type(layer.router).__name__
        if kind not in allowed:
            if kind == "MergedRouter":
                hint = (f"MoE layer {i} was merged (a MergedRouter maps the router's slots to merged experts); "
                        f"apply {action} before merging, or merge into fewer groups instead")
            elif kind == "SkippingRouter" and action.startswith("skip"):
                hint = (f"MoE layer {i} already skips experts (SkippingRouter); skip once, on the model "
                        "before skip_experts was applied")
            elif kind == "SkippingRouter":
                hint = f"MoE layer {i} already skips experts (SkippingRouter); apply {action} to the model before skip_experts"
            else:
                hint = f"MoE layer {i} has a {kind}"
            raise TypeError(f"model: {action} needs routers of type {' or '.join(allowed)}; {hint}")


def positive_int(name: str, value: Any, allow_none: bool = False) -> int | None:
    """``value`` must be an int >= 1 (not a bool), or ``None`` when ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int{' or None' if allow_none else ''}, got {value!r}")
    return value


def int_in(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` must be an int (not a bool) in ``[lo, hi]``."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and ((lo is not None and value < lo) or (hi is not None and value > hi)):
        ok = False
    if not ok:
        lo_s = "-inf" if lo is None else lo
        hi_s = "inf" if hi is None else hi
        raise ValueError(f"{name}: expected an integer in [{lo_s}, {hi_s}], got {value!r}")
    return value


def keep_count(keep: Any, total: int, lo: int = 1, what: str = "experts per layer", bounds: str | None = None,
               name: str = "keep") -> int:
    """The size target ``keep`` of a compression function as a count in ``[lo, total]``.

    One meaning for every technique: an int is the number of units kept, a float in (0, 1] the
    fraction of ``total`` kept (rounded). ``bounds`` describes ``[lo, total]`` in the message
    (default ``"between {lo} and {total}"``).
    """
    bounds = bounds or f"between {lo} and {total}"
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ValueError(f"{name}: expected an int number of {what} or a fraction in (0, 1], got {keep!r}")
    if isinstance(keep, float) and not 0 < keep <= 1:  # NaN fails too
        raise ValueError(f"{name}: a fraction must be in (0, 1], got {keep!r}")
    n = keep if isinstance(keep, int) else round(keep * total)
    if not lo <= n <= total:
        got = f"{keep!r}" if isinstance(keep, int) else f"{keep!r} -> {n}"
        raise ValueError(f"{name}: expected {bounds} {what}, got {got}")
    return n


def keep_per_layer(keep: Any, layers: list, what: str = "experts per layer") -> list[int]:
    """``keep`` experts for each MoE layer: one value for all (:func:`keep_count` of each layer's
    experts, at least its ``k``) or a list with one value per layer."""
    if isinstance(keep, (list, tuple)):
        if len(keep) != len(layers):
            raise ValueError(f"keep: expected one value per MoE layer ({len(layers)}), got {len(keep)}")
        values, names = list(keep), [f"keep[{i}]" for i in range(len(layers))]
    else:
        values, names = [keep] * len(layers), ["keep"] * len(layers)
    return [keep_count(v, layer.num_experts, layer.k, what, f"between k={layer.k} and num_experts={layer.num_experts}", n)
            for v, layer, n in zip(values, layers, names)]
