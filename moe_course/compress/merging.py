r"""Expert merging: permutation alignment, M-SMoE, HC-SMoE and MC-SMoE (chapter 8).

* Permutation alignment (Ainsworth et al., 2023; Li et al., 2024): an expert
  :math:`W^{out}\phi(W^{in}x)` computes the same function after any permutation :math:`P` of its
  hidden neurons, ``(W_in P, P^T W_out)``. Before averaging two experts we choose
  :math:`P = \arg\max_P \langle W^{in}_{ref}, W^{in} P\rangle + \langle W^{out}_{ref}, P^T W^{out}\rangle`
  (plus ``w_gate`` for SwiGLU), one linear assignment problem (:func:`match_neurons`,
  :func:`align_experts`).
* M-SMoE (Li et al., 2024): the ``g`` experts used most on calibration data are *dominant*; every
  other expert joins its most similar dominant expert (router-logit, expert-output or weight
  similarity); each group is averaged with frequency weights :math:`\sum_j f_j W_j / \sum_j f_j`
  (:func:`frequency_weighted_merge`, :func:`merge_experts`).
* The merged layer stores each group's expert ONCE (an :class:`~moe_course.layers.Experts` with
  ``g`` experts) and keeps the original router over ``N`` experts: a :class:`MergedRouter` maps the
  top-k slots to groups and sums the gates of choices landing in the same group.
* MC-SMoE's adaptive merging ratio (Li et al., 2024): with ``scope="global"`` the dominant experts
  are the most frequent of ALL layers ranked together under one budget, so each layer keeps its
  own number of groups (:func:`adaptive_merge_counts`).
* HC-SMoE (Chen et al., 2025): average-linkage hierarchical clustering of the experts' mean outputs
  on calibration data, then frequency-weighted merging (:func:`hc_smoe`).
* MC-SMoE (Li et al., 2024): each merged matrix becomes a truncated SVD plus a sparse residual that
  keeps the largest ``keep_sparse`` fraction of entries (:class:`LowRankSparseExperts`, :func:`mc_smoe`).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.optimize import linear_sum_assignment

from .. import _validate
from ..calib import layer_inputs
from ..layers import Experts, RouterOutput, SparseMoE, TopKRouter, moe_layers, require_moe_layers
from .lowrank import FactoredExperts, expert_matrices, truncated_svd

__all__ = ["SIMILARITIES", "WEIGHTINGS", "match_neurons", "permute_expert", "align_experts",
           "frequency_weighted_merge", "expert_similarity", "MergedRouter", "merge_experts", "hc_smoe",
           "SCOPES", "adaptive_merge_counts",
           "LowRankSparseExperts", "mc_smoe", "stable_rank", "expert_stable_ranks"]

SIMILARITIES = ("router-logits", "expert-outputs", "weights")
WEIGHTINGS = ("frequency", "uniform")
SCOPES = ("layer", "global")


# ----------------------------------------------------------------------------- alignment
def match_neurons(ref_in: torch.Tensor, ref_out: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor,
                  ref_gate: torch.Tensor | None = None, w_gate: torch.Tensor | None = None) -> torch.Tensor:
    r"""Permutation ``perm`` of the hidden neurons of ``(w_in [d,h], w_out [h,d])`` matching the reference.

    ``w_in[:, perm]``, ``w_out[perm]`` (and ``w_gate[:, perm]``) is the aligned expert. The cost of
    pairing reference neuron ``a`` with neuron ``b`` is the similarity of both their weights,
    ``C = ref_in^T w_in + ref_out w_out^T (+ ref_gate^T w_gate)``, and ``perm`` maximises
    :math:`\sum_a C_{a, perm(a)}`, which equals minimising :math:`\|W_{ref} - W P\|_F^2`.
    """
    if ref_in.shape != w_in.shape or ref_out.shape != w_out.shape:
        raise ValueError(f"w_in, w_out: expected the reference's shapes {tuple(ref_in.shape)}, {tuple(ref_out.shape)}, "
                         f"got {tuple(w_in.shape)}, {tuple(w_out.shape)}")
    if (ref_gate is None) != (w_gate is None):
        raise ValueError("w_gate: give a gate for both the reference and the expert, or for neither")
    for name, t in (("ref_in", ref_in), ("ref_out", ref_out), ("w_in", w_in), ("w_out", w_out),
                    ("ref_gate", ref_gate), ("w_gate", w_gate)):
        _validate.finite(name, t)
    c = ref_in.double().T @ w_in.double() + ref_out.double() @ w_out.double().T
    if ref_gate is not None:
        c = c + ref_gate.double().T @ w_gate.double()
    rows, cols = linear_sum_assignment(c.detach().cpu().numpy(), maximize=True)
    return torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long, device=w_in.device)


def permute_expert(experts: Experts, i: int, perm: torch.Tensor) -> None:
    """Permute expert ``i``'s hidden neurons in place (the function it computes does not change)."""
    if isinstance(experts, Experts) and type(experts) is not Experts:
        raise TypeError(f"experts: expected dense moe_course.layers.Experts, got {type(experts).__name__} "
                        "(its w_in/w_out are computed, so permuting them in place would change nothing)")
    if not isinstance(experts, Experts):
        raise TypeError(f"experts: expected a moe_course.layers.Experts, got {type(experts).__name__}")
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < experts.num_experts:
        raise IndexError(f"i: expected an expert index in [0, {experts.num_experts}), got {i!r}")
    perm = torch.as_tensor(perm)
    h = experts.d_hidden
    if perm.shape != (h,) or perm.is_floating_point() or not torch.equal(perm.sort().values.long().cpu(), torch.arange(h)):
        raise ValueError(f"perm: expected a permutation of range({h}), got shape {tuple(perm.shape)}"
                         + ("" if perm.shape != (h,) else " with repeated or out-of-range ids"))
    with torch.no_grad():
        experts.w_in[i] = experts.w_in[i][:, perm]
        if experts.w_gate is not None:
            experts.w_gate[i] = experts.w_gate[i][:, perm]
        experts.w_out[i] = experts.w_out[i][perm]


