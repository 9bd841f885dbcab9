"""Token -> expert dispatch (chapter 2, section "fast dispatch"): three strategies that compute the
same function.

Given router decisions ``weights [T, k]`` and ``indices [T, k]``, every strategy computes

.. math:: y_t = \\sum_{j=1}^{k} w_{t,j} \\, E_{i_{t,j}}(x_t)

for the assignments kept by the capacity mask (a dropped assignment contributes 0).

* ``naive``: the slide deck's per-token loop (one tiny matmul per token and choice). Correct,
  readable, and 30-100x slower than the others: the strawman.
* ``loop``: one gather + matmul + ``index_add`` per expert (the HF transformers "eager" path).
* ``grouped``: sort assignments by expert once, run every expert in one ``F.grouped_mm`` call
  per projection, scatter back. On GPUs with bf16 this is one kernel; on CPU torch falls back to
  a C++ loop of matmuls, so it is about as fast as ``loop``.

``auto`` picks per device type, number of experts and batch size from measurements
(``bench/dispatch.py --grid``): see ``resolve_strategy``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from moe_course import _validate

STRATEGIES = ("naive", "loop", "grouped")
# "auto" on the CPU, from the grid of bench/dispatch.py --grid (N in {8, 64}, k in {1, 2, 8},
# T in {1, 8, 64, 4096}, the course's and OLMoE's d and f; 2 shared cores):
# * one token (decode at batch 1): "naive", k small matmuls and nothing else; loop and grouped pay
#   for bincount, sort and scatter bookkeeping that is larger than the work at these sizes;
# * otherwise "grouped" (one grouped_mm call per projection), except when every expert gets many
#   assignments on average (T k / N >= LOOP_MIN_PER_EXPERT), where the per-expert loop's plain
#   matmuls were as fast or faster (e.g. N = 8, k = 2, T = 4096).
# On GPUs grouped_mm is one kernel instead of N launches: always "grouped".
AUTO = {"cpu": "grouped", "cuda": "grouped", "mps": "loop"}
LOOP_MIN_PER_EXPERT = 1024  # assignments per expert at or above which the CPU uses loop
SMALL_BATCH_ASSIGNMENTS = 1024  # without num_experts: at or below this many assignments, grouped


def dispatch(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    experts: ExpertsLike,
    strategy: str = "auto",
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the chosen experts on their tokens and mix the results with the gate weights.

    Args:
        x: ``[T, d_model]`` tokens.
        weights: ``[T, k]`` gate weights (already renormalised or not: used as given).
        indices: ``[T, k]`` expert ids in ``[0, num_experts)``.
        experts: the stacked :class:`~moe_course.layers.Experts`.
        strategy: ``"naive" | "loop" | "grouped" | "auto"``.
        keep: optional bool ``[T, k]`` capacity mask; dropped assignments contribute 0.
    Returns:
        ``[T, d_model]``, ``sum_j w_tj E_{i_tj}(x_t)`` over kept assignments.
    """
    _check_dispatch(x, weights, indices, experts, keep)
    resolved = resolve_strategy(strategy, x.device, indices.numel(), experts.num_experts, x.shape[0])
    # Experts stored in a packed format bring their own kernels (e.g. QuantizedExperts: torch's
    # weight-only int8/int4 matmuls), so "auto" and "loop" never dequantize all experts to run k.
    runs_kernels = getattr(experts, "runs_kernels", None)
    if runs_kernels is not None and (strategy == "auto" or resolved == "loop") and runs_kernels(x):
        return experts.kernel_forward(x, weights.to(x.dtype), indices, keep)
    if resolved != "naive" and hasattr(experts, "weights_of"):
        # Experts that decode their weights (packed codes) decode only the experts some token chose.
        experts, indices = _routed_only(experts, indices, keep)
    return _IMPL[resolved](x, weights.to(x.dtype), indices, experts, keep)


class _Routed:
    """The experts ``ids`` of ``experts`` renumbered ``0..len(ids)-1``, weights decoded on demand."""

    def __init__(self, experts, ids: list[int]):
        self._experts, self._ids = experts, ids
        self.num_experts, self.d_model, self.d_hidden = len(ids), experts.d_model, experts.d_hidden
        self.act = experts.act

    def weights(self, dtype: torch.dtype | None = None):
        return self._experts.weights_of(self._ids, dtype)


