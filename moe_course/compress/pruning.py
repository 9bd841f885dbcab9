"""Pruning a trained MoE (chapter 4): magnitude pruning, expert pruning (frequency, NAEE), dynamic
skipping.

* :func:`prune_magnitude` zeroes the smallest expert weights (the slide deck's technique), globally
  or per layer. Zeros inside dense tensors save no bytes and no time; :func:`csr_bytes` says what
  a compressed-sparse-row copy would store instead.
* :func:`prune_experts` physically removes whole experts (smaller :class:`~moe_course.layers.Experts`
  and a router ``Linear`` with only the kept rows), chosen by routing frequency or by NAEE's
  enumeration (Lu et al., 2024): keep the subset whose layer output changes least on calibration
  data, with the router restricted to the kept experts (:func:`restrict_router`).
* :func:`skip_experts` is NAEE's dynamic skipping: a token drops its second expert when that
  expert's gate weight is below ``beta`` times the first one's, with ``beta`` the median ratio on
  calibration data; skipped assignments are excluded from dispatch, so they cost no compute.

Every transform follows :mod:`moe_course.compress`'s convention ``f(model, keep, *, calib=None,
inplace=False, **options)`` and returns a new model (deep copy) unless ``inplace=True``.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

import torch
import torch.nn as nn

from .. import _validate
from ..calib import capture_experts, layer_inputs
from ..layers import Experts, RouterOutput, SparseMoE, TopKRouter, moe_layers, require_moe_layers

__all__ = [
    "magnitude_mask", "prune_magnitude", "csr_bytes", "sparsity_report",
    "restrict_router", "expert_frequencies", "naee_select", "keep_experts", "prune_experts",
    "SkippingRouter", "skip_experts", "skip_fraction", "score_experts", "super_experts",
]

SCOPES = ("global", "layer")
SCORES = ("frequency", "router_prob", "activation", "reap")
METHODS = SCORES + ("naee",)
MAX_SUBSETS = 5000  # above C(E, keep) subsets, NAEE falls back to greedy elimination


# ------------------------------------------------------------------------------------ checks
def _check_ratio(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:  # NaN fails too
        raise ValueError(f"{name}: expected a number in [0, 1), got {value!r}")
    return float(value)


# -------------------------------------------------------------------------- magnitude pruning
def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask (``True`` = keep) zeroing the ``round(sparsity * numel)`` smallest ``|weight|``."""
    if not torch.is_tensor(weight):
        raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    sparsity = _check_ratio("sparsity", sparsity)
    _validate.finite("weight", weight)  # NaN sorts as the largest magnitude: it would survive pruning
    return _largest(weight, weight.numel() - int(round(sparsity * weight.numel())))


