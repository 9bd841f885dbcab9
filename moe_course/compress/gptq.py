r"""GPTQ for stacked experts (Frantar et al. 2023), from scratch, on top of :mod:`moe_course.calib`
(chapter 5, quantization: calibration-aware rounding).

Round-to-nearest (RTN) quantizes every weight on its own. GPTQ quantizes the columns (input
dimensions) of a matrix one at a time and, after each, moves the rounding error onto the columns
not yet quantized, so that the layer's *output* on calibration inputs :math:`X` changes as little
as possible. For one row :math:`w` and the Hessian of the layer-wise loss
:math:`\lVert X w - X \hat w \rVert^2`, :math:`H = 2 X^\top X`, quantizing column :math:`q` gives
the optimal update of the remaining columns (Optimal Brain Surgeon):

.. math::

    \delta = -\frac{w_q - \operatorname{quant}(w_q)}{[H^{-1}]_{qq}}\,[H^{-1}]_{q,:}

GPTQ processes the columns in a fixed order for every row at once, reads the rows of
:math:`H^{-1}` from its upper Cholesky factor, and applies the updates lazily in blocks of
``block_size`` columns. ``damp`` adds :math:`\lambda \cdot \operatorname{mean}(\operatorname{diag} H)`
to the diagonal; ``act_order`` visits columns by decreasing :math:`H_{qq}` (with *static* groups:
the group scales are fixed from the unquantized weights first, so groups stay consecutive in
storage).

**Experts.** Each expert gets its own Hessians from the calibration tokens routed to it
(:func:`moe_course.calib.capture_experts`): one over ``d_model`` for ``w_in``/``w_gate`` and one
over ``d_hidden`` for ``w_out``, built from the hidden activations of the already quantized first
layer (GPTQ's "true sequential" order). Layers are quantized in order, each calibrated on the
outputs of the layers quantized before it. An expert that saw fewer than ``min_tokens`` tokens
has a rank-deficient Hessian: it falls back to RTN (``starved="rtn"``, what GPTQModel does) or is
calibrated on every token (``starved="every_expert"``, what llm-compressor does while
calibrating). :attr:`GPTQReport` lists, per layer and expert, the tokens seen and the method used.

The result is stored exactly like :func:`~moe_course.compress.quantization.quantize`'s RTN
experts (:class:`~moe_course.compress.quantization.QuantizedExperts`: packed codes plus fp16
scales and zero points per group), so sizes compare one to one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from moe_course import _validate
from moe_course.calib import capture_experts
from moe_course.compress.quantization import SUPPORTED_BITS, QuantizedExperts, pack_codes, quantize_tensor
from moe_course.layers import moe_layers, require_moe_layers

__all__ = ["gptq_quantize_matrix", "gptq", "GPTQReport", "STARVED"]

STARVED = ("rtn", "every_expert")


def _check_bits(bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits: expected one of {SUPPORTED_BITS}, got {bits!r}")


def _group_params(w: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype):
    """Per-row ``(scale [rows], zero [rows])`` of the RTN quantizer for the columns ``w [rows, g]``,
    with the stored (rounded-up) scale, as :func:`quantize_tensor` computes them."""
    _, scale, zero = quantize_tensor(w, bits, symmetric, "channel", None, scale_dtype)
    return scale.float().reshape(-1), zero.float().reshape(-1)


def _quant_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: int):
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    code = torch.clamp(torch.round(w / safe) + zero, 0, levels)
    code = torch.where(scale > 0, code, zero)
    return code, (code - zero) * scale


@torch.no_grad()
def gptq_quantize_matrix(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    *,
    symmetric: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    scale_dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of one matrix ``w [rows, cols]`` (``cols`` = input dimension) against ``hessian
    [cols, cols]`` (:math:`\\propto X^\\top X`). Returns ``(codes, scale, zero)`` in
    :func:`~moe_course.compress.quantization.quantize_tensor`'s format: ``codes`` uint8 ``[rows,
    cols]``, ``scale`` / ``zero`` ``[rows * cols / g, 1]`` for groups of ``g`` consecutive columns
    (``g = cols`` when ``group_size`` is None), row-major."""
    if not torch.is_tensor(w) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w: expected a 2-D float tensor [rows, cols], got {getattr(w, 'shape', type(w))}")
    rows, cols = w.shape
    if not torch.is_tensor(hessian) or tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"hessian: expected shape ({cols}, {cols}), got {tuple(getattr(hessian, 'shape', ()))}")
    _check_bits(bits)
    _validate.positive_int("group_size", group_size, allow_none=True)
    _validate.positive_int("block_size", block_size)
    if not (isinstance(damp, (int, float)) and 0 < damp < 1):
        raise ValueError(f"damp: expected a fraction in (0, 1), got {damp!r}")
    g = cols if group_size is None else group_size
    if cols % g:
        raise ValueError(f"group_size: must divide the input dimension {cols}, got {group_size}")
    levels = 2 ** bits - 1
    W = w.detach().double().clone()
    H = hessian.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    n_groups = cols // g
    scales = torch.zeros(rows, n_groups, dtype=torch.float64)
    zeros = torch.zeros(rows, n_groups, dtype=torch.float64)
    static = act_order or group_size is None  # group parameters fixed before any update
    if static:
        for j in range(n_groups):
            s, z = _group_params(W[:, j * g:(j + 1) * g].float(), bits, symmetric, scale_dtype)
            scales[:, j], zeros[:, j] = s.double(), z.double()
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros(rows, cols, dtype=torch.float64)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, dtype=W.dtype), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            j = col // g
            if not static and col % g == 0:  # lazy groups: parameters from the updated weights
                ahead = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g]
                s, z = _group_params(ahead.float(), bits, symmetric, scale_dtype)
                scales[:, j], zeros[:, j] = s.double(), z.double()
            code, q = _quant_column(W1[:, i], scales[:, j], zeros[:, j], levels)
            codes[:, col] = code
            err = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return (codes.to(torch.uint8), scales.reshape(-1, 1).to(scale_dtype),
            zeros.reshape(-1, 1).to(torch.uint8))


