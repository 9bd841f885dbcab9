"""Expert trimming (chapter 9), the unified framework of He et al. (2024): expert, layer and block drop.

* :func:`drop_experts` ranks experts by their mean router probability on calibration data (per
  layer, or globally across layers) and physically removes the lowest (reusing the removal of
  :mod:`moe_course.compress.pruning`).
* :func:`drop_layers` removes the MoE sub-layers whose residual update changes the hidden state
  least: ``sim_l = mean_t cos(h_t, h_t + MoE_l(Norm(h_t)))``, one shot. The block's ``ffn`` becomes
  :class:`Skipped` (returns a scalar zero, no compute) and its norm an ``Identity``.
* :func:`drop_blocks` removes whole transformer blocks by ``mean_t cos(h_b, h_{b+n})`` between hidden
  states ``n`` blocks apart: one shot with the ``n`` largest one-block similarities, or the best
  contiguous run of ``n`` blocks (``contiguous=True``). The blocks leave ``model.blocks``.

Every transform follows :mod:`moe_course.compress`'s convention ``f(model, keep, *, calib=None,
inplace=False, **options)`` and returns a new model (deep copy) unless ``inplace=True``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _validate
from ..calib import calib_batches, layer_inputs, run
from ..layers import MoELayer, SparseMoE, moe_layers, require_moe_layers
from .pruning import SCORES, keep_experts, score_experts

__all__ = ["residual_similarity", "block_similarity", "best_contiguous_run", "expert_scores", "drop_experts",
           "layer_similarities", "Skipped", "drop_layers", "block_hidden_states", "drop_blocks"]

SCOPES = ("layer", "global")


# ------------------------------------------------------------------------------------ metrics
def residual_similarity(h: torch.Tensor, out: torch.Tensor) -> float:
    """Mean over tokens of ``cos(h_t, h_t + out_t)`` (cosine along the last, feature, dim)."""
    _check_pair("h", h, "out", out)
    h, out = h.reshape(-1, h.shape[-1]).double(), out.reshape(-1, out.shape[-1]).double()
    return float(F.cosine_similarity(h, h + out, dim=-1).mean())


def block_similarity(h_in: torch.Tensor, h_out: torch.Tensor) -> float:
    """Mean over tokens of ``cos(h_in_t, h_out_t)``."""
    _check_pair("h_in", h_in, "h_out", h_out)
    a, b = h_in.reshape(-1, h_in.shape[-1]).double(), h_out.reshape(-1, h_out.shape[-1]).double()
    return float(F.cosine_similarity(a, b, dim=-1).mean())


def _check_pair(name_a: str, a: Any, name_b: str, b: Any) -> None:
    for name, t in ((name_a, a), (name_b, b)):
        if not torch.is_tensor(t) or t.dim() < 1 or t.numel() == 0:
            raise ValueError(f"{name}: expected a non-empty tensor [..., d], got "
                             f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
    if a.shape != b.shape:
        raise ValueError(f"{name_b}: expected the shape of {name_a} {tuple(a.shape)}, got {tuple(b.shape)}")
    _validate.finite(name_a, a)
    _validate.finite(name_b, b)


def best_contiguous_run(hidden: list[torch.Tensor], n: int) -> tuple[int, float]:
    """Start ``b`` of the run of ``n`` blocks to drop: ``argmax_b mean_t cos(h_b, h_{b+n})``, with
    ``hidden`` the ``L + 1`` hidden states (input of each block, then the last block's output).
    Returns ``(b, similarity)``; ties go to the earliest run."""
    L = len(hidden) - 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= L:
        raise ValueError(f"n: expected an int in [1, {L}], got {n!r}")
    sims = [block_similarity(hidden[b], hidden[b + n]) for b in range(L - n + 1)]
    b = max(range(len(sims)), key=lambda i: sims[i])
    return b, sims[b]


# -------------------------------------------------------------------------------- expert drop
@torch.no_grad()
def expert_scores(model: nn.Module, calib: Any) -> list[torch.Tensor]:
    """Per MoE layer, the mean full-softmax router probability of each expert on ``calib``
    (the ``mean_prob`` of :func:`moe_course.metrics.routing_stats`)."""
    return score_experts(model, calib, "router_prob")


def drop_experts(model: nn.Module, keep: int | float | list, *, calib: Any = None, scope: str = "layer",
                 criterion: str = "router_prob", inplace: bool = False) -> nn.Module:
    """Expert drop: remove the experts with the lowest mean router probability on ``calib``
    (or another ``criterion`` of :func:`~moe_course.compress.pruning.score_experts`; for the
    global ranking each layer's scores are divided by their layer's sum, so layers compare).

    ``scope="layer"``: ``keep`` experts in every layer (an int, a fraction of E, or one value per
    layer); ``"global"``: ``keep`` experts in total (an int, or a fraction of all experts), ranked
    across layers, with at least ``k`` kept in each layer. Experts and router rows are physically
    removed.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope: expected one of {SCOPES}, got {scope!r}")
    layers = require_moe_layers(model, "trim")
    for layer in layers:
        if not isinstance(layer, SparseMoE):
            raise TypeError(f"model: expert drop needs sparse top-k MoE layers, got {type(layer).__name__}")
    if scope == "layer":
        counts = _validate.keep_per_layer(keep, layers)
    else:
        lo, total = sum(layer.k for layer in layers), sum(layer.num_experts for layer in layers)
        n = _validate.keep_count(keep, total, lo, "experts in total over all layers",
                                 f"between {lo} (k per layer) and {total}")
    _validate.dense_experts(layers, "drop_experts")
    _validate.router_kind(layers, "drop_experts", ("TopKRouter", "SkippingRouter"))
    _validate.finite_model(model)
    if criterion not in SCORES:
        raise ValueError(f"criterion: expected one of {SCORES}, got {criterion!r}")
    scores = [s / s.sum().clamp(min=1e-12) for s in score_experts(model, calib, criterion)]
    if scope == "layer":
        kept = [sorted(s.argsort(descending=True, stable=True)[:c].tolist()) for s, c in zip(scores, counts)]
    else:
        kept = [sorted(s.argsort(descending=True, stable=True)[:layer.k].tolist()) for s, layer in zip(scores, layers)]
        rest = sorted(((float(s[e]), l, e) for l, s in enumerate(scores) for e in range(len(s)) if e not in kept[l]),
                      reverse=True)
        for _, l, e in rest[:n - sum(len(k) for k in kept)]:
            kept[l].append(e)
        kept = [sorted(k) for k in kept]
    model = model if inplace else copy.deepcopy(model)
    for layer, ids in zip(moe_layers(model), kept):
        if len(ids) < layer.num_experts:
            keep_experts(layer, ids)
    return model


# --------------------------------------------------------------------------------- layer drop
class Skipped(nn.Module):
    """Stands for a dropped MoE sub-layer: returns a scalar zero, so ``x + ffn(norm(x))`` is ``x``
    and nothing is computed."""

    def __init__(self, index: int | None = None) -> None:
        super().__init__()
        if index is not None:
            _validate.int_in("index", index, 0)
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(())

    def extra_repr(self) -> str:
        return f"dropped block {self.index}"


def _moe_blocks(model: nn.Module) -> list[int]:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError("model: expected a model with .blocks (MoETransformerLM / MoEClassifier)")
    return [i for i, b in enumerate(blocks) if isinstance(getattr(b, "ffn", None), MoELayer)]


@torch.no_grad()
def layer_similarities(model: nn.Module, calib: Any) -> dict[int, float]:
    """``{block index: mean_t cos(h_t, h_t + MoE(Norm(h_t)))}`` for every block with an MoE ``ffn``;
    ``h`` is the residual stream entering the block's FFN norm."""
    require_moe_layers(model, "trim")
    batches = calib_batches(calib, model)
    idx = _moe_blocks(model)
    hs = {i: [] for i in idx}
    outs = {i: [] for i in idx}
    hooks = []
    for i in idx:
        b = model.blocks[i]
        hooks.append(b.ln_ffn.register_forward_pre_hook(lambda m, a, i=i: hs[i].append(a[0].reshape(-1, a[0].shape[-1]))))
        hooks.append(b.ffn.register_forward_hook(lambda m, a, o, i=i: outs[i].append(o.reshape(-1, o.shape[-1]))))
    run(model, batches, hooks)
    return {i: residual_similarity(torch.cat(hs[i]), torch.cat(outs[i])) for i in idx}


def drop_layers(model: nn.Module, keep: int | float, *, calib: Any = None, inplace: bool = False) -> nn.Module:
    """Layer drop: keep ``keep`` of the MoE sub-layers (an int, or a fraction of them; at least one)
    and remove the others, those with the largest :func:`layer_similarities` (one shot). Each
    dropped block's ``ffn`` becomes :class:`Skipped` and its ``ln_ffn`` an ``Identity``, so the
    block computes only its token mixer."""
    require_moe_layers(model, "trim")
    idx = _moe_blocks(model)
    n = len(idx) - _validate.keep_count(keep, len(idx), 1, "MoE layers")
    sims = layer_similarities(model, calib)
    drop = sorted(sorted(sims, key=lambda i: -sims[i])[:n])
    model = model if inplace else copy.deepcopy(model)
    for i in drop:
        model.blocks[i].ffn = Skipped(i)
        model.blocks[i].ln_ffn = nn.Identity()
    model.dropped_layers = sorted(getattr(model, "dropped_layers", []) + drop)
    return model


# --------------------------------------------------------------------------------- block drop
@torch.no_grad()
def block_hidden_states(model: nn.Module, calib: Any) -> list[torch.Tensor]:
    """The ``L + 1`` hidden states ``[T, d]`` on ``calib``: the input of every block, then the
    output of the last one."""
    if not isinstance(getattr(model, "blocks", None), nn.ModuleList) or not len(model.blocks):
        raise TypeError("model: expected a model with .blocks (MoETransformerLM / MoEClassifier)")
    batches = calib_batches(calib, model)
    blocks = model.blocks
    store = [[] for _ in range(len(blocks) + 1)]
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: store[i].append(a[0].reshape(-1, a[0].shape[-1])))
             for i, b in enumerate(blocks)]
    hooks.append(blocks[-1].register_forward_hook(lambda m, a, o: store[-1].append(o.reshape(-1, o.shape[-1]))))
    run(model, batches, hooks)
    return [torch.cat(s) for s in store]