def _largest(weight: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Bool mask of the ``n_keep`` largest ``|weight|`` (ties: the later index is pruned first)."""
    n_prune = weight.numel() - n_keep
    mask = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
    if n_prune:
        mask[weight.detach().abs().reshape(-1).argsort()[:n_prune]] = False
    return mask.view(weight.shape)


def _expert_params(layer) -> list[nn.Parameter]:
    e = layer.experts
    return [w for w in (e.w_in, e.w_gate, e.w_out) if w is not None]


def _weight_groups(layers: list, scope: str) -> list[list[nn.Parameter]]:
    """The expert weights pruned together: all layers' at once (``"global"``) or layer by layer."""
    if scope == "global":
        return [[p for layer in layers for p in _expert_params(layer)]]
    return [_expert_params(layer) for layer in layers]


def prune_magnitude(model: nn.Module, keep: float, *, scope: str = "global", inplace: bool = False) -> nn.Module:
    """Zero the smallest-magnitude expert weights, keeping ``keep`` of them (Han et al. 2015 style).

    ``keep``: the fraction of expert weights kept, in (0, 1] (an int: the number kept), so the
    sparsity is ``1 - keep``. ``scope="global"``: one threshold over the experts of every MoE layer
    (layers with smaller weights lose more); ``"layer"``: the same fraction in every MoE layer. The
    tensors stay dense and the same size: see :func:`sparsity_report` for what the zeros would save
    in CSR.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope: expected one of {SCOPES}, got {scope!r}")
    layers = require_moe_layers(model, "prune")
    # Packed or factored experts expose w_in/w_out as computed tensors: zeroing them would change nothing.
    _validate.dense_experts(layers, "prune_magnitude")
    counts = [_validate.keep_count(keep, sum(p.numel() for p in g), 1, "expert weights")
              for g in _weight_groups(layers, scope)]
    _validate.finite_model(model)
    model = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        for params, n_keep in zip(_weight_groups(moe_layers(model), scope), counts):
            mask = _largest(torch.cat([p.reshape(-1) for p in params]), n_keep)
            for p, m in zip(params, mask.split([p.numel() for p in params])):
                p.mul_(m.view(p.shape))
    return model


def csr_bytes(dense: torch.Tensor, index_bytes: int = 8, value_bytes: int | None = None) -> int:
    """Bytes of a CSR copy of ``dense`` viewed as a matrix ``[rows, last dim]``.

    ``nnz * (value + column index) + (rows + 1) * row pointer``; torch's CSR uses int64 indices
    (``index_bytes=8``), many kernels accept int32 (4).
    """
    if not torch.is_tensor(dense) or dense.dim() < 1:
        raise ValueError("dense: expected a tensor with at least one dimension")
    if index_bytes not in (2, 4, 8):
        raise ValueError(f"index_bytes: expected 2, 4 or 8, got {index_bytes!r}")
    _validate.positive_int("value_bytes", value_bytes, allow_none=True)
    value_bytes = dense.element_size() if value_bytes is None else value_bytes
    rows = dense.numel() // dense.shape[-1] if dense.dim() > 1 else 1
    nnz = int(torch.count_nonzero(dense))
    return nnz * (value_bytes + index_bytes) + (rows + 1) * index_bytes


def sparsity_report(model: nn.Module, index_bytes: int = 8) -> dict[str, float]:
    """Expert weights: dense bytes, fraction of zeros, and bytes as CSR (``index_bytes`` indices)."""
    layers = require_moe_layers(model, "prune")
    _validate.dense_experts(layers, "sparsity_report")  # packed/factored bytes: see metrics.size_report
    if index_bytes not in (2, 4, 8):
        raise ValueError(f"index_bytes: expected 2, 4 or 8, got {index_bytes!r}")
    params = [p for layer in layers for p in _expert_params(layer)]
    dense = sum(p.numel() * p.element_size() for p in params)
    zeros = sum(int((p == 0).sum()) for p in params)
    total = sum(p.numel() for p in params)
    return {"dense bytes": dense, "zeros": zeros / total,
            "csr bytes": sum(csr_bytes(p.detach(), index_bytes) for p in params)}


# ----------------------------------------------------------------------------- expert pruning
def restrict_router(logits: torch.Tensor, kept, k: int, renormalize: bool = True):
    """Top-k routing over the experts in ``kept`` only (NAEE): the other logits are set to
    ``-inf`` *before* the softmax, then top-k and renormalise. Returns ``(weights, indices)``,
    indices in the original numbering."""
    if not torch.is_tensor(logits) or logits.dim() != 2:
        raise ValueError(f"logits: expected shape [T, num_experts], got "
                         f"{tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__}")
    E = logits.shape[1]
    _validate.int_in("k", k, 1, E)
    kept = torch.as_tensor(kept, dtype=torch.long, device=logits.device).reshape(-1)
    if kept.numel() < k:
        raise ValueError(f"kept: expected at least k={k} experts, got {kept.numel()}")
    ids = kept.tolist()
    if len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= E:
        raise ValueError(f"kept: expected distinct expert ids in [0, {E}), got {ids}")
    masked = torch.full_like(logits.float(), float("-inf"))
    masked[:, kept] = logits.float()[:, kept]
    weights, indices = torch.softmax(masked, dim=-1).topk(k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, indices


@torch.no_grad()
def expert_frequencies(model: nn.Module, calib: Any) -> list[torch.Tensor]:
    """Per MoE layer, the fraction of top-k assignments each expert receives on ``calib``."""
    layers = require_moe_layers(model, "prune")
    xs = layer_inputs(model, calib)
    out = []
    for layer, x in zip(layers, xs):
        idx = layer.router(x).indices
        out.append(torch.bincount(idx.reshape(-1), minlength=layer.num_experts).float() / idx.numel())
    return out


@torch.no_grad()
def score_experts(model: nn.Module, calib: Any, criterion: str = "router_prob") -> list[torch.Tensor]:
    r"""Per MoE layer, one importance score per expert on ``calib`` (higher = keep):

    * ``"frequency"``: :math:`f_i`, the share of the top-k assignments expert :math:`i` receives;
    * ``"router_prob"``: :math:`P_i = \frac{1}{T}\sum_t p_i(x_t)`, the mean full-softmax router
      probability (the criterion of He et al. 2024's expert drop, chapter 9);
    * ``"activation"``: :math:`\frac{1}{|X_i|}\sum_{x \in X_i} \lVert E_i(x) \rVert_2` over the
      tokens :math:`X_i` routed to the expert, how much it writes;
    * ``"reap"``: :math:`\frac{1}{|X_i|}\sum_{x \in X_i} w_i(x)\,\lVert E_i(x) \rVert_2`, the
      router-weighted expert activation of REAP (Lasby et al. 2026): what the expert really adds to
      the layer output, on the tokens it serves.

    An expert that received no calibration token scores 0 under ``activation`` and ``reap``.
    """
    if criterion not in SCORES:
        raise ValueError(f"criterion: expected one of {SCORES}, got {criterion!r}")
    layers = require_moe_layers(model, "score")
    if criterion in ("frequency", "router_prob"):
        xs = layer_inputs(model, calib)
        out = []
        for layer, x in zip(layers, xs):
            r = layer.router(x)
            if criterion == "frequency":
                out.append(torch.bincount(r.indices.reshape(-1), minlength=layer.num_experts).float()
                           / r.indices.numel())
            else:
                out.append(torch.softmax(r.logits.float(), -1).mean(0))
        return out
    out = []
    for cap in capture_experts(model, calib):
        scores = torch.zeros(cap.num_experts)
        for e in range(cap.num_experts):
            if cap.inputs[e].shape[0] == 0:
                continue
            norms = cap.outputs[e].float().norm(dim=-1)
            scores[e] = (norms if criterion == "activation" else cap.gates[e].float() * norms).mean()
        out.append(scores)
    return out


@torch.no_grad()
def super_experts(model: nn.Module, calib: Any, factor: float = 10.0) -> list[tuple[int, int, float, float]]:
    """Experts whose output has extreme outliers ("super experts", arXiv 2507.23279): the largest
    ``|E_i(x)|`` entry over the tokens routed to each expert, compared with the median of that
    maximum over the experts of the same layer. Returns ``(layer, expert, max |output|, ratio to the
    median)`` for every expert at least ``factor`` times the median, largest first (often empty
    in small models: then the check found none)."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 1:
        raise ValueError(f"factor: expected a number > 1, got {factor!r}")
    hits = []
    for cap in capture_experts(model, calib):
        peaks = torch.tensor([float(o.abs().max()) if o.numel() else 0.0 for o in cap.outputs])
        used = peaks[[o.numel() > 0 for o in cap.outputs]]  # experts that saw no token have no peak
        median = float(used.median()) if used.numel() else 0.0
        hits += [(cap.index, e, float(p), float(p) / median) for e, p in enumerate(peaks)
                 if median > 0 and p >= factor * median]
    return sorted(hits, key=lambda h: -h[2])


def _subset_error(all_out, logits, kept, k, renormalize, ref) -> float:
    w, idx = restrict_router(logits, kept, k, renormalize)
    t = torch.arange(logits.shape[0], device=logits.device)[:, None]
    y = (all_out[t, idx] * w[..., None].to(all_out.dtype)).sum(1)  # [T, k, d] -> [T, d]
    return float(torch.linalg.norm((ref - y).double()))


@torch.no_grad()
def naee_select(layer, x: torch.Tensor, keep: int, max_subsets: int = MAX_SUBSETS) -> tuple[list[int], str]:
    """NAEE (Lu et al., 2024, Sec. 3.1): the ``keep`` experts of ``layer`` whose restricted routing
    reproduces the layer output ``Z`` on tokens ``x`` best, ``min_S ||Z - Z'(S)||_F``.

    Enumeration costs ``C(E, keep)`` evaluations of the layer; above ``max_subsets`` a greedy
    backward elimination (drop the expert whose removal hurts least, ``O(E^2)`` evaluations) is used.
    Returns ``(sorted kept ids, "enumerate" | "greedy")``.
    """
    E, k = layer.num_experts, layer.k
    _validate.int_in("keep", keep, k, E)
    _validate.int_in("max_subsets", max_subsets, 1)
    if not torch.is_tensor(x) or x.dim() != 2 or x.shape[1] != layer.d_model:
        raise ValueError(f"x: expected shape [T, d_model={layer.d_model}], got "
                         f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    _validate.finite("x", x)
    logits = layer.router(x).logits
    all_out = layer.experts.forward_all(x).transpose(0, 1)  # [T, E, d]: every expert once
    ren = layer.router.renormalize
    ref_w, ref_i = layer.router(x).weights, layer.router(x).indices
    t = torch.arange(x.shape[0], device=x.device)[:, None]
    ref = (all_out[t, ref_i] * ref_w[..., None].to(all_out.dtype)).sum(1)
    if math.comb(E, keep) <= max_subsets:
        best = min(itertools.combinations(range(E), keep),
                   key=lambda s: _subset_error(all_out, logits, list(s), k, ren, ref))
        return sorted(best), "enumerate"
    kept = list(range(E))
    while len(kept) > keep:
        drop = min(kept, key=lambda e: _subset_error(all_out, logits, [j for j in kept if j != e], k, ren, ref))
        kept.remove(drop)
    return sorted(kept), "greedy"


def keep_experts(layer, kept: list[int]) -> None:
    """Replace ``layer.experts`` and the router rows by the kept experts only (physical removal)."""
    idx = torch.tensor(kept, dtype=torch.long, device=layer.experts.w_in.device)
    old = layer.experts
    new = Experts(len(kept), old.d_model, old.d_hidden, old.activation).to(old.w_in.device, old.w_in.dtype)
    with torch.no_grad():
        for name in ("w_in", "w_gate", "w_out"):
            if getattr(old, name) is not None:
                getattr(new, name).copy_(getattr(old, name)[idx])
    layer.experts = new
    r = layer.router
    for name in ("gate", "noise"):
        lin = getattr(r, name, None)
        if lin is not None:
            small = nn.Linear(lin.in_features, len(kept), bias=False).to(lin.weight.device, lin.weight.dtype)
            with torch.no_grad():
                small.weight.copy_(lin.weight[idx])
            setattr(r, name, small)
    layer.pruned_experts = kept  # original ids of the surviving experts, for reports


def prune_experts(model: nn.Module, keep: int | float | list, *, calib: Any = None, method: str = "frequency",
                  max_subsets: int = MAX_SUBSETS, inplace: bool = False) -> nn.Module:
    """Remove whole experts from every sparse MoE layer, keeping ``keep`` per layer (an int, a
    fraction of ``E``, or one value per layer; at least ``k``).

    ``method="frequency"``: keep the experts chosen most often on ``calib`` (F-prune);
    ``"router_prob"``, ``"activation"``, ``"reap"``: keep the highest :func:`score_experts`.
    ``method="naee"``: keep the subset minimising the layer-output reconstruction error
    (:func:`naee_select`, inputs cached from the original model: NAEE's layer-wise variant).
    The kept experts' weights and router rows are copied into smaller tensors.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    _validate.int_in("max_subsets", max_subsets, 1)
    layers = require_moe_layers(model, "prune")
    for layer in layers:
        if not isinstance(layer, SparseMoE):
            raise TypeError(f"model: expert pruning needs sparse top-k MoE layers, got {type(layer).__name__}")
    counts = _validate.keep_per_layer(keep, layers)
    _validate.dense_experts(layers, "prune_experts")
    _validate.router_kind(layers, "prune_experts", ("TopKRouter", "SkippingRouter"))
    _validate.finite_model(model)
    xs = layer_inputs(model, calib)
    scores = score_experts(model, calib, method) if method != "naee" else None
    kept_all: list[list[int]] = []
    model = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        for layer, x, n in zip(moe_layers(model), xs, counts):
            if method == "naee":
                kept, _ = naee_select(layer, x, n, max_subsets)
            else:
                kept = sorted(scores[len(kept_all)].argsort(descending=True, stable=True)[:n].tolist())
            kept_all.append(kept)
            keep_experts(layer, kept)
    return model


# --------------------------------------------------------------------------- dynamic skipping
class SkippingRouter(TopKRouter):
    """A :class:`TopKRouter` that drops choice ``j >= 1`` when ``w_j < beta * w_1`` (NAEE Sec. 3.2).

    The dropped assignments get weight 0, the rest are renormalised, and ``keep`` marks them so
    that dispatch never runs them. ``calls`` / ``skipped`` count expert assignments seen.
    """

    def __init__(self, router: TopKRouter, beta: float):
        if not isinstance(router, TopKRouter):
            raise TypeError(f"router: expected a TopKRouter, got {type(router).__name__}")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta <= 1:
            raise ValueError(f"beta: expected a finite number in [0, 1], got {beta!r}")
        super().__init__(router.gate.in_features, router.num_experts, router.k, router.noisy, router.renormalize)
        self.load_state_dict(router.state_dict())
        self.to(router.gate.weight.device)
        self.register_buffer("beta", torch.tensor(float(beta)))
        self.calls, self.skipped = 0, 0

    def forward(self, x: torch.Tensor) -> RouterOutput:
        r = super().forward(x)
        keep = torch.ones_like(r.indices, dtype=torch.bool)
        keep[:, 1:] = r.weights[:, 1:] >= self.beta * r.weights[:, :1]
        w = r.weights * keep
        w = w / w.sum(-1, keepdim=True)
        self.calls += keep.numel()
        self.skipped += int((~keep).sum())
        return RouterOutput(w, r.indices, r.logits, r.probs, keep)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", beta={float(self.beta):.3f}"


@torch.no_grad()
def skip_experts(model: nn.Module, *, calib: Any = None, quantile: float = 0.5, inplace: bool = False) -> nn.Module:
    """NAEE dynamic skipping: per layer, ``beta`` = the median (``quantile``) of ``w_2 / w_1`` on
    ``calib``; each layer's router becomes a :class:`SkippingRouter`."""
    quantile = _check_ratio("quantile", quantile)
    layers = require_moe_layers(model, "prune")
    for layer in layers:
        if not isinstance(layer, SparseMoE) or layer.k < 2:
            raise ValueError(f"model: skipping needs sparse MoE layers with k >= 2, got {type(layer).__name__} k={layer.k}")
        if layer.capacity_factor is not None:
            raise ValueError("model: skipping is implemented for layers without a capacity factor "
                             "(the capacity mask would replace the skip mask)")
    _validate.router_kind(layers, "skip_experts", ("TopKRouter",))
    _validate.finite_model(model)
    xs = layer_inputs(model, calib)
    model = model if inplace else copy.deepcopy(model)
    for layer, x in zip(moe_layers(model), xs):
        w = layer.router(x).weights
        beta = torch.quantile((w[:, 1] / w[:, 0]).float(), quantile)
        layer.router = SkippingRouter(layer.router, float(beta))
    return model


def skip_fraction(model: nn.Module, reset: bool = False) -> float:
    """Fraction of expert assignments skipped since the last reset, over all skipping routers."""
    routers = [layer.router for layer in require_moe_layers(model, "prune") if isinstance(layer.router, SkippingRouter)]
    if not routers:
        raise ValueError("model: no SkippingRouter found; apply skip_experts first")
    calls, skipped = sum(r.calls for r in routers), sum(r.skipped for r in routers)
    if reset:
        for r in routers:
            r.calls, r.skipped = 0, 0
    return skipped / calls if calls else 0.0