def _routed_only(experts, indices, keep):
    used = torch.unique(indices if keep is None else indices[keep])
    remap = torch.zeros(experts.num_experts, dtype=indices.dtype, device=indices.device)
    remap[used] = torch.arange(used.numel(), dtype=indices.dtype, device=indices.device)
    return _Routed(experts, used.tolist()), remap[indices]


# the three strategies ----------------------------------------------------------------------
def _naive(x, weights, indices, experts, keep):
    rows = []
    idx, kept = indices.tolist(), (keep.tolist() if keep is not None else None)
    for t in range(x.shape[0]):
        acc = x.new_zeros(x.shape[-1])
        for j, e in enumerate(idx[t]):
            if kept is None or kept[t][j]:
                acc = acc + weights[t, j] * experts.expert_forward(e, x[t : t + 1])[0]
        rows.append(acc)
    return torch.stack(rows) if rows else x.new_zeros(x.shape)


def _loop(x, weights, indices, experts, keep):
    token, flat_idx, flat_w = _flatten(weights, indices, keep)
    out = x.new_zeros(x.shape)
    counts = torch.bincount(flat_idx, minlength=experts.num_experts).tolist()
    # unbind once: indexing w[e] per expert would make backward allocate a full-size zero
    # gradient for every expert; unbind's backward stacks the per-expert gradients once.
    w_in, w_gate, w_out = (None if w is None else w.unbind(0) for w in experts.weights(x.dtype))
    for e, n in enumerate(counts):
        if n == 0:
            continue  # an expert no token chose costs nothing
        sel = torch.nonzero(flat_idx == e).squeeze(1)
        tok = token[sel]
        xe = x[tok]
        h = experts.act(xe @ w_in[e], xe @ w_gate[e] if w_gate is not None else None)
        out.index_add_(0, tok, (h @ w_out[e]) * flat_w[sel, None])  # in place on a fresh buffer
    return out


def _grouped(x, weights, indices, experts, keep):
    token, flat_idx, flat_w = _flatten(weights, indices, keep)
    if flat_idx.numel() == 0:
        return x.new_zeros(x.shape)
    order = torch.argsort(flat_idx, stable=True)
    tok = token[order]
    counts_t = torch.bincount(flat_idx, minlength=experts.num_experts)
    offs = counts_t.cumsum(0).to(torch.int32) if _grouped_ok(experts, x) else None
    counts = counts_t.tolist()
    xs = x[tok]
    w_in, w_gate, w_out = experts.weights(x.dtype)
    h = _gmm(xs, w_in, offs, counts)
    h = experts.act(h, _gmm(xs, w_gate, offs, counts) if w_gate is not None else None)
    y = _gmm(h, w_out, offs, counts) * flat_w[order, None]
    return x.new_zeros(x.shape).index_add_(0, tok, y)


def _grouped_ok(experts, x) -> bool:
    # grouped_mm needs inner dims that are multiples of 16 bytes.
    align = 16 // x.element_size()
    return hasattr(F, "grouped_mm") and experts.d_model % align == 0 and experts.d_hidden % align == 0


def _gmm(a, w, offs, counts):
    if offs is not None:
        return F.grouped_mm(a, w, offs=offs)
    # Fallback with the same semantics: one matmul per group.
    return torch.cat([chunk @ w[e] for e, chunk in enumerate(a.split(counts))])


def _flatten(weights: torch.Tensor, indices: torch.Tensor, keep: torch.Tensor | None):
    t, k = indices.shape
    token = torch.arange(t, device=indices.device).repeat_interleave(k)
    flat_idx, flat_w = indices.reshape(-1), weights.reshape(-1)
    if keep is not None:
        sel = keep.reshape(-1)
        token, flat_idx, flat_w = token[sel], flat_idx[sel], flat_w[sel]
    return token, flat_idx, flat_w


_IMPL = {"naive": _naive, "loop": _loop, "grouped": _grouped}


