r"""Low-rank experts (truncated SVD) and weight sharing across experts (chapter 7).

Truncated SVD (Eckart & Young, 1936): for a matrix :math:`W = U \Sigma V^\top` the best rank-``r``
approximation in Frobenius and spectral norm keeps the ``r`` largest singular values,

.. math::
    W \approx U_r \Sigma_r V_r^\top = L R, \qquad L = U_r \Sigma_r^{1/2}, \quad R = \Sigma_r^{1/2} V_r^\top,
    \qquad \|W - LR\|_F^2 = \sum_{j>r} \sigma_j^2 .

An ``m x n`` matrix stored as ``L [m, r]`` and ``R [r, n]`` costs ``r (m + n)`` numbers instead of
``m n``: it pays off only for ``r < m n / (m + n)``.

* :func:`truncated_svd` (reused by chapter 8), :func:`rank_for_energy`.
* :class:`LowRankExperts`: an :class:`~moe_course.layers.Experts` storing the factors of every
  expert matrix (one rank per matrix, so ranks chosen by energy may differ between experts).
  :meth:`~LowRankExperts.weights` returns the products, so every dispatch strategy works unchanged;
  :meth:`~LowRankExperts.expert_forward` and :meth:`~LowRankExperts.forward_all` compute
  ``(x L) R`` without forming ``W``. ``params_per_expert`` is the factor count, so
  :func:`moe_course.metrics.size_report` reports the true (smaller) size and the FLOPs of the
  factored product.
* :func:`lowrank_experts`: SVD of each trained expert matrix, rank given or chosen by retained
  energy. ``init="random"`` reproduces the slide deck's randomly initialised ``LowRankExpert``
  (same shapes, trained function discarded) for comparison.
* :class:`SharedExperts` / :func:`share_experts`: weight sharing, a shared base per layer and
  projection (the mean of the experts' matrices) plus per-expert rank-``r`` deltas from the SVD of
  :math:`W_i - \bar W`; ``mode="first_layer"`` shares only the first layer (``w_in`` and
  ``w_gate``), and with ``rank=0`` it is the slide deck's shared-first-layer MoE.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from moe_course import _validate
from moe_course.layers import CompressedExperts, Experts, moe_layers, require_moe_layers

__all__ = ["truncated_svd", "rank_for_energy", "FactoredExperts", "LowRankExperts", "SharedExperts", "lowrank_experts",
           "share_experts", "singular_values", "expert_matrices"]

SHARE_MODES = ("all", "first_layer")


def _names(experts: Experts) -> tuple[str, ...]:
    return ("in", "gate", "out") if experts.w_gate is not None else ("in", "out")


def expert_matrices(experts: Experts) -> dict[str, torch.Tensor]:
    """``{"in": w_in, "gate": w_gate or None, "out": w_out}``: the stacked matrices as float32."""
    w_in, w_gate, w_out = experts.weights(torch.float32)
    return {"in": w_in, "gate": w_gate, "out": w_out}


def _is_rank(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------------
# from scratch: SVD factors and energy
# --------------------------------------------------------------------------------------------
def truncated_svd(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Factors ``L [..., m, r]``, ``R [..., r, n]`` of the best rank-``rank`` approximation of ``w``.

    ``L = U_r Σ_r^{1/2}``, ``R = Σ_r^{1/2} V_r^T`` (the square root of Σ split between both
    factors, so they have balanced scales). Works on one matrix or a batch ``[..., m, n]``; computed
    in float64 and returned in ``w``'s dtype. ``rank=0`` gives empty factors (``L R = 0``).
    """
    if not torch.is_tensor(w) or w.dim() < 2 or not w.is_floating_point():
        raise ValueError(f"w: expected a floating-point tensor with at least 2 dimensions, got "
                         f"{type(w).__name__ if not torch.is_tensor(w) else tuple(w.shape)}")
    m, n = w.shape[-2:]
    if not _is_rank(rank) or not 0 <= rank <= min(m, n):
        raise ValueError(f"rank: expected an integer in [0, min(m, n) = {min(m, n)}], got {rank!r}")
    _validate.finite("w", w)  # the SVD of a matrix with NaN/inf fails to converge or returns NaN
    u, s, vh = torch.linalg.svd(w.detach().to(torch.float64), full_matrices=False)
    root = s[..., :rank].sqrt()
    left = u[..., :, :rank] * root[..., None, :]
    right = root[..., :, None] * vh[..., :rank, :]
    return left.to(w.dtype), right.to(w.dtype)


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    r"""Smallest ``r`` with :math:`\sum_{j \le r} \sigma_j^2 \ge \mathrm{energy} \cdot \sum_j \sigma_j^2`.

    ``singular_values`` in descending order (as ``torch.linalg.svdvals`` returns them); energy is
    measured on the squared singular values, the squared Frobenius norm that the approximation keeps.
    """
    _check_energy(energy)
    s = torch.as_tensor(singular_values, dtype=torch.float64).reshape(-1)
    if s.numel() == 0:
        raise ValueError("singular_values: expected at least one value")
    _validate.finite("singular_values", s)
    if bool((s < 0).any()):
        raise ValueError(f"singular_values: expected values >= 0 (torch.linalg.svdvals), got min {float(s.min())}")
    e = s.square()
    total = e.sum()
    if total <= 0:
        return 1
    frac = e.cumsum(0) / total
    r = int((frac < energy - 1e-9).sum()) + 1
    return min(r, s.numel())