def _align_layer(experts: Experts, ref: int) -> None:
    w_in, w_gate, w_out = experts.weights()
    for j in range(experts.num_experts):
        if j != ref:
            perm = match_neurons(w_in[ref], w_out[ref], w_in[j], w_out[j],
                                 None if w_gate is None else w_gate[ref], None if w_gate is None else w_gate[j])
            permute_expert(experts, j, perm)


def _check_layers(model: nn.Module, action: str) -> list:
    layers = require_moe_layers(model, action)
    for layer in layers:
        if not isinstance(layer, SparseMoE) or type(layer.experts) is not Experts or type(layer.router) is not TopKRouter:
            raise TypeError(f"model: {action} needs sparse top-k MoE layers with dense Experts and a plain TopKRouter "
                            f"(apply it before other compressions), got {type(layer).__name__} with "
                            f"{type(layer.experts).__name__} and {type(layer.router).__name__}")
    _validate.finite_model(model)
    return layers


def _frequencies(layer, x: torch.Tensor) -> torch.Tensor:
    """Fraction of the top-k assignments of tokens ``x`` that each expert receives (sums to 1)."""
    idx = layer.router(x).indices
    return torch.bincount(idx.reshape(-1), minlength=layer.num_experts).double() / idx.numel()


def align_experts(model: nn.Module, *, calib: Any = None, inplace: bool = False) -> nn.Module:
    """Permute every expert's hidden neurons to match a reference expert of its layer (weight matching).

    The reference is the layer's most frequent expert on ``calib`` (or expert 0 without calibration
    data). The model computes exactly the same function; ``layer.alignment_reference`` records it.
    """
    layers = _check_layers(model, "align")
    refs = [0] * len(layers)
    if calib is not None:
        xs = layer_inputs(model, calib)
        with torch.no_grad():
            refs = [int(_frequencies(layer, x).argmax()) for layer, x in zip(layers, xs)]
    model = model if inplace else copy.deepcopy(model)
    for layer, ref in zip(moe_layers(model), refs):
        _align_layer(layer.experts, ref)
        layer.alignment_reference = ref
    return model


