"""Argument checks shared by the package (issue 7, "bad input, everywhere").

Every check raises early, before any copy or mutation, with a message that starts with the
argument's name and says what was expected, so a learner's mistake points at the argument that
caused it. The checks here are one-shot (compression, calibration): none of them runs inside a
model's forward pass, where a data-dependent check would synchronise the GPU on every call.
"""

from __future__ import annotations

from typing import Any, Mapping

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
    in-place edits of their properties, not changed at all), so ``action`` refuses them.
    """
    from .layers import Experts

    for i, layer in enumerate(layers):
        kind = type(layer.experts).__name__
        if type(layer.experts) is not Experts:
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


def _count_tokens(batch: Any) -> int:
    if torch.is_tensor(batch):
        return int(batch.numel())
    if isinstance(batch, Mapping):
        if "input_ids" in batch:
            ids = torch.as_tensor(batch["input_ids"])
            return int(ids[..., :-1].numel()) if ids.dim() == 2 else int(ids.numel())
        for v in batch.values():
            if torch.is_tensor(v):
                return int(v.numel())
    return 1  # unknown batch type: let the model judge it


def calib_batches(calib: Any, batch_size: int = 64, name: str = "calib") -> list:
    """The calibration data as a list of batches: not ``None``, not empty, every batch with at
    least one token, float features finite and token ids non-negative."""
    from .metrics import _iter_batches

    if calib is None:
        raise ValueError(f"{name}: expected calibration data (a training-split Dataset or batches), got None")
    try:
        batches = list(_iter_batches(calib, batch_size))
    except (TypeError, ValueError) as err:
        msg = str(err)
        msg = msg[len("data: "):] if msg.startswith("data: ") else msg
        raise type(err)(f"{name}: {msg}") from None
    if not batches:
        raise ValueError(f"{name}: the calibration data is empty; pass a few batches of the training split")
    for j, b in enumerate(batches):
        if _count_tokens(b) == 0:
            shapes = ({k: tuple(torch.as_tensor(v).shape) for k, v in b.items()} if isinstance(b, Mapping)
                      else tuple(getattr(b, "shape", ())))
            raise ValueError(f"{name}: batch {j} has no tokens (shapes {shapes}); expected input_ids [B, T+1] "
                             "with T >= 1, or x [B, ...] with B >= 1")
        values = b.values() if isinstance(b, Mapping) else [b]
        for v in values:
            if torch.is_tensor(v):
                finite(f"{name} (batch {j})", v)
                if not v.is_floating_point() and v.dtype != torch.bool and v.numel() and int(v.min()) < 0:
                    raise ValueError(f"{name}: batch {j} has negative token ids (min {int(v.min())}); "
                                     "expected ids in [0, vocab_size)")
    return batches


def token_ids_in_vocab(model: nn.Module, batches: list, name: str = "calib") -> None:
    """Token ids of ``batches`` must be below ``model.config.vocab_size`` (when the model has one)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int):
        return
    for j, b in enumerate(batches):
        ids = b.get("input_ids") if isinstance(b, Mapping) else b
        if torch.is_tensor(ids) and not ids.is_floating_point() and ids.numel() and int(ids.max()) >= vocab:
            raise ValueError(f"{name}: batch {j} has token id {int(ids.max())}; expected ids in "
                             f"[0, vocab_size={vocab}) (tokenized with this model's tokenizer?)")


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