@dataclass
class GPTQReport:
    """Per MoE layer and expert: calibration tokens routed to it and how it was quantized
    (``"gptq"``, ``"gptq (every token)"`` or ``"rtn"``)."""

    tokens: list[list[int]] = field(default_factory=list)
    method: list[list[str]] = field(default_factory=list)
    min_tokens: int = 0

    @property
    def fallbacks(self) -> list[tuple[int, int, str]]:
        return [(l, e, m) for l, ms in enumerate(self.method) for e, m in enumerate(ms) if m != "gptq"]

    def __str__(self) -> str:
        lines = [f"GPTQ: {sum(len(m) for m in self.method)} experts, threshold {self.min_tokens} tokens"]
        for l, (t, m) in enumerate(zip(self.tokens, self.method)):
            odd = [f"{e} ({t[e]} tokens: {m[e]})" for e in range(len(t)) if m[e] != "gptq"]
            lines.append(f"  layer {l}: tokens per expert {min(t)}..{max(t)}; "
                         + (", ".join(odd) if odd else "every expert by GPTQ"))
        return "\n".join(lines)


def _hessian(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return 2.0 * x.T @ x / max(1, x.shape[0])


def gptq(
    model: nn.Module,
    bits: int,
    *,
    calib: Any = None,
    group_size: int | None = 128,
    symmetric: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    min_tokens: int | None = None,
    starved: str = "rtn",
    scale_dtype: torch.dtype = torch.float16,
    inplace: bool = False,
) -> nn.Module:
    """Quantize every routed expert to ``bits`` with GPTQ, calibrated on ``calib``; returns a new
    model (``inplace=False``) whose experts are :class:`QuantizedExperts`, with the per-expert
    token counts in ``model.gptq_report`` (:class:`GPTQReport`).

    Args:
        bits: bits per weight (one of the supported widths).
        calib: calibration data (a slice of the training split; :func:`moe_course.calib.calib_batches`).
        group_size: input columns per scale (must divide d_model and d_hidden), ``None``: per row.
        damp: fraction of the mean Hessian diagonal added to it (GPTQ's ``percdamp``).
        act_order: visit columns by decreasing Hessian diagonal (static groups).
        min_tokens: experts routed fewer tokens are "starved" (default: the layer's d_model).
        starved: ``"rtn"`` quantizes starved experts by round-to-nearest, ``"every_expert"``
            calibrates them on every calibration token.
    """
    layers = require_moe_layers(model, "gptq")
    _validate.dense_experts(layers, "gptq")
    _check_bits(bits)
    if calib is None:
        raise ValueError("calib: GPTQ needs calibration data (a slice of the training split)")
    if starved not in STARVED:
        raise ValueError(f"starved: expected one of {STARVED}, got {starved!r}")
    if min_tokens is not None:
        _validate.int_in("min_tokens", min_tokens, 0)
    _validate.positive_int("group_size", group_size, allow_none=True)
    for layer in layers:
        for dim in (layer.experts.d_model, layer.experts.d_hidden):
            if group_size is not None and dim % group_size:
                raise ValueError(f"group_size: must divide d_model={layer.experts.d_model} and "
                                 f"d_hidden={layer.experts.d_hidden}, got {group_size}")
    _validate.finite_model(model)
    out = model if inplace else copy.deepcopy(model)
    report = GPTQReport(min_tokens=min_tokens if min_tokens is not None else layers[0].d_model)
    opts = dict(symmetric=symmetric, damp=damp, block_size=block_size, act_order=act_order,
                scale_dtype=scale_dtype)
    for li in range(len(layers)):
        layer = moe_layers(out)[li]
        threshold = layer.d_model if min_tokens is None else min_tokens
        cap = capture_experts(out, calib, outputs=False)[li]  # inputs after the layers quantized so far
        every = None
        counts = [int(t.numel()) for t in cap.tokens]
        if starved == "every_expert" and min(counts) < threshold:
            every = capture_experts(out, calib, every_expert=True, outputs=False)[li]
        experts = layer.experts
        q = QuantizedExperts(experts, bits, group_size, symmetric, scale_dtype)  # RTN, then overwritten
        w_in, w_gate, w_out = experts.weights(torch.float32)
        methods = []
        for e in range(experts.num_experts):
            x = cap.inputs[e]
            method = "gptq"
            if counts[e] < threshold:
                if every is None:
                    methods.append("rtn")
                    continue
                x, method = every.inputs[e], "gptq (every token)"
            h_in = _hessian(x)
            first = {"in": w_in[e], "gate": None if w_gate is None else w_gate[e]}
            deq = {}
            for name in ("in", "gate"):
                if first[name] is None:
                    continue
                codes, scale, zero = gptq_quantize_matrix(first[name].T, h_in, bits, group_size, **opts)
                _set(q, f"{name}{e}", codes, scale, zero, bits)
                deq[name] = ((codes.float() - _expand(zero, codes)) * _expand(scale, codes)).T  # [d, f]
            hidden = experts.act(x @ deq["in"], x @ deq["gate"] if "gate" in deq else None)
            codes, scale, zero = gptq_quantize_matrix(w_out[e].T, _hessian(hidden), bits, group_size, **opts)
            _set(q, f"out{e}", codes, scale, zero, bits)
            methods.append(method)
        layer.experts = q
        report.tokens.append(counts)
        report.method.append(methods)
    out.gptq_report = report
    return out


def _expand(v: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Per-group ``[rows * n_groups, 1]`` values broadcast to ``codes [rows, cols]``."""
    rows, cols = codes.shape
    n_groups = v.numel() // rows
    return v.float().reshape(rows, n_groups).repeat_interleave(cols // n_groups, dim=1)


def _set(q: QuantizedExperts, name: str, codes, scale, zero, bits: int) -> None:
    getattr(q, f"{name}_codes").copy_(pack_codes(codes, bits))
    getattr(q, f"{name}_scale").copy_(scale.to(getattr(q, f"{name}_scale").dtype))
    getattr(q, f"{name}_zero").copy_(zero)