# ----------------------------------------------------------------------------- merging
def frequency_weighted_merge(weights: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    r"""``sum_j f_j W_j / sum_j f_j`` over the first axis of ``weights [n, ...]`` (``freqs [n]``, >= 0).

    All-zero frequencies (a group nobody uses) fall back to the uniform average.
    """
    f = torch.as_tensor(freqs, dtype=torch.float64, device=weights.device).reshape(-1)
    _validate.finite("freqs", f)
    _validate.finite("weights", weights)
    if f.numel() != weights.shape[0]:
        raise ValueError(f"freqs: expected {weights.shape[0]} frequencies, got {f.numel()}")
    if (f < 0).any():
        raise ValueError("freqs: frequencies must be >= 0")
    if f.sum() <= 0:
        f = torch.ones_like(f)
    f = (f / f.sum()).to(weights.dtype)
    return torch.tensordot(f, weights, dims=1)


def _cosine(feats: torch.Tensor) -> torch.Tensor:
    f = feats.double()
    f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return f @ f.T


@torch.no_grad()
def expert_similarity(layer, x: torch.Tensor, similarity: str = "router-logits") -> torch.Tensor:
    r"""``[N, N]`` similarity of the layer's experts on calibration tokens ``x``.

    ``"router-logits"``: :math:`(\cos(H_{:,i}, H_{:,j}) + 1)/2` of the router logit columns (M-SMoE's
    default); ``"expert-outputs"``: cosine of the experts' mean outputs on all tokens (HC-SMoE's
    feature); ``"weights"``: cosine of the flattened expert weights.
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity: expected one of {SIMILARITIES}, got {similarity!r}")
    if not torch.is_tensor(x) or x.dim() != 2 or x.shape[1] != layer.d_model:
        raise ValueError(f"x: expected shape [T, d_model={layer.d_model}], got "
                         f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    if similarity == "router-logits":
        return (_cosine(layer.router(x).logits.T) + 1) / 2
    if similarity == "expert-outputs":
        return _cosine(layer.experts.forward_all(x).mean(dim=1))
    w_in, w_gate, w_out = layer.experts.weights()
    parts = [w.reshape(w.shape[0], -1) for w in (w_in, w_gate, w_out) if w is not None]
    return _cosine(torch.cat(parts, dim=1))


class MergedRouter(TopKRouter):
    """The original router over ``N`` experts, followed by a slot -> group map.

    Softmax and top-k run over the ``N`` original logits exactly as before; the chosen slots are
    mapped to their groups, and when several of a token's top-k choices land in the same group their
    gates are summed on the first and the others are marked not kept (weight 0, never run). The
    output's ``logits``/``probs`` are per group (log-sum-exp / sum over members), so routing
    statistics and the balance loss see the ``num_groups`` experts that are actually stored.
    """

    def __init__(self, router: TopKRouter, slot_to_group: torch.Tensor):
        super().__init__(router.gate.in_features, router.num_experts, router.k, router.noisy, router.renormalize)
        self.load_state_dict(router.state_dict())
        self.to(router.gate.weight.device)
        s2g = torch.as_tensor(slot_to_group, dtype=torch.long, device=router.gate.weight.device)
        if s2g.shape != (router.num_experts,):
            raise ValueError(f"slot_to_group: expected {router.num_experts} entries, got shape {tuple(s2g.shape)}")
        if set(s2g.tolist()) != set(range(int(s2g.max()) + 1)):
            raise ValueError(f"slot_to_group: expected group ids 0..G-1 each used at least once, got {s2g.tolist()}")
        self.register_buffer("slot_to_group", s2g)
        self.num_groups = int(s2g.max()) + 1

    def forward(self, x: torch.Tensor) -> RouterOutput:
        r = super().forward(x)
        g = self.slot_to_group[r.indices]                               # [T, k] group of each choice
        same = g[:, :, None] == g[:, None, :]                           # [T, k, k]
        earlier = torch.ones(g.shape[1], g.shape[1], dtype=torch.bool, device=g.device).tril(-1)
        dup = (same & earlier).any(-1)                                  # an earlier choice has this group
        w = torch.where(dup, torch.zeros_like(r.weights), (same * r.weights[:, None, :]).sum(-1))
        t, n = r.logits.shape[0], self.num_groups
        idx = self.slot_to_group.expand(t, -1)
        probs = r.probs.new_zeros(t, n).scatter_add_(1, idx, r.probs)
        logits = torch.full((t, n), float("-inf"), dtype=r.logits.dtype, device=r.logits.device)
        logits = logits.scatter_reduce(1, idx, r.logits, reduce="amax")
        logits = logits + torch.zeros_like(logits).scatter_add_(1, idx, (r.logits - logits.gather(1, idx)).exp()).log()
        keep = ~dup if r.keep is None else (r.keep & ~dup)
        return RouterOutput(w, g, logits, probs, keep)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, slot_to_group={self.slot_to_group.tolist()}"


def _merge_layer(layer, labels: list[int], freq: torch.Tensor, align: bool, weighting: str) -> None:
    """Replace ``layer.experts`` by one merged expert per group and the router by a :class:`MergedRouter`."""
    old = layer.experts
    n_groups = max(labels) + 1
    w_in, w_gate, w_out = (None if w is None else w.detach().clone() for w in old.weights())
    work = Experts(old.num_experts, old.d_model, old.d_hidden, old.activation).to(w_in.device, w_in.dtype)
    with torch.no_grad():
        work.w_in.copy_(w_in); work.w_out.copy_(w_out)
        if w_gate is not None:
            work.w_gate.copy_(w_gate)
    new = Experts(n_groups, old.d_model, old.d_hidden, old.activation).to(w_in.device, w_in.dtype)
    members = []
    for grp in range(n_groups):
        m = [i for i, lab in enumerate(labels) if lab == grp]
        ref = max(m, key=lambda i: (float(freq[i]), -i))                # the group's most used expert
        if align:
            for j in m:
                if j != ref:
                    perm = match_neurons(work.w_in[ref], work.w_out[ref], work.w_in[j], work.w_out[j],
                                         None if w_gate is None else work.w_gate[ref],
                                         None if w_gate is None else work.w_gate[j])
                    permute_expert(work, j, perm)
        f = freq[m] if weighting == "frequency" else torch.ones(len(m))
        idx = torch.tensor(m, device=w_in.device)
        with torch.no_grad():
            for name in ("w_in", "w_gate", "w_out"):
                if getattr(work, name) is not None:
                    getattr(new, name)[grp] = frequency_weighted_merge(getattr(work, name)[idx], f)
        members.append(m)
    layer.experts = new
    layer.router = MergedRouter(layer.router, torch.tensor(labels))
    layer.merged_groups = members


def _prepare(model, calib, keep, action):
    layers = _check_layers(model, action)
    counts = _validate.keep_per_layer(keep, layers, "merged experts per layer")
    xs = layer_inputs(model, calib)
    return layers, counts, xs


def _global_counts(freqs: list[torch.Tensor], keep: Any, layers: list) -> list[int]:
    """MC-SMoE's adaptive ratio: groups per layer from ONE ranking of every layer's frequencies."""
    if isinstance(keep, (list, tuple)):
        raise ValueError("keep: with scope='global' expected one total (an int over all layers) or a "
                         f"fraction of all experts, not one value per layer, got {keep!r}")
    lo, total = len(layers), sum(layer.num_experts for layer in layers)
    n = _validate.keep_count(keep, total, lo, "merged experts in total over all layers",
                             f"between {lo} (one per layer) and {total}")
    counts = [1] * len(layers)                          # every layer keeps its most frequent expert
    rest = []
    for l, f in enumerate(freqs):
        order = f.argsort(descending=True, stable=True).tolist()
        rest += [(-float(f[e]), l, rank) for rank, e in enumerate(order[1:], 1)]
    rest.sort()                                          # highest frequency first; ties: earlier layer
    for _, l, _ in rest[:n - lo]:
        counts[l] += 1
    return counts


@torch.no_grad()
def adaptive_merge_counts(model: nn.Module, calib: Any, keep: int | float) -> list[int]:
    r"""MC-SMoE's adaptive merging ratio (Li et al., 2024): how many groups each MoE layer keeps
    when ``keep`` dominant experts in total (an int over all layers, or a fraction of all experts)
    are chosen by ranking the routing frequencies of ALL layers together.

    With :math:`f_{\ell,i}` the share of layer :math:`\ell`'s top-k assignments that expert
    :math:`i` receives on ``calib`` (it sums to 1 in every layer), every layer first keeps its most
    frequent expert, then the remaining ``keep - L`` places go to the highest :math:`f_{\ell,i}`
    over all other experts of all layers, whatever their layer (the paper's threshold rule
    :math:`G_\ell = \#\{i : f_{\ell,i} > \tau\}`, with ties broken so that the budget holds
    exactly). A layer whose router spreads its tokens evenly keeps more groups than one that sends
    most tokens to a few experts. Returns ``[G_0, ..., G_{L-1}]`` (each in ``[1, N]``, summing to
    the budget); :func:`merge_experts` with ``scope="global"`` merges with these counts.
    """
    layers = _check_layers(model, "merge")
    xs = layer_inputs(model, calib)
    return _global_counts([_frequencies(layer, x).cpu() for layer, x in zip(layers, xs)], keep, layers)


def merge_experts(model: nn.Module, keep: int | float | list, *, calib: Any = None, align: bool = True,
                  similarity: str = "router-logits", weighting: str = "frequency", scope: str = "layer",
                  inplace: bool = False) -> nn.Module:
    """M-SMoE (Li et al., 2024): merge each layer's experts into ``keep`` groups.

    ``scope="layer"`` (default): ``keep`` groups in every layer (an int, a fraction of ``N``, or one
    value per layer; at least ``k``). ``scope="global"``: MC-SMoE's adaptive merging ratio,
    ``keep`` groups in total over all layers (an int in ``[L, L*N]``, or a fraction of all
    experts; the paper's average of ``g`` per layer is ``keep=g*L``), split between the layers by
    one ranking of all layers' routing frequencies (:func:`adaptive_merge_counts`): every layer
    keeps at least one group (a layer with fewer groups than ``k`` still routes top-k over its
    ``N`` slots; choices in one group are summed), at most ``N``.

    Dominant experts = the layer's ``G_l`` most frequent on ``calib`` (training split); every other
    expert joins its most similar dominant expert (``similarity``); each group is aligned to its
    dominant expert (``align``) and averaged with ``weighting="frequency"`` or ``"uniform"`` weights.
    The merged layer stores ``G_l`` experts (``layer.merged_groups`` lists the members) and the
    returned model's ``merged_counts`` lists ``G_l`` per layer.
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity: expected one of {SIMILARITIES}, got {similarity!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting: expected one of {WEIGHTINGS}, got {weighting!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope: expected one of {SCOPES}, got {scope!r}")
    if scope == "layer":
        layers, counts, xs = _prepare(model, calib, keep, "merge")
    else:
        layers = _check_layers(model, "merge")
        xs = layer_inputs(model, calib)
    plans = []
    with torch.no_grad():
        freqs = [_frequencies(layer, x).cpu() for layer, x in zip(layers, xs)]
        if scope == "global":
            counts = _global_counts(freqs, keep, layers)
        for layer, g, x, freq in zip(layers, counts, xs, freqs):
            order = freq.argsort(descending=True, stable=True).tolist()
            dominant = order[:g]
            sim = expert_similarity(layer, x, similarity).cpu()
            labels = [0] * layer.num_experts
            for grp, e in enumerate(dominant):
                labels[e] = grp
            for e in order[g:]:
                labels[e] = int(sim[e, dominant].argmax())
            plans.append((labels, freq))
    model = model if inplace else copy.deepcopy(model)
    for layer, (labels, freq) in zip(moe_layers(model), plans):
        _merge_layer(layer, labels, freq, align, weighting)
    model.merged_counts = list(counts)
    return model


def hc_smoe(model: nn.Module, keep: int | float | list, *, calib: Any = None, align: bool = False,
            inplace: bool = False) -> nn.Module:
    """HC-SMoE (Chen et al., 2025): average-linkage hierarchical clustering of the experts' mean outputs
    on ALL calibration tokens (Euclidean distance) into ``keep`` clusters per layer (as for
    :func:`merge_experts`), then frequency-weighted merging of each cluster (no alignment by
    default, as in the paper)."""
    layers, counts, xs = _prepare(model, calib, keep, "merge")
    plans = []
    with torch.no_grad():
        for layer, g, x in zip(layers, counts, xs):
            feats = layer.experts.forward_all(x).mean(dim=1).double().cpu().numpy()   # [N, d]
            tree = linkage(feats, method="average", metric="euclidean")
            raw = cut_tree(tree, n_clusters=g).reshape(-1).tolist()
            first = {}
            labels = [first.setdefault(c, len(first)) for c in raw]                 # 0..g-1 in expert order
            plans.append((labels, _frequencies(layer, x).cpu()))
    model = model if inplace else copy.deepcopy(model)
    for layer, (labels, freq) in zip(moe_layers(model), plans):
        _merge_layer(layer, labels, freq, align, "frequency")
    return model


# ----------------------------------------------------------------------------- MC-SMoE
def stable_rank(w: torch.Tensor) -> torch.Tensor:
    r"""Stable rank :math:`\|W\|_F^2 / \|W\|_2^2` of a matrix or each matrix of a batch ``[..., m, n]``."""
    if not torch.is_tensor(w) or w.dim() < 2 or not w.is_floating_point():
        raise ValueError(f"w: expected a floating-point tensor with at least 2 dimensions, got "
                         f"{tuple(w.shape) if torch.is_tensor(w) else type(w).__name__}")
    _validate.finite("w", w)
    s = torch.linalg.svdvals(w.detach().double())
    # a zero matrix has stable rank 0 (not 0/0 = NaN)
    return (s.square().sum(-1) / s[..., 0].square().clamp_min(torch.finfo(torch.float64).tiny)).float()


def expert_stable_ranks(model: nn.Module, name: str = "in") -> list[torch.Tensor]:
    """Per MoE layer, the stable rank of every expert's ``w_{name}`` (``"in"``, ``"gate"``, ``"out"``)."""
    layers = require_moe_layers(model, "measure")
    if name not in ("in", "gate", "out"):
        raise ValueError(f"name: expected one of ('in', 'gate', 'out'), got {name!r}")
    out = []
    for layer in layers:
        w = expert_matrices(layer.experts)[name]
        if w is None:
            raise ValueError(f"name: the experts have no '{name}' matrix")
        out.append(stable_rank(w))
    return out


class LowRankSparseExperts(FactoredExperts):
    r"""Experts stored as ``W = L R + S``: a truncated SVD of rank ``rank`` plus a sparse residual.

    ``S`` keeps the ``keep_sparse`` fraction of largest-magnitude entries of ``W - L R`` per matrix,
    stored honestly as values (float parameters) and int32 flat indices (buffers), so
    :func:`moe_course.metrics.size_report` counts what is really kept (MC-SMoE's LoSparse-style
    compression, one-shot, without the progressive pruning during fine-tuning).
    """

    def __init__(self, experts: Experts, rank: int, keep_sparse: float):
        self._init_sizes(experts)
        if isinstance(keep_sparse, bool) or not isinstance(keep_sparse, (int, float)) or not 0 <= keep_sparse < 1:
            raise ValueError(f"keep_sparse: expected a number in [0, 1), got {keep_sparse!r}")
        self.rank, self.keep_sparse = rank, float(keep_sparse)
        with torch.no_grad():
            for name, w in expert_matrices(experts).items():
                if name not in self._names:
                    continue
                w = w.detach()
                left, right = truncated_svd(w, rank)
                resid = (w - left @ right).reshape(w.shape[0], -1)
                nnz = int(round(self.keep_sparse * resid.shape[1]))
                idx = resid.abs().topk(nnz, dim=1).indices.sort(dim=1).values
                self.register_parameter(f"{name}_L", nn.Parameter(left.contiguous()))
                self.register_parameter(f"{name}_R", nn.Parameter(right.contiguous()))
                self.register_parameter(f"{name}_S", nn.Parameter(resid.gather(1, idx).contiguous()))
                self.register_buffer(f"{name}_idx", idx.to(torch.int32))

    def sparse(self, name: str, i: int) -> torch.Tensor:
        m, n = getattr(self, f"{name}_L").shape[1], getattr(self, f"{name}_R").shape[2]
        vals = getattr(self, f"{name}_S")[i]
        dense = vals.new_zeros(m * n).scatter(0, getattr(self, f"{name}_idx")[i].long(), vals)
        return dense.view(m, n)

    def matrix(self, name: str, i: int) -> torch.Tensor:
        return getattr(self, f"{name}_L")[i] @ getattr(self, f"{name}_R")[i] + self.sparse(name, i)

    def project(self, name: str, i: int, x: torch.Tensor) -> torch.Tensor:
        left, right = getattr(self, f"{name}_L")[i].to(x.dtype), getattr(self, f"{name}_R")[i].to(x.dtype)
        return (x @ left) @ right + x @ self.sparse(name, i).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, keep_sparse={self.keep_sparse}"


def mc_smoe(model: nn.Module, keep: int | float | list, *, calib: Any = None, rank: int, keep_sparse: float,
            inplace: bool = False, **merge_options) -> nn.Module:
    """MC-SMoE (Li et al., 2024): :func:`merge_experts` into ``keep`` experts per layer (or, with
    ``scope="global"`` in ``merge_options``, ``keep`` in total under the adaptive merging ratio),
    then every merged expert matrix becomes a rank-``rank`` truncated SVD plus a sparse residual
    keeping ``keep_sparse`` of its entries (``merge_options`` go to :func:`merge_experts`)."""
    layers = _check_layers(model, "merge")
    if isinstance(keep_sparse, bool) or not isinstance(keep_sparse, (int, float)) or not 0 <= keep_sparse < 1:
        raise ValueError(f"keep_sparse: expected a number in [0, 1), got {keep_sparse!r}")
    lim = min(layers[0].experts.d_model, layers[0].experts.d_hidden)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= lim:
        raise ValueError(f"rank: expected an integer in [1, {lim}], got {rank!r}")
    merged = merge_experts(model, keep, calib=calib, inplace=inplace, **merge_options)
    for layer in moe_layers(merged):
        layer.experts = LowRankSparseExperts(layer.experts, rank, keep_sparse)
    return merged