def singular_values(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Per MoE layer, ``{"in"|"gate"|"out": [E, min(m, n)]}`` singular values of every expert matrix."""
    layers = require_moe_layers(model, "factorize")
    out = []
    for layer in layers:
        stacks = expert_matrices(layer.experts)
        out.append({n: torch.linalg.svdvals(stacks[n].detach().double()).float() for n in _names(layer.experts)})
    return out


def _check_energy(energy) -> None:
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
        raise ValueError(f"energy: expected a number in (0, 1], got {energy!r}")


# --------------------------------------------------------------------------------------------
# factored experts
# --------------------------------------------------------------------------------------------
class FactoredExperts(CompressedExperts):
    """Common sizes and forward passes of experts whose matrices are built from smaller tensors."""

    def _init_sizes(self, experts: Experts) -> None:
        CompressedExperts.__init__(self, experts)
        self._names = _names(experts)

    @property
    def params_per_expert(self) -> int:
        """Stored parameters per expert (shared tensors split evenly): the true size."""
        return math.ceil(sum(p.numel() for p in self.parameters()) / self.num_experts)

    def matrix(self, name: str, i: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def project(self, name: str, i: int, x: torch.Tensor) -> torch.Tensor:
        """``x @ W_name[i]`` (subclasses avoid forming ``W``)."""
        return x @ self.matrix(name, i)

    def weights(self, dtype: torch.dtype | None = None):
        def stack(name):
            if name not in self._names:
                return None
            w = torch.stack([self.matrix(name, i) for i in range(self.num_experts)])
            return w if dtype is None else w.to(dtype)
        return stack("in"), stack("gate"), stack("out")

    def expert_forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        gate = self.project("gate", i, x) if "gate" in self._names else None
        return self.project("out", i, self.act(self.project("in", i, x), gate))

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.expert_forward(i, x) for i in range(self.num_experts)])

    @property
    def w_in(self) -> torch.Tensor:
        return self.weights()[0]

    @property
    def w_gate(self) -> torch.Tensor | None:
        return self.weights()[1]

    @property
    def w_out(self) -> torch.Tensor:
        return self.weights()[2]


class LowRankExperts(FactoredExperts):
    r"""Experts whose matrices are stored as factors ``W_name[i] = L_name[i] @ R_name[i]``.

    ``ranks``: one int (all matrices) or a dict ``{"in"|"gate"|"out": [r_0, ..., r_{E-1}]}`` (one rank
    per matrix). Parameters ``{name}_L[i] [m, r]``, ``{name}_R[i] [r, n]`` (``nn.ParameterList``,
    since ranks chosen by energy differ between experts). ``init="svd"`` takes the truncated SVD of
    ``experts``' trained weights; ``init="random"`` draws the factors at random (the slide deck's
    ``LowRankExpert``: same shapes, Kaiming-uniform like ``nn.Linear``), which discards the trained
    function.
    """

    def __init__(self, experts: Experts, ranks, init: str = "svd", generator: torch.Generator | None = None):
        self._init_sizes(experts)
        if init not in ("svd", "random"):
            raise ValueError(f"init: expected 'svd' or 'random', got {init!r}")
        E = self.num_experts
        if _is_rank(ranks):
            ranks = {n: [ranks] * E for n in self._names}
        if not isinstance(ranks, dict) or any(n not in ranks for n in self._names):
            got = f"keys {sorted(ranks)}" if isinstance(ranks, dict) else repr(ranks)
            raise ValueError(f"ranks: expected an int or a dict with keys {self._names}, got {got}")
        self.ranks = {n: [int(r) for r in ranks[n]] for n in self._names}
        with torch.no_grad():
            stacks = expert_matrices(experts)
            for name in self._names:
                w = stacks[name].detach()
                m, n = w.shape[1:]
                if len(self.ranks[name]) != E:
                    raise ValueError(f"ranks: expected {E} ranks for '{name}', got {len(self.ranks[name])}")
                ls, rs = [], []
                for i, r in enumerate(self.ranks[name]):
                    if not 1 <= r <= min(m, n):
                        raise ValueError(f"rank: expected an integer in [1, {min(m, n)}], got {r!r}")
                    if init == "svd":
                        left, right = truncated_svd(w[i], r)
                    else:
                        left = (torch.rand(m, r, generator=generator) * 2 - 1) / math.sqrt(m)
                        right = (torch.rand(r, n, generator=generator) * 2 - 1) / math.sqrt(r)
                    ls.append(nn.Parameter(left.to(w.device).contiguous()))
                    rs.append(nn.Parameter(right.to(w.device).contiguous()))
                setattr(self, f"{name}_L", nn.ParameterList(ls))
                setattr(self, f"{name}_R", nn.ParameterList(rs))

    def matrix(self, name: str, i: int) -> torch.Tensor:
        return getattr(self, f"{name}_L")[i] @ getattr(self, f"{name}_R")[i]

    def project(self, name: str, i: int, x: torch.Tensor) -> torch.Tensor:
        return (x @ getattr(self, f"{name}_L")[i].to(x.dtype)) @ getattr(self, f"{name}_R")[i].to(x.dtype)

    def extra_repr(self) -> str:
        ranks = {n: (r[0] if len(set(r)) == 1 else r) for n, r in self.ranks.items()}
        return f"{super().extra_repr()}, ranks={ranks}"


class SharedExperts(FactoredExperts):
    r"""Weight sharing: ``W_name[i] = B_name + L_name[i] @ R_name[i]`` for the shared projections.

    ``B`` is the mean of the experts' trained matrices (stored once per layer), the deltas are the
    rank-``rank`` truncated SVD of ``W_i - B``. Projections not in ``shared`` keep their full
    per-expert matrices. ``rank=0`` stores no deltas: every expert uses ``B``.
    """

    def __init__(self, experts: Experts, rank: int, shared: tuple[str, ...] = ("in", "gate", "out")):
        self._init_sizes(experts)
        limit = min(self.d_model, self.d_hidden)
        if not _is_rank(rank) or not 0 <= rank <= limit:
            raise ValueError(f"rank: expected an integer in [0, {limit}], got {rank!r}")
        if isinstance(shared, str) or any(n not in ("in", "gate", "out") for n in shared):
            raise ValueError(f"shared: expected names from ('in', 'gate', 'out'), got {list(shared) if not isinstance(shared, str) else shared!r}")
        self.rank = rank
        self.shared = tuple(n for n in self._names if n in shared)
        with torch.no_grad():
            stacks = expert_matrices(experts)
            for name in self._names:
                w = stacks[name].detach()
                if name not in self.shared:
                    setattr(self, f"{name}_full", nn.Parameter(w.clone()))
                    continue
                base = w.mean(0)
                setattr(self, f"{name}_base", nn.Parameter(base.clone()))
                if rank > 0:
                    left, right = truncated_svd(w - base, rank)
                    setattr(self, f"{name}_L", nn.Parameter(left.contiguous()))
                    setattr(self, f"{name}_R", nn.Parameter(right.contiguous()))

    def matrix(self, name: str, i: int) -> torch.Tensor:
        if name not in self.shared:
            return getattr(self, f"{name}_full")[i]
        base = getattr(self, f"{name}_base")
        if self.rank == 0:
            return base
        return base + getattr(self, f"{name}_L")[i] @ getattr(self, f"{name}_R")[i]

    def project(self, name: str, i: int, x: torch.Tensor) -> torch.Tensor:
        if name not in self.shared or self.rank == 0:
            return x @ self.matrix(name, i).to(x.dtype)
        left, right = getattr(self, f"{name}_L")[i], getattr(self, f"{name}_R")[i]
        return x @ getattr(self, f"{name}_base").to(x.dtype) + (x @ left.to(x.dtype)) @ right.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, shared={self.shared}"


# --------------------------------------------------------------------------------------------
# model-level functions
# --------------------------------------------------------------------------------------------
def lowrank_experts(model: nn.Module, keep: int | float, *, init: str = "svd", seed: int = 0,
                    inplace: bool = False) -> nn.Module:
    """Replace every MoE layer's experts by :class:`LowRankExperts` (truncated SVD of trained weights).

    ``keep``: the singular values kept per expert matrix, an int rank (``1 <= keep <= min(m, n)``,
    the same for every matrix) or a fraction in (0, 1] of the spectral energy (per matrix, the
    smallest rank keeping that fraction of :math:`\\sum \\sigma^2`). ``init="random"`` builds the same
    shapes from random factors (the slide deck's ``LowRankExpert``; for comparison only). Returns a
    new model unless ``inplace``.
    """
    layers = require_moe_layers(model, "factorize")
    if init not in ("svd", "random"):
        raise ValueError(f"init: expected 'svd' or 'random', got {init!r}")
    _validate.dense_experts(layers, "lowrank_experts")
    _validate.finite_model(model)
    limit = min(min(l.experts.d_model, l.experts.d_hidden) for l in layers)
    if not (_is_rank(keep) and 1 <= keep <= limit) and not (isinstance(keep, float) and 0 < keep <= 1):
        raise ValueError(f"keep: expected a rank in [1, min(d_model, d_hidden) = {limit}] (an int) or a fraction "
                         f"of the energy in (0, 1], got {keep!r}")
    out = model if inplace else copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    for layer in moe_layers(out):
        ex = layer.experts
        if _is_rank(keep):
            ranks = keep
        else:
            sv = {n: torch.linalg.svdvals(w.detach().double()) for n, w in expert_matrices(ex).items() if w is not None}
            ranks = {n: [rank_for_energy(s[i], keep) for i in range(ex.num_experts)] for n, s in sv.items()}
        layer.experts = LowRankExperts(ex, ranks, init=init, generator=gen)
    return out


def share_experts(model: nn.Module, keep: int, *, mode: str = "all", inplace: bool = False) -> nn.Module:
    """Weight sharing: per layer a shared base (mean of the experts) plus per-expert deltas that keep
    ``keep`` singular values (their rank, ``0 <= keep <= min(d_model, d_hidden)``).

    ``mode="all"`` shares every projection; ``mode="first_layer"`` shares only ``w_in`` (and
    ``w_gate``) and keeps each expert's ``w_out``; with ``keep=0`` that is the slide deck's MoE
    whose experts share their first layer. Returns a new model unless ``inplace``.
    """
    layers = require_moe_layers(model, "factorize")
    if mode not in SHARE_MODES:
        raise ValueError(f"mode: expected one of {SHARE_MODES}, got {mode!r}")
    _validate.dense_experts(layers, "share_experts")
    _validate.finite_model(model)
    limit = min(min(l.experts.d_model, l.experts.d_hidden) for l in layers)
    if not _is_rank(keep) or not 0 <= keep <= limit:
        raise ValueError(f"keep: expected a rank in [0, min(d_model, d_hidden) = {limit}] (an int), got {keep!r}")
    shared = ("in", "gate", "out") if mode == "all" else ("in", "gate")
    out = model if inplace else copy.deepcopy(model)
    for layer in moe_layers(out):
        layer.experts = SharedExperts(layer.experts, keep, shared)
    return out