def capacity_mask(indices: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Which assignments fit in each expert's buffer of ``capacity`` slots (GShard / Switch).

    Priority goes to first choices over second choices, then to earlier tokens (GShard's
    order), so a token loses its second expert before anyone loses a first. Returns a bool
    mask ``[T, k]``; ``False`` means the assignment is dropped.
    """
    _check_capacity(indices, num_experts, capacity)
    t, k = indices.shape
    flat = indices.t().reshape(-1)  # choice-major: all first choices, then all second ...
    onehot = F.one_hot(flat, num_experts)
    position = (onehot.cumsum(0) - 1).gather(1, flat[:, None]).squeeze(1)
    return (position < capacity).view(k, t).t()


def resolve_strategy(strategy: str, device: torch.device | str, num_assignments: int | None = None,
                     num_experts: int | None = None, tokens: int | None = None) -> str:
    """Turn ``"auto"`` into a concrete strategy for ``device`` and the batch; validate the name.

    ``num_assignments`` is ``T k`` (token -> expert pairs), ``num_experts`` is ``N`` and ``tokens``
    is ``T``; without them the rule falls back to what it can decide (see ``AUTO``)."""
    if strategy == "auto":
        kind = torch.device(device).type
        if kind != "cpu":
            return AUTO.get(kind, "loop")
        if tokens == 1:
            return "naive"
        if num_assignments is None:
            return "loop"
        if num_experts is None:
            return "grouped" if num_assignments <= SMALL_BATCH_ASSIGNMENTS else "loop"
        return "loop" if num_assignments >= LOOP_MIN_PER_EXPERT * num_experts else "grouped"
    if strategy not in STRATEGIES:
        raise ValueError(f"dispatch: expected one of {STRATEGIES + ('auto',)}, got {strategy!r}")
    return strategy


# --------------------------------------------------------------------------------------------
# argument checks, kept out of the algorithms above. Shapes and dtypes only (free): ids in range
# and finite weights are not checked, that would synchronise the GPU on every forward.
# --------------------------------------------------------------------------------------------
@runtime_checkable
class ExpertsLike(Protocol):
    """What dispatch needs from :class:`moe_course.layers.Experts` (and its compressed forms)."""

    num_experts: int
    d_model: int
    d_hidden: int

    def weights(self, dtype: torch.dtype | None = None): ...

    def act(self, h: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor: ...

    def expert_forward(self, i: int, x: torch.Tensor) -> torch.Tensor: ...


def _check_dispatch(x, weights, indices, experts, keep) -> None:
    if not isinstance(experts, ExpertsLike):
        raise TypeError(f"experts: expected a moe_course.layers.Experts, got {type(experts).__name__}")
    if x.dim() != 2 or x.shape[-1] != experts.d_model:
        raise ValueError(f"x: expected shape [T, d_model={experts.d_model}], got {tuple(x.shape)}")
    if indices.shape != weights.shape or indices.dim() != 2 or indices.shape[0] != x.shape[0]:
        raise ValueError(f"weights/indices: expected matching shapes [T={x.shape[0]}, k], "
                         f"got {tuple(weights.shape)} and {tuple(indices.shape)}")
    if indices.is_floating_point() or indices.dtype == torch.bool:
        raise TypeError(f"indices: expected an integer tensor of expert ids, got {indices.dtype}")
    if keep is not None and keep.shape != indices.shape:
        raise ValueError(f"keep: expected shape {tuple(indices.shape)}, got {tuple(keep.shape)}")
    if keep is not None and keep.dtype != torch.bool:
        raise TypeError(f"keep: expected a bool mask, got {keep.dtype}")


def _check_capacity(indices, num_experts, capacity) -> None:
    _validate.int_in("capacity", capacity, 0)
    _validate.int_in("num_experts", num_experts, 1)
    if not torch.is_tensor(indices) or indices.dim() != 2 or indices.is_floating_point():
        raise ValueError(f"indices: expected an integer tensor [T, k], got shape "
                         f"{tuple(indices.shape) if torch.is_tensor(indices) else type(indices).__name__}")
