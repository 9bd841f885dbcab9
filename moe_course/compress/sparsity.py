r"""Calibration-aware weight sparsity for experts: Wanda (Sun et al. 2024) and 2:4 semi-structured
sparsity with its true storage (chapter 4).

Magnitude pruning removes the smallest :math:`|W_{ij}|`. Wanda weighs each weight by the norm of
the input feature it multiplies, over the calibration tokens that reach it,

.. math::

    S_{ij} = |W_{ij}| \cdot \lVert X_{:,i} \rVert_2 ,

and removes the lowest scores **per output** (for :math:`y = x W`, within each column
:math:`W_{:,j}`), with no retraining and no weight update. For experts, :math:`X` is the set of
tokens routed to that expert (:func:`moe_course.calib.capture_experts`), and the second layer's
inputs are the expert's hidden activations on them.

**2:4** keeps 2 of every 4 consecutive weights along the input dimension (the pattern sparse
tensor cores run at up to twice the speed). Storage, counted honestly
(:class:`SemiStructuredExperts`): the kept values (half the weights) plus a 2-bit position for
each, i.e. 4 bits of metadata per 4 weights; at fp16 values that is
:math:`16 \cdot 2 + 2 \cdot 2 = 36` bits per 4 weights against 64 dense (0.5625×), not 0.5×.
Unstructured sparsity saves bytes only through a sparse format (:func:`~moe_course.compress.pruning.csr_bytes`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from moe_course import _validate
from moe_course.calib import capture_experts
from moe_course.layers import CompressedExperts, Experts, moe_layers, require_moe_layers

__all__ = ["wanda_scores", "nm_mask", "sparsify", "SemiStructuredExperts", "SCORES", "PATTERNS"]

SCORES = ("wanda", "magnitude")
PATTERNS = ("unstructured", "2:4")


def wanda_scores(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """:math:`|W_{ij}|\\,\\lVert X_{:,i}\\rVert_2` for ``w [in, out]`` used as ``x @ w`` and
    calibration inputs ``x [n, in]``."""
    if w.dim() != 2 or x.dim() != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"w, x: expected w [in, out] and x [n, in], got {tuple(w.shape)} and {tuple(x.shape)}")
    return w.abs() * x.float().norm(dim=0)[:, None]


def _per_output_mask(score: torch.Tensor, keep: float) -> torch.Tensor:
    """Keep the ``keep`` fraction of highest scores in each column (output) of ``score [in, out]``."""
    n_in = score.shape[0]
    n_keep = max(1, round(keep * n_in))
    top = score.topk(n_keep, dim=0).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(0, top, True)


def nm_mask(score: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """N:M mask along the input dimension of ``score [in, out]``: in every ``m`` consecutive inputs
    of each output, the ``n`` highest scores are kept."""
    n_in, n_out = score.shape
    if n_in % m:
        raise ValueError(f"score: the input dimension {n_in} must be a multiple of m={m}")
    groups = score.T.reshape(n_out, n_in // m, m)
    top = groups.topk(n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return mask.reshape(n_out, n_in).T


class SemiStructuredExperts(CompressedExperts):
    """Experts stored 2:4: per matrix ``[out, in]``, the kept values ``[out, in/2]`` (in
    ``value_dtype``) and their 2-bit positions within each group of 4, packed 4 per byte. The
    size report counts exactly these buffers. :meth:`weights` rebuilds the dense matrices (the
    teaching path; on a GPU with sparse tensor cores, ``torch.sparse.to_sparse_semi_structured``
    runs the same pattern natively)."""

    def __init__(self, experts: Experts, masks: dict[str, torch.Tensor], value_dtype: torch.dtype = torch.float16):
        super().__init__(experts)
        self.value_dtype = value_dtype
        self._names = ("in", "gate", "out") if experts.w_gate is not None else ("in", "out")
        dense = dict(zip(("in", "gate", "out"), experts.weights(torch.float32)))
        for name in self._names:
            w = dense[name].detach().transpose(1, 2)                 # [E, out, in]
            m = masks[name].transpose(1, 2)
            E, n_out, n_in = w.shape
            if not torch.equal(m.reshape(E, n_out, n_in // 4, 4).sum(-1),
                               torch.full((E, n_out, n_in // 4), 2, dtype=torch.long)):
                raise ValueError(f"masks[{name!r}]: expected exactly 2 kept of every 4 inputs")
            pos = m.reshape(E, n_out, n_in // 4, 4).nonzero()[:, -1].reshape(E, n_out, n_in // 2)
            vals = w[m].reshape(E, n_out, n_in // 2)
            p = pos.to(torch.uint8).reshape(-1, 4)
            packed = p[:, 0] | (p[:, 1] << 2) | (p[:, 2] << 4) | (p[:, 3] << 6)
            self.register_buffer(f"{name}_values", vals.to(value_dtype))
            self.register_buffer(f"{name}_pos", packed)

    @property
    def params_per_expert(self) -> int:
        return len(self._names) * self.d_model * self.d_hidden // 2

    def _dense(self, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        vals = getattr(self, f"{name}_values")
        E, n_out, half = vals.shape
        packed = getattr(self, f"{name}_pos")
        pos = torch.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], dim=1).reshape(E, n_out, half).long()
        base = torch.arange(half // 2, device=vals.device).repeat_interleave(2) * 4
        cols = base + pos                                               # [E, out, in/2]
        w = torch.zeros(E, n_out, half * 2, dtype=dtype or torch.float32, device=vals.device)
        w.scatter_(2, cols, vals.to(w.dtype))
        return w.transpose(1, 2)                                        # [E, in, out]

    def weights(self, dtype: torch.dtype | None = None):
        w_in = self._dense("in", dtype)
        w_gate = self._dense("gate", dtype) if "gate" in self._names else None
        return w_in, w_gate, self._dense("out", dtype)

    @property
    def w_in(self) -> torch.Tensor:
        return self._dense("in", None)

    @property
    def w_gate(self) -> torch.Tensor | None:
        return self._dense("gate", None) if "gate" in self._names else None

    @property
    def w_out(self) -> torch.Tensor:
        return self._dense("out", None)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, 2:4, values={self.value_dtype}"


@torch.no_grad()
def sparsify(model: nn.Module, keep: float = 0.5, *, calib: Any = None, score: str = "wanda",
             pattern: str = "unstructured", value_dtype: torch.dtype = torch.float16,
             inplace: bool = False) -> nn.Module:
    """Prune the routed experts' weights by ``score`` (``"wanda"`` needs ``calib``) with
    ``pattern``: ``"unstructured"`` keeps the ``keep`` fraction per output (zeros stay in the dense
    tensors: see :func:`~moe_course.compress.pruning.sparsity_report` for their CSR size), ``"2:4"``
    (``keep`` must be 0.5) stores the experts as :class:`SemiStructuredExperts`."""
    layers = require_moe_layers(model, "sparsify")
    _validate.dense_experts(layers, "sparsify")
    if score not in SCORES:
        raise ValueError(f"score: expected one of {SCORES}, got {score!r}")
    if pattern not in PATTERNS:
        raise ValueError(f"pattern: expected one of {PATTERNS}, got {pattern!r}")
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ValueError(f"keep: expected the fraction of weights kept, in (0, 1], got {keep!r}")
    if pattern == "2:4" and keep != 0.5:
        raise ValueError(f"keep: the 2:4 pattern keeps exactly 0.5 of the weights, got {keep!r}")
    if score == "wanda" and calib is None:
        raise ValueError("calib: Wanda scores need calibration data (a slice of the training split)")
    for layer in layers:
        if pattern == "2:4" and (layer.experts.d_model % 4 or layer.experts.d_hidden % 4):
            raise ValueError(f"model: 2:4 needs d_model and d_hidden divisible by 4, got "
                             f"{layer.experts.d_model} and {layer.experts.d_hidden}")
    out = model if inplace else copy.deepcopy(model)
    caps = capture_experts(out, calib, outputs=False) if score == "wanda" else [None] * len(layers)
    for layer, cap in zip(moe_layers(out), caps):
        e = layer.experts
        names = [("in", e.w_in), ("gate", e.w_gate), ("out", e.w_out)]
        masks = {}
        for name, w in names:
            if w is None:
                continue
            per = []
            for i in range(e.num_experts):
                if score == "magnitude":
                    s = w[i].abs()
                else:
                    x = cap.inputs[i]
                    if name == "out":
                        x = e.act(x @ e.w_in[i], x @ e.w_gate[i] if e.w_gate is not None else None)
                    s = wanda_scores(w[i], x) if x.shape[0] else w[i].abs()  # no tokens: magnitude
                per.append(nm_mask(s) if pattern == "2:4" else _per_output_mask(s, keep))
            masks[name] = torch.stack(per)
        if pattern == "2:4":
            layer.experts = SemiStructuredExperts(e, masks, value_dtype)
        else:
            for name, w in names:
                if w is not None:
                    w.mul_(masks[name])
    return out
