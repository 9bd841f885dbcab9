r"""Activation-aware scaling for expert quantization (AWQ, Lin et al. 2024), chapter 5.

Weights that meet large activations matter most: an error :math:`\Delta w_j` on input channel
:math:`j` costs :math:`|x_j|\,|\Delta w_j|`. AWQ multiplies input channel :math:`j` of a weight by
:math:`s_j > 1` and divides the activation by the same :math:`s_j`, which changes nothing in
exact arithmetic,

.. math::

    y = x W = (x\,\mathrm{diag}(s)^{-1})\,(\mathrm{diag}(s)\,W),

but gives the salient channels a finer grid after rounding. The scales are searched on
calibration activations: :math:`s = \bar{|x|}^{\alpha}` (normalised to a geometric mean of 1),
with :math:`\alpha \in [0, 1]` chosen on a grid to minimise the quantized output error
:math:`\lVert Q(\mathrm{diag}(s) W)\,(x / s) - x W \rVert^2` summed over the experts on the tokens
routed to each.

The division by :math:`s` must be **folded into the preceding operation** so that it is free and
exact:

* the experts' first layer (``w_in``, ``w_gate``) reads the output of the block's LayerNorm: one
  scale per MoE layer, shared by all its experts, folded into the norm's weight and bias; the
  router and any shared experts read the same input and get the inverse factor (the router stays
  fp32 and routes exactly as before);
* the second layer (``w_out``) of a **SwiGLU** expert reads :math:`\mathrm{silu}(x W^{gate})
  \odot (x W^{in})`, linear in :math:`W^{in}`: one scale per expert, folded into the columns of
  ``w_in``. A GELU expert's hidden activation is not linear in anything before it, so its
  ``w_out`` is left unscaled (folding there would not be exact).

:func:`awq_scale` returns the rescaled float model (same outputs, checked); :func:`awq` quantizes
it by round-to-nearest, and ``gptq.gptq(awq_scale(...))`` combines both.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from moe_course import _validate
from moe_course.calib import calib_batches, capture_experts, evaluating, forward
from moe_course.compress.quantization import SUPPORTED_BITS, fake_quantize, quantize
from moe_course.layers import moe_layers, require_moe_layers

__all__ = ["awq_scale", "awq", "AWQReport", "search_scale"]

NORMS = (nn.LayerNorm, nn.RMSNorm) if hasattr(nn, "RMSNorm") else (nn.LayerNorm,)


@dataclass
class AWQReport:
    """The chosen exponent :math:`\\alpha` per MoE layer (first layer) and per expert (second
    layer, SwiGLU only; ``None`` where not folded), and the relative output error before/after."""

    alpha_in: list[float] = field(default_factory=list)
    alpha_out: list[list[float | None]] = field(default_factory=list)
    error_in: list[tuple[float, float]] = field(default_factory=list)


def _qerr(w: torch.Tensor, x: torch.Tensor, s: torch.Tensor, bits: int, group_size: int | None) -> float:
    """``|| Q(diag(s) w) (x / s) - x w ||^2`` for ``w [in, out]`` used as ``x @ w``."""
    gran = "channel" if group_size is None else "group"
    wq = fake_quantize((w * s[:, None]).T.contiguous(), bits, False, gran, group_size).T  # groups along `in`
    return float(((x / s) @ wq - x @ w).pow(2).sum())


def search_scale(pairs: list[tuple[torch.Tensor, torch.Tensor]], bits: int, group_size: int | None,
                 grid: int = 11) -> tuple[torch.Tensor, float, float, float]:
    """The AWQ scale for weights that share one input: ``pairs`` of ``(x [n, in], w [in, out])``.

    Returns ``(s [in], alpha, error at alpha = 0, error at the chosen alpha)``; ``alpha = 0`` is
    plain round-to-nearest (``s = 1``), so the search never does worse on its own data.
    """
    pairs = [(x.float(), w.float()) for x, w in pairs if x.shape[0] > 0]
    if not pairs:
        raise ValueError("pairs: no calibration tokens reached these weights")
    dim = pairs[0][1].shape[0]
    mean_abs = sum(x.abs().sum(0) for x, _ in pairs) / sum(x.shape[0] for x, _ in pairs)
    mean_abs = mean_abs.clamp(min=1e-8)
    best = (torch.ones(dim), 0.0, None)
    base = None
    for a in torch.linspace(0, 1, grid).tolist():
        s = mean_abs.pow(a)
        s = s / (s.max() * s.min()).sqrt()
        err = sum(_qerr(w, x, s, bits, group_size) for x, w in pairs)
        if base is None:
            base = err
        if best[2] is None or err < best[2]:
            best = (s, a, err)
    return best[0], best[1], base, best[2]


def _logits(o: Any) -> torch.Tensor:
    if torch.is_tensor(o):
        return o
    if hasattr(o, "logits"):
        return o.logits
    if isinstance(o, (tuple, list)) and o and torch.is_tensor(o[0]):
        return o[0]
    raise TypeError(f"model output: expected a tensor, .logits or a tuple, got {type(o).__name__}")


def _preceding_norms(model: nn.Module, calib: Any) -> list[nn.Module]:
    """For each MoE layer, the norm module whose output tensor IS the layer's input (found by
    identity on one calibration batch); raises where a layer's input comes from anything else."""
    layers = moe_layers(model)
    norms = [m for m in model.modules() if isinstance(m, NORMS)]
    outputs, inputs = [], {}  # the tensors themselves are kept: a freed tensor's id() is reused

    def on_norm(m, args, out):
        outputs.append((out, m))  # a hook must return None, or it replaces the output

    def on_layer(m, args, out):
        inputs.setdefault(id(m), args[0])

    hooks = [n.register_forward_hook(on_norm) for n in norms]
    hooks += [layer.register_forward_hook(on_layer) for layer in layers]
    try:
        with evaluating(model), torch.no_grad():
            forward(model, calib_batches(calib, model)[0])
            found = []
            for i, layer in enumerate(layers):
                x = inputs.get(id(layer))
                norm = next((m for o, m in outputs if o is x), None) if x is not None else None
                if norm is None or norm.weight is None:
                    raise ValueError(f"model: MoE layer {i} does not read the output of a LayerNorm/RMSNorm "
                                     "with a weight directly; activation-aware scales cannot be folded exactly")
                found.append(norm)
    finally:
        for h in hooks:
            h.remove()
    return found