def drop_blocks(model: nn.Module, keep: int | float, *, calib: Any = None, contiguous: bool = False,
                inplace: bool = False) -> nn.Module:
    """Block drop: keep ``keep`` whole blocks of ``model.blocks`` (an int, or a fraction of them; at
    least one) and remove the other ``n``.

    ``contiguous=False`` (one shot, as He et al.): the ``n`` blocks with the largest
    ``mean_t cos(h_b, h_{b+1})``; ``contiguous=True``: the run ``b .. b+n-1`` maximising
    ``mean_t cos(h_b, h_{b+n})`` (:func:`best_contiguous_run`).
    """
    require_moe_layers(model, "trim")
    if getattr(model, "blocks", None) is None:
        raise TypeError("model: expected a model with .blocks (MoETransformerLM / MoEClassifier)")
    n = len(model.blocks) - _validate.keep_count(keep, len(model.blocks), 1, "blocks")
    hidden = block_hidden_states(model, calib)
    if n == 0:
        drop = []
    elif contiguous:
        b, _ = best_contiguous_run(hidden, n)
        drop = list(range(b, b + n))
    else:
        sims = [block_similarity(hidden[b], hidden[b + 1]) for b in range(len(model.blocks))]
        drop = sorted(sorted(range(len(sims)), key=lambda b: -sims[b])[:n])
    model = model if inplace else copy.deepcopy(model)
    model.blocks = nn.ModuleList([b for i, b in enumerate(model.blocks) if i not in drop])
    model.dropped_blocks = drop
    return model