@torch.no_grad()
def awq_scale(model: nn.Module, bits: int, *, calib: Any = None, group_size: int | None = None,
              grid: int = 11, inplace: bool = False) -> nn.Module:
    """The model with AWQ scales searched for ``bits``-bit experts (``group_size`` as for
    :func:`~moe_course.compress.quantization.quantize`) and folded in exactly; still fp32, its
    outputs equal the original's (checked on a calibration batch). ``model.awq_report`` holds
    the chosen exponents (:class:`AWQReport`)."""
    layers = require_moe_layers(model, "scale")
    _validate.dense_experts(layers, "scale")
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits: expected one of {SUPPORTED_BITS}, got {bits!r}")
    if calib is None:
        raise ValueError("calib: activation-aware scaling needs calibration data (a slice of the training split)")
    _validate.positive_int("grid", grid)
    _validate.positive_int("group_size", group_size, allow_none=True)
    out = model if inplace else copy.deepcopy(model)
    norms = _preceding_norms(out, calib)
    batch = calib_batches(calib, out)[0]
    with evaluating(out):
        before = forward(out, batch)
    report = AWQReport()
    caps = capture_experts(out, calib, outputs=False)
    for layer, norm, cap in zip(moe_layers(out), norms, caps):
        e = layer.experts
        firsts = [e.w_in] + ([e.w_gate] if e.w_gate is not None else [])
        pairs = [(cap.inputs[i], w[i]) for i in range(e.num_experts) for w in firsts]
        s, a, err0, err1 = search_scale(pairs, bits, group_size, grid)
        report.alpha_in.append(a)
        report.error_in.append((err0, err1))
        norm.weight.div_(s)
        if norm.bias is not None:
            norm.bias.div_(s)
        for w in firsts:
            w.mul_(s[None, :, None])
        layer.router.gate.weight.mul_(s[None, :])
        if getattr(layer.router, "noise", None) is not None:
            layer.router.noise.weight.mul_(s[None, :])
        if getattr(layer, "shared", None) is not None:
            layer.shared.w_in.mul_(s[None, :, None])
            if layer.shared.w_gate is not None:
                layer.shared.w_gate.mul_(s[None, :, None])
        alphas: list[float | None] = []
        for i in range(e.num_experts):
            x = cap.inputs[i] / s
            if e.w_gate is None or x.shape[0] == 0:
                alphas.append(None)  # GELU: not foldable exactly; no tokens: nothing to search on
                continue
            hidden = e.act(x @ e.w_in[i], x @ e.w_gate[i])
            t, a_out, _, _ = search_scale([(hidden, e.w_out[i])], bits, group_size, grid)
            e.w_in[i].div_(t[None, :])
            e.w_out[i].mul_(t[:, None])
            alphas.append(a_out)
        report.alpha_out.append(alphas)
    with evaluating(out):
        after = forward(out, batch)
    after, before = _logits(after), _logits(before)
    if not torch.allclose(after, before, rtol=1e-3, atol=1e-4):
        raise RuntimeError("awq_scale: folding changed the model's outputs (max difference "
                           f"{float((after - before).abs().max()):.3g}); something else reads the normalised input")
    out.awq_report = report
    return out


def awq(model: nn.Module, bits: int, *, calib: Any = None, group_size: int | None = None, grid: int = 11,
        inplace: bool = False) -> nn.Module:
    """AWQ: :func:`awq_scale`, then round-to-nearest ``bits``-bit experts in the packed format of
    :func:`~moe_course.compress.quantization.quantize` (same bytes as plain RTN)."""
    scaled = awq_scale(model, bits, calib=calib, group_size=group_size, grid=grid, inplace=inplace)
    q = quantize(scaled, bits, group_size=group_size, inplace=True)
    q.awq_report = scaled.awq_report
    return q
