r"""μMoE (chapter 10): multilinear mixtures of experts with factorised weight tensors (Oldfield et al.,
2024).

A soft mixture of ``N`` linear experts is one third-order tensor ``W`` of shape
``N x (I+1) x O`` (the bias is folded in by appending a 1 to the input, :math:`\bar z = [z; 1]`):

.. math:: y_o = \sum_{n} \sum_{i} W_{n,i,o}\, a_n\, \bar z_i ,

with expert coefficients :math:`a = \phi(\mathrm{Norm}(x G))` from a zero-initialised gate
``G`` (``phi`` = entmax-1.5 or softmax). μMoE stores ``W`` factorised and never builds it:

* :class:`CPMuMoE` (paper eq. 2): :math:`W = [\![U_{exp}, U_{in}, U_{out}]\!]`,
  :math:`y = U_{out}\big((U_{exp}^\top a) \odot (U_{in}^\top \bar z)\big)`;
* :class:`TRMuMoE` (paper eq. 4): :math:`W_{n,i,o} = \mathrm{tr}(G_1[:,n,:]\,G_2[:,i,:]\,G_3[:,o,:])`,
  computed as two mode products with the per-token vectors, one small batched matmul and a
  contraction with the output core.

Both accept several expert modes (``num_experts=(N1, N2)``: the hierarchical μMoE with
``N1 * N2`` experts and one gate per mode). :class:`UnfactorizedMuMoE` holds ``W`` explicitly
and is the teaching reference; :func:`cp_to_tensor` / :func:`tr_to_tensor` materialise a
factorisation for checks. :class:`MuMoE` (one layer) and :class:`MuMoEBlock` (two layers
sharing the coefficients, GELU between: a drop-in feed-forward) add the gate.
:func:`cp_rank_for_budget` / :func:`tr_rank_for_budget` choose ranks that parameter-match a
dense layer, from the closed forms :func:`cp_mumoe_params` / :func:`tr_mumoe_params`.
:func:`entmax15` is the sort-based entmax-1.5 of Peters, Niculae & Martins (2019) with its
closed-form backward. :func:`cp_als` fits a CP decomposition to a given tensor (the
"compression view": factorising a trained MoE's expert tensor).

Initialisations follow the reference code (james-oldfield/muMoE): CP expert factor
``N(1, 1)`` (further expert modes all ones), input factor ``U(+-sqrt(1/I))``, output factor
``U(+-sqrt(1/R))``; TR expert cores ``eye * N(1, 1)`` slices (further modes ``eye``), input core
``U(+-sqrt(1/I))``, output core ``U(+-sqrt(1/(r_last r_1)))``.
"""

from __future__ import annotations

import math
import string
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_course import models

__all__ = [
    "GATE_ACTIVATIONS",
    "NORMALIZATIONS",
    "FACTORIZATIONS",
    "entmax15",
    "MuMoEGate",
    "UnfactorizedMuMoE",
    "CPMuMoE",
    "TRMuMoE",
    "MuMoE",
    "MuMoEBlock",
    "cp_to_tensor",
    "tr_to_tensor",
    "cp_als",
    "dense_ffn_params",
    "unfactorized_params",
    "cp_mumoe_params",
    "tr_mumoe_params",
    "cp_rank_for_budget",
    "tr_rank_for_budget",
    "build_mumoe_ffn",
]

GATE_ACTIVATIONS = ("entmax15", "softmax")
NORMALIZATIONS = ("ln", "bn", "none")
FACTORIZATIONS = ("cp", "tr")
DEFAULT_EXPERT_RANK = 4  # TR ranks around the expert cores in the paper's experiments (r1 = r2 = 4)


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------
def _check_pos_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int (>= 1), got {value}")
    return value


def _expert_modes(num_experts) -> tuple[int, ...]:
    """``8 -> (8,)``, ``(16, 16) -> (16, 16)`` (one entry per expert mode / gate)."""
    if isinstance(num_experts, int) and not isinstance(num_experts, bool):
        return (_check_pos_int("num_experts", num_experts),)
    if isinstance(num_experts, (tuple, list)) and len(num_experts) >= 1:
        return tuple(_check_pos_int(f"num_experts[{i}]", n) for i, n in enumerate(num_experts))
    raise TypeError(
        "num_experts: expected a positive int, or a non-empty tuple of positive ints (one per expert mode, "
        f"e.g. (16, 16) for a hierarchical layer), got {num_experts!r}"
    )


def _check_tr_ranks(ranks, num_modes: int) -> tuple[int, ...]:
    n = num_modes + 2
    if isinstance(ranks, (int, str, bytes)) or not isinstance(ranks, Sequence):
        raise TypeError(
            f"ranks: expected a sequence of {n} positive ints (one ring rank before each of the {num_modes} "
            f"expert core(s), the input core and the output core), got {ranks!r}"
        )
    if len(ranks) != n:
        raise ValueError(
            f"ranks: a tensor ring with {num_modes} expert mode(s) needs {n} ranks (r1, ..., r{n}), "
            f"got {len(ranks)}: {list(ranks)!r}"
        )
    return tuple(_check_pos_int(f"ranks[{i}]", r) for i, r in enumerate(ranks))


def _check_choice(name: str, value, choices: tuple) -> str:
    if value is None and "none" in choices:
        return "none"
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def _coefficient_list(coefficients, modes: tuple[int, ...], num_tokens: int) -> list[torch.Tensor]:
    """Validate the expert coefficients and flatten each to ``[T, N_e]``."""
    if torch.is_tensor(coefficients):
        coefficients = [coefficients]
    if not isinstance(coefficients, (list, tuple)) or len(coefficients) != len(modes):
        raise ValueError(
            f"coefficients: expected {len(modes)} tensor(s) (one per expert mode {modes}), "
            f"got {type(coefficients).__name__} of length {len(coefficients) if hasattr(coefficients, '__len__') else '?'}"
        )
    out = []
    for e, (a, n) in enumerate(zip(coefficients, modes)):
        if not torch.is_tensor(a) or a.shape[-1] != n:
            raise ValueError(f"coefficients[{e}]: expected last dimension {n} (experts in mode {e}), "
                             f"got {tuple(a.shape) if torch.is_tensor(a) else type(a).__name__}")
        a = a.reshape(-1, n)
        if a.shape[0] != num_tokens:
            raise ValueError(f"coefficients[{e}]: expected one row per input token ({num_tokens}), got {a.shape[0]}")
        out.append(a)
    return out


def _flatten_input(z: torch.Tensor, in_features: int, name: str = "z") -> torch.Tensor:
    if not torch.is_tensor(z):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(z).__name__}")
    if z.dim() < 1 or z.shape[-1] != in_features:
        raise ValueError(f"{name}: expected last dimension in_features={in_features}, got shape {tuple(z.shape)}")
    return z.reshape(-1, in_features)


# --------------------------------------------------------------------------------------------
# entmax-1.5
# --------------------------------------------------------------------------------------------
def _entmax15_threshold(zs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``tau_k`` for every prefix of the descending rows ``zs`` [M, k], and the support size."""
    rho = torch.arange(1, zs.shape[1] + 1, device=zs.device, dtype=zs.dtype)
    mean = zs.cumsum(1) / rho
    mean_sq = (zs * zs).cumsum(1) / rho
    delta = (1 - rho * (mean_sq - mean * mean)) / rho
    tau = mean - delta.clamp_min(0).sqrt()
    # clamp: a row with a NaN has no valid support; it must come out NaN (as softmax does), not crash
    return tau, (tau <= zs).sum(dim=1, keepdim=True).clamp_min(1)


_ENTMAX_TOPK = 32  # rows are first solved on their 32 largest entries: a full sort is the slow part


def _entmax15_forward(z: torch.Tensor) -> torch.Tensor:
    # p_i = [z_i / 2 - tau]_+^2 with tau such that sum_i p_i = 1. For a support made of the k
    # largest entries, tau solves sum_{i<=k} (z_(i)/2 - tau)^2 = 1, a quadratic; the support is
    # the largest k whose tau_k lies below z_(k)/2 (Peters, Niculae & Martins 2019, Alg. 2).
    # z is [M, d]. Supports are small next to thousands of experts, so rows are solved on their
    # top-32 entries, and only rows whose support fills all of them are redone on 4x more (up to a
    # full sort). Exact either way, and 5-15x faster than sorting 1024-4096 entries on a CPU.
    z = (z - z.amax(dim=1, keepdim=True)) * 0.5  # shift invariance; keeps the cumulative sums small
    d = z.shape[1]
    tau_star = z.new_empty(z.shape[0], 1)
    rows = None  # None: every row (no gather)
    k = d if d <= _ENTMAX_TOPK else _ENTMAX_TOPK
    while True:
        sub = z if rows is None else z[rows]
        zs = torch.topk(sub, k, dim=1).values if k < d else torch.sort(sub, dim=1, descending=True).values
        tau, support = _entmax15_threshold(zs)
        if rows is None:
            tau_star = tau.gather(1, support - 1)
        else:
            tau_star[rows] = tau.gather(1, support - 1)
        if k == d:
            break
        full = (support == k).squeeze(1)  # the support may extend beyond the k kept entries
        rows = full.nonzero().squeeze(1) if rows is None else rows[full]
        if rows.numel() == 0:
            break
        k = d if 4 * k >= d / 2 else 4 * k
    p = (z - tau_star).clamp_min_(0)
    return p.mul_(p)


class _Entmax15Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, dim: int) -> torch.Tensor:
        moved = z.movedim(dim, -1)
        p = _entmax15_forward(moved.reshape(-1, moved.shape[-1])).view(moved.shape).movedim(-1, dim)
        ctx.dim = dim
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, grad_p: torch.Tensor):
        # On the support p_i = (z_i/2 - tau)^2, so with s = sqrt(p) the Jacobian is
        # diag(s) - s s^T / sum(s) (symmetric): grad_z = s * g - s * (s . g) / sum(s).
        (p,) = ctx.saved_tensors
        s = p.sqrt()
        g = grad_p * s
        q = g.sum(dim=ctx.dim, keepdim=True) / s.sum(dim=ctx.dim, keepdim=True)
        return g - q * s, None


def entmax15(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    r"""entmax-1.5 (Peters, Niculae & Martins, 2019): a sparse, differentiable softmax.

    .. math:: \mathrm{entmax}_{1.5}(z)_i = \big[\tfrac{z_i}{2} - \tau(z)\big]_+^2, \qquad
              \sum_i \big[\tfrac{z_i}{2} - \tau\big]_+^2 = 1 .

    Exact sort-based forward (``O(d log d)``) and the closed-form backward. Entries far below the
    maximum get exactly 0; ``-inf`` entries are allowed (they get 0) as long as a row has one
    finite entry. Half-precision inputs are computed in float32 and cast back.
    """
    if not torch.is_tensor(z):
        raise TypeError(f"z: expected a torch.Tensor, got {type(z).__name__}")
    if not isinstance(dim, int) or not -max(z.dim(), 1) <= dim < max(z.dim(), 1):
        raise ValueError(f"dim: expected an int in [-{z.dim()}, {z.dim() - 1}] for a {z.dim()}-d tensor, got {dim!r}")
    if z.dim() == 0 or z.shape[dim] == 0:
        raise ValueError(f"z: expected at least one entry along dim={dim}, got shape {tuple(z.shape)}")
    if not z.is_floating_point():
        raise TypeError(f"z: expected a floating point tensor, got {z.dtype}")
    dim = dim % z.dim()
    if z.dtype in (torch.float16, torch.bfloat16):
        return _Entmax15Function.apply(z.float(), dim).to(z.dtype)
    return _Entmax15Function.apply(z, dim)


# --------------------------------------------------------------------------------------------
# materialising factorisations (checks and teaching only: never inside a forward pass)
# --------------------------------------------------------------------------------------------
def _letters(n: int) -> list[str]:
    return list(string.ascii_letters[:n])


def cp_to_tensor(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    r"""The full tensor of a CP decomposition: :math:`X_{i_1 \dots i_M} = \sum_r \prod_m U^{(m)}_{i_m r}`."""
    if len(factors) < 1:
        raise ValueError("factors: expected at least one [dim, rank] matrix")
    rank = factors[0].shape[1]
    for m, f in enumerate(factors):
        if f.dim() != 2 or f.shape[1] != rank:
            raise ValueError(f"factors[{m}]: expected shape [dim, {rank}], got {tuple(f.shape)}")
    idx = _letters(len(factors))
    spec = ",".join(f"{i}z" for i in idx) + "->" + "".join(idx)
    return torch.einsum(spec, *factors)


def tr_to_tensor(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    r"""The full tensor of a tensor ring: :math:`X_{i_1 \dots i_M} = \mathrm{tr}\prod_m G_m[:, i_m, :]`."""
    if len(cores) < 1:
        raise ValueError("cores: expected at least one [r_m, dim, r_{m+1}] core")
    m = len(cores)
    for k, c in enumerate(cores):
        nxt = cores[(k + 1) % m]
        if c.dim() != 3 or c.shape[2] != nxt.shape[0]:
            raise ValueError(f"cores[{k}]: expected shape [r, dim, r'] with r' = cores[{(k + 1) % m}].shape[0], "
                             f"got {tuple(c.shape)}")
    # Contract the ring one core at a time (an M-operand einsum would also do, via opt_einsum).
    acc = cores[0]  # [r1, d1, r2]
    for c in cores[1:]:
        acc = torch.einsum("axb,byc->axyc", acc, c).reshape(acc.shape[0], -1, c.shape[2])
    full = torch.einsum("axa->x", acc)
    return full.reshape(*(c.shape[1] for c in cores))


# --------------------------------------------------------------------------------------------
# the layers: f(z, coefficients) -> y
# --------------------------------------------------------------------------------------------
class _MultilinearLayer(nn.Module):
    """Shared shape bookkeeping of the unfactorised, CP and TR layers."""

    def __init__(self, in_features: int, out_features: int, num_experts, bias: bool):
        super().__init__()
        self.in_features = _check_pos_int("in_features", in_features)
        self.out_features = _check_pos_int("out_features", out_features)
        self.expert_modes = _expert_modes(num_experts)
        if not isinstance(bias, bool):
            raise TypeError(f"bias: expected a bool, got {bias!r}")
        self.bias = bias

    @property
    def num_experts(self) -> int:
        """Total number of experts, ``prod(expert_modes)``."""
        return math.prod(self.expert_modes)

    @property
    def hierarchy(self) -> int:
        return len(self.expert_modes)

    def _prepare(self, z: torch.Tensor, coefficients):
        flat = _flatten_input(z, self.in_features)
        return flat, _coefficient_list(coefficients, self.expert_modes, flat.shape[0])

    def _with_one(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.cat([flat, flat.new_ones(flat.shape[0], 1)], dim=1) if self.bias else flat

    def weight_tensor(self) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def extra_repr(self) -> str:
        modes = self.expert_modes[0] if self.hierarchy == 1 else self.expert_modes
        return f"in_features={self.in_features}, out_features={self.out_features}, num_experts={modes}, bias={self.bias}"


class UnfactorizedMuMoE(_MultilinearLayer):
    r"""The multilinear MoE with its weight tensor stored in full (the teaching reference).

    ``weight`` has shape ``[N_1, ..., N_h, I+1, O]`` (``I`` rows without bias), so the layer costs
    ``prod(N) (I+1) O`` parameters and as many multiply-adds per token. The forward is two
    contractions: mix the experts' weights per token, :math:`W(a) = \sum_n a_n W_n`
    (``[T, I+1, O]``), then apply it, :math:`y = \bar z\, W(a)`.
    """

    def __init__(self, in_features: int, out_features: int, num_experts, bias: bool = True):
        super().__init__(in_features, out_features, num_experts, bias)
        rows = in_features + 1 if bias else in_features
        bound = 1 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(*self.expert_modes, rows, out_features).uniform_(-bound, bound))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: bool = True) -> "UnfactorizedMuMoE":
        """A layer holding a copy of ``weight`` ``[N_1, ..., N_h, I(+1), O]``."""
        if not torch.is_tensor(weight) or weight.dim() < 3:
            raise ValueError(f"weight: expected a tensor [N_1, ..., N_h, I(+1), O], got "
                             f"{tuple(weight.shape) if torch.is_tensor(weight) else type(weight).__name__}")
        rows, out = weight.shape[-2:]
        layer = cls(rows - 1 if bias else rows, out, tuple(weight.shape[:-2]), bias=bias)
        layer = layer.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
        return layer

    def weight_tensor(self) -> torch.Tensor:
        return self.weight

    def forward(self, z: torch.Tensor, coefficients) -> torch.Tensor:
        flat, coeffs = self._prepare(z, coefficients)
        a = coeffs[0]
        for c in coeffs[1:]:  # hierarchical: the coefficient of expert (n1, n2) is a1[n1] * a2[n2]
            a = (a[:, :, None] * c[:, None, :]).reshape(a.shape[0], -1)
        rows = self.weight.shape[-2]
        w = self.weight.reshape(self.num_experts, rows * self.out_features)
        mixed = (a.to(w.dtype) @ w).view(-1, rows, self.out_features)  # contraction 1: W(a), one matrix per token
        y = torch.bmm(self._with_one(flat).unsqueeze(1), mixed).squeeze(1)  # contraction 2: z W(a)
        return y.reshape(*z.shape[:-1], self.out_features)


class CPMuMoE(_MultilinearLayer):
    r"""CPμMoE (Oldfield et al., 2024, eq. 2): the expert tensor in CP form, never materialised.

    Factors: ``expert_factors[e]`` ``[N_e, R]``, ``in_factor`` ``[I+1, R]`` (last row = bias),
    ``out_factor`` ``[O, R]``. Forward, for ``T`` tokens:

    .. math:: y = \Big(\big(\textstyle\prod_e^{\odot} a_e U_e\big) \odot (\bar z\, U_{in})\Big) U_{out}^\top

    three matrix products of cost ``T R (sum N_e + I + 1 + O)``, the same as the parameter count
    times ``T``. Expert ``n``'s matrix is ``U_in diag(U_exp[n]) U_out^T``: rank <= R, and all
    experts share the input and output subspaces.
    """

    def __init__(self, in_features: int, out_features: int, num_experts, rank: int, bias: bool = True):
        super().__init__(in_features, out_features, num_experts, bias)
        self.rank = _check_pos_int("rank", rank)
        factors = []
        for e, n in enumerate(self.expert_modes):
            # N(1, 1) for the first mode, ones for the others: at init every expert is about the same map.
            factors.append(nn.Parameter(torch.randn(n, rank) + 1.0 if e == 0 else torch.ones(n, rank)))
        self.expert_factors = nn.ParameterList(factors)
        rows = in_features + 1 if bias else in_features
        b_in, b_out = math.sqrt(1 / in_features), math.sqrt(1 / rank)
        self.in_factor = nn.Parameter(torch.empty(rows, rank).uniform_(-b_in, b_in))
        self.out_factor = nn.Parameter(torch.empty(out_features, rank).uniform_(-b_out, b_out))

    def factors(self) -> list[torch.Tensor]:
        """``[U_1, ..., U_h, U_in, U_out]`` in the order of :func:`cp_to_tensor`."""
        return [*self.expert_factors, self.in_factor, self.out_factor]

    def weight_tensor(self) -> torch.Tensor:
        """Materialise ``W [N_1, ..., N_h, I+1, O]`` (for checks only: costs ``prod(N) I O`` memory)."""
        return cp_to_tensor(self.factors())

    def flops_per_token(self) -> int:
        """2 x multiply-adds of the three products (the Hadamard products are ``O(R)``)."""
        return 2 * self.rank * (sum(self.expert_modes) + self.in_factor.shape[0] + self.out_features)

    def forward(self, z: torch.Tensor, coefficients) -> torch.Tensor:
        flat, coeffs = self._prepare(z, coefficients)
        if self.bias:  # z_bar @ U_in without concatenating the 1: add the bias row
            h = torch.addmm(self.in_factor[-1], flat, self.in_factor[:-1])
        else:
            h = flat @ self.in_factor
        for a, u in zip(coeffs, self.expert_factors):
            h = h * (a.to(h.dtype) @ u)
        y = h @ self.out_factor.t()
        return y.reshape(*z.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}"


class TRMuMoE(_MultilinearLayer):
    r"""TRμMoE (Oldfield et al., 2024, eq. 4): the expert tensor as a tensor ring, never materialised.

    ``ranks = (r_1, ..., r_{h+2})`` for ``h`` expert modes. Cores: ``expert_cores[e]``
    ``[r_e, N_e, r_{e+1}]``, ``in_core`` ``[r_{h+1}, I+1, r_{h+2}]``, ``out_core`` ``[r_{h+2}, O, r_1]``,
    and :math:`W_{n,i,o} = \mathrm{tr}(G_1[:,n,:] \cdots G_{in}[:,i,:]\, G_{out}[:,o,:])`.

    Forward (low-cost order): per token, the mode products :math:`A = \sum_n a_n G_1[:,n,:]`
    (``r_1 x r_2``) and :math:`B = \sum_i \bar z_i G_{in}[:,i,:]` (``r_{h+1} x r_{h+2}``), the small
    product ``M = A B``, then :math:`y_o = \sum_{a,c} G_{out}[c,o,a] M_{a,c}`. Cost per token
    ``sum_e r_e N_e r_{e+1} + r_{h+1}(I+1) r_{h+2} + r_1 r_{h+2} O`` plus the small products;
    expert matrices have rank <= ``r_1 r_{h+2}``.
    """

    def __init__(self, in_features: int, out_features: int, num_experts, ranks: Sequence[int], bias: bool = True):
        super().__init__(in_features, out_features, num_experts, bias)
        self.ranks = _check_tr_ranks(ranks, self.hierarchy)
        r = self.ranks
        cores = []
        for e, n in enumerate(self.expert_modes):
            # Slices eye * N(1, var): var 1 for the first mode, 0 for later ones (reference code),
            # so that at init every expert is nearly the same linear map.
            var = 1.0 if e == 0 else 0.0
            eye = torch.eye(r[e], r[e + 1])
            core = eye[:, None, :] * (torch.randn(r[e], n, r[e + 1]) * var + 1.0)
            cores.append(nn.Parameter(core))
        self.expert_cores = nn.ParameterList(cores)
        rows = in_features + 1 if bias else in_features
        b_in, b_out = math.sqrt(1 / in_features), math.sqrt(1 / (r[-1] * r[0]))
        self.in_core = nn.Parameter(torch.empty(r[-2], rows, r[-1]).uniform_(-b_in, b_in))
        self.out_core = nn.Parameter(torch.empty(r[-1], out_features, r[0]).uniform_(-b_out, b_out))

    def cores(self) -> list[torch.Tensor]:
        """``[G_1, ..., G_h, G_in, G_out]`` in the order of :func:`tr_to_tensor`."""
        return [*self.expert_cores, self.in_core, self.out_core]

    def weight_tensor(self) -> torch.Tensor:
        """Materialise ``W [N_1, ..., N_h, I+1, O]`` (for checks only)."""
        return tr_to_tensor(self.cores())

    def flops_per_token(self) -> int:
        r = self.ranks
        mode_products = sum(r[e] * n * r[e + 1] for e, n in enumerate(self.expert_modes))
        chain = sum(r[0] * r[e] * r[e + 1] for e in range(1, self.hierarchy + 1))  # A_1 A_2 ... B
        return 2 * (mode_products + r[-2] * self.in_core.shape[1] * r[-1] + chain + r[0] * r[-1] * self.out_features)

    def forward(self, z: torch.Tensor, coefficients) -> torch.Tensor:
        flat, coeffs = self._prepare(z, coefficients)
        t, r = flat.shape[0], self.ranks
        # A = sum_n a_n G_1[:, n, :], as one [T, N] x [N, r1 r2] matmul; further expert modes chain on.
        acc = None
        for e, (a, core) in enumerate(zip(coeffs, self.expert_cores)):
            n = self.expert_modes[e]
            mat = (a.to(core.dtype) @ core.permute(1, 0, 2).reshape(n, r[e] * r[e + 1])).view(t, r[e], r[e + 1])
            acc = mat if acc is None else torch.bmm(acc, mat)
        rows = self.in_core.shape[1]
        g_in = self.in_core.permute(1, 0, 2).reshape(rows, r[-2] * r[-1])
        if self.bias:
            b = torch.addmm(g_in[-1], flat, g_in[:-1])
        else:
            b = flat @ g_in
        m = torch.bmm(acc, b.view(t, r[-2], r[-1]))  # [T, r1, r_last]
        g_out = self.out_core.permute(2, 0, 1).reshape(r[0] * r[-1], self.out_features)  # [(a, c), o]
        y = m.reshape(t, r[0] * r[-1]) @ g_out
        return y.reshape(*z.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ranks={self.ranks}"


# --------------------------------------------------------------------------------------------
# gating
# --------------------------------------------------------------------------------------------
class MuMoEGate(nn.Module):
    r"""The μMoE gate, as in the reference code: one zero-initialised ``G_e [I, N_e]`` per expert mode,

    .. math:: a_e = \phi\big(\mathrm{Norm}(x\, G_e)\big)

    with ``Norm`` a LayerNorm without affine parameters (``"ln"``), a BatchNorm1d without affine
    parameters over all tokens (``"bn"``: batch statistics in training, running statistics in
    ``eval()``), or nothing (``"none"``), and ``phi`` entmax-1.5 (sparse) or softmax. At init the
    logits are 0, so every expert gets ``1/N``. ``masks`` (non-persistent buffers of ones)
    multiply the coefficients after ``phi``: :meth:`silence` zeroes chosen experts. Like any
    BatchNorm, ``"bn"`` needs more than one token per batch in training mode.
    """

    def __init__(self, in_features: int, num_experts, normalization: str | None = "ln",
                 activation: str = "entmax15"):
        super().__init__()
        self.in_features = _check_pos_int("in_features", in_features)
        self.expert_modes = _expert_modes(num_experts)
        self.normalization = _check_choice("normalization", normalization, NORMALIZATIONS)
        self.activation = _check_choice("activation", activation, GATE_ACTIVATIONS)
        self.weights = nn.ParameterList(nn.Parameter(torch.zeros(in_features, n)) for n in self.expert_modes)
        if self.normalization == "ln":
            self.norms = nn.ModuleList(nn.LayerNorm(n, elementwise_affine=False) for n in self.expert_modes)
        elif self.normalization == "bn":
            self.norms = nn.ModuleList(nn.BatchNorm1d(n, affine=False) for n in self.expert_modes)
        else:
            self.norms = nn.ModuleList(nn.Identity() for _ in self.expert_modes)
        for e, n in enumerate(self.expert_modes):
            self.register_buffer(f"mask_{e}", torch.ones(n), persistent=False)

    @property
    def masks(self) -> list[torch.Tensor]:
        return [getattr(self, f"mask_{e}") for e in range(len(self.expert_modes))]

    def logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Normalised gate logits ``[T, N_e]`` per mode (before ``phi``), in float32 even under autocast
        (like :class:`~moe_course.layers.TopKRouter`: half-precision logits flip the sparse support)."""
        flat = _flatten_input(x, self.in_features, "x")
        with torch.autocast(device_type=flat.device.type, enabled=False):
            logits = [flat.float() @ w.float() for w in self.weights]
            if self.normalization == "ln":
                # LayerNorm is scale invariant, but its variance overflows float32 for |logits| above
                # ~1e19 (NaN gates); rows that large are divided by their max first (others untouched).
                logits = [v / torch.where(a > 2.0 ** 60, a, torch.ones_like(a))
                          for v, a in ((v, v.detach().abs().amax(dim=-1, keepdim=True)) for v in logits)]
            out = []
            for v, norm in zip(logits, self.norms):
                stats = getattr(norm, "running_mean", None)  # BatchNorm buffers follow model.to(dtype)
                out.append(norm(v if stats is None else v.to(stats.dtype)).float())
        return out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Float32 expert coefficients ``[T, N_e]`` per mode (the layers cast them to their dtype)."""
        phi: Callable = entmax15 if self.activation == "entmax15" else (lambda v: torch.softmax(v, dim=-1))
        logits = self.logits(x)
        with torch.autocast(device_type=logits[0].device.type, enabled=False):
            return [phi(l) * m.to(l.dtype) for l, m in zip(logits, self.masks)]

    def silence(self, experts: Sequence[int], mode: int = 0) -> None:
        """Zero the coefficients of ``experts`` of expert mode ``mode`` (an edit; :meth:`restore` undoes it)."""
        if not isinstance(mode, int) or not 0 <= mode < len(self.expert_modes):
            raise ValueError(f"mode: expected an int in [0, {len(self.expert_modes) - 1}], got {mode!r}")
        idx = torch.as_tensor(list(experts), dtype=torch.long)
        n = self.expert_modes[mode]
        if idx.numel() and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"experts: expected indices in [0, {n - 1}] for mode {mode}, got {idx.tolist()}")
        self.masks[mode][idx.to(self.masks[mode].device)] = 0.0

    def restore(self) -> None:
        """Undo every :meth:`silence`."""
        for m in self.masks:
            m.fill_(1.0)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_experts={self.expert_modes}, "
                f"normalization={self.normalization!r}, activation={self.activation!r}")


# --------------------------------------------------------------------------------------------
# gated modules
# --------------------------------------------------------------------------------------------
def _make_layer(factorization: str, in_features: int, out_features: int, modes: tuple[int, ...],
                rank, ranks, bias: bool) -> _MultilinearLayer:
    if factorization == "cp":
        if rank is None:
            raise ValueError("rank: CP factorization needs a rank (see cp_rank_for_budget)")
        if ranks is not None:
            raise ValueError("ranks: only for factorization='tr'; pass rank=... for CP")
        return CPMuMoE(in_features, out_features, modes, rank, bias=bias)
    if factorization == "tr":
        if ranks is None:
            raise ValueError("ranks: TR factorization needs ranks (r1, ..., r_{h+2}) (see tr_rank_for_budget)")
        if rank is not None:
            raise ValueError("rank: only for factorization='cp'; pass ranks=(...) for TR")
        return TRMuMoE(in_features, out_features, modes, ranks, bias=bias)
    if factorization == "none":
        return UnfactorizedMuMoE(in_features, out_features, modes, bias=bias)
    raise ValueError(f"factorization: expected one of {FACTORIZATIONS + ('none',)}, got {factorization!r}")


class _GatedMuMoE(nn.Module):
    gate: MuMoEGate

    def __init__(self):
        super().__init__()
        self.keep_coefficients = False
        self.last_coefficients: list[torch.Tensor] | None = None

    def _coefficients(self, flat: torch.Tensor) -> list[torch.Tensor]:
        a = self.gate(flat)
        if self.keep_coefficients:  # opt-in: [T, N] per forward is large for thousands of experts
            self.last_coefficients = [c.detach() for c in a]
        return a

    @property
    def expert_modes(self) -> tuple[int, ...]:
        return self.gate.expert_modes

    @property
    def num_experts(self) -> int:
        return math.prod(self.gate.expert_modes)

    def silence(self, experts: Sequence[int], mode: int = 0) -> None:
        """Zero the coefficients of ``experts`` (see :meth:`MuMoEGate.silence`)."""
        self.gate.silence(experts, mode)

    def restore(self) -> None:
        self.gate.restore()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class MuMoE(_GatedMuMoE):
    """One gated μMoE layer ``in_features -> out_features``: :class:`MuMoEGate` + a CP/TR layer.

    ``factorization="none"`` gives the unfactorised layer (the reference, ``prod(N) (I+1) O`` weights).
    """

    def __init__(self, in_features: int, out_features: int, num_experts, factorization: str = "cp",
                 rank: int | None = None, ranks: Sequence[int] | None = None,
                 normalization: str | None = "ln", gate: str = "entmax15", bias: bool = True):
        super().__init__()
        self.gate = MuMoEGate(in_features, num_experts, normalization, gate)
        self.layer = _make_layer(factorization, in_features, out_features, self.gate.expert_modes, rank, ranks, bias)
        self.factorization = factorization

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = _flatten_input(x, self.layer.in_features, "x")
        y = self.layer(flat, self._coefficients(flat))
        return y.reshape(*x.shape[:-1], self.layer.out_features)


class MuMoEBlock(_GatedMuMoE):
    r"""Two μMoE layers sharing one set of expert coefficients, GELU between (the paper's MLP block).

    .. math:: a = \mathrm{gate}(x), \qquad y = \mathrm{layer}_2\big(\mathrm{GELU}(\mathrm{layer}_1(x, a)), a\big)

    A drop-in feed-forward ``d_model -> d_hidden -> d_model``. ``rank`` (CP) / ``ranks`` (TR) left
    as ``None`` are chosen to parameter-match the dense GELU MLP of the same sizes
    (:func:`dense_ffn_params`), or ``budget`` parameters if given. Set ``keep_coefficients = True``
    to keep the last forward's coefficients in ``last_coefficients`` (for specialisation plots).
    """

    def __init__(self, d_model: int, d_hidden: int, num_experts, factorization: str = "cp",
                 rank: int | None = None, ranks: Sequence[int] | None = None, normalization: str | None = "ln",
                 gate: str = "entmax15", budget: int | None = None, out_features: int | None = None,
                 bias: bool = True):
        super().__init__()
        _check_pos_int("d_model", d_model)
        _check_pos_int("d_hidden", d_hidden)
        out_features = d_model if out_features is None else _check_pos_int("out_features", out_features)
        modes = _expert_modes(num_experts)
        if factorization in FACTORIZATIONS and (rank if factorization == "cp" else ranks) is None:
            if budget is None:
                budget = d_model * d_hidden + d_hidden + d_hidden * out_features + out_features
            if factorization == "cp":
                rank = cp_rank_for_budget(budget, d_model, out_features, modes, hidden_features=d_hidden, bias=bias)
            else:
                ranks = tr_rank_for_budget(budget, d_model, out_features, modes, hidden_features=d_hidden, bias=bias)
        self.gate = MuMoEGate(d_model, modes, normalization, gate)
        self.layer1 = _make_layer(factorization, d_model, d_hidden, modes, rank, ranks, bias)
        self.layer2 = _make_layer(factorization, d_hidden, out_features, modes, rank, ranks, bias)
        self.factorization = factorization
        self.d_model, self.d_hidden, self.out_features = d_model, d_hidden, out_features

    @property
    def rank(self):
        """The CP rank, or the TR ranks, of both layers."""
        return getattr(self.layer1, "rank", None) or getattr(self.layer1, "ranks", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = _flatten_input(x, self.d_model, "x")
        a = self._coefficients(flat)
        h = F.gelu(self.layer1(flat, a))
        y = self.layer2(h, a)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"factorization={self.factorization!r}, rank={self.rank}"


# --------------------------------------------------------------------------------------------
# parameter counts and parameter matching (closed forms, Oldfield et al. 2024, appendix)
# --------------------------------------------------------------------------------------------
def dense_ffn_params(d_model: int, d_hidden: int, activation: str = "gelu") -> int:
    """Parameters of the course's dense MLP ``d_model -> d_hidden -> d_model`` (with biases).

    GELU: ``2 d h + h + d``; SwiGLU (an extra gate projection): ``3 d h + 2 h + d``.
    """
    _check_pos_int("d_model", d_model)
    _check_pos_int("d_hidden", d_hidden)
    if activation == "gelu":
        return 2 * d_model * d_hidden + d_hidden + d_model
    if activation == "swiglu":
        return 3 * d_model * d_hidden + 2 * d_hidden + d_model
    raise ValueError(f"activation: expected 'gelu' or 'swiglu', got {activation!r}")


def _layer_dims(in_features: int, out_features: int, hidden_features: int | None) -> list[tuple[int, int]]:
    _check_pos_int("in_features", in_features)
    _check_pos_int("out_features", out_features)
    if hidden_features is None:
        return [(in_features, out_features)]
    _check_pos_int("hidden_features", hidden_features)
    return [(in_features, hidden_features), (hidden_features, out_features)]


def unfactorized_params(in_features: int, out_features: int, num_experts, hidden_features: int | None = None,
                        bias: bool = True, gate: bool = True) -> int:
    """``prod(N) (I+1) O`` per layer, plus the gate ``I sum(N)``."""
    modes = _expert_modes(num_experts)
    total = sum(math.prod(modes) * (i + bias) * o for i, o in _layer_dims(in_features, out_features, hidden_features))
    return total + (in_features * sum(modes) if gate else 0)


def cp_mumoe_params(in_features: int, out_features: int, num_experts, rank: int, hidden_features: int | None = None,
                    bias: bool = True, gate: bool = True) -> int:
    """``R (sum(N) + I + 1 + O)`` per layer, plus the gate ``I sum(N)`` (shared by a block's two layers)."""
    modes = _expert_modes(num_experts)
    _check_pos_int("rank", rank)
    total = sum(rank * (sum(modes) + i + bias + o) for i, o in _layer_dims(in_features, out_features, hidden_features))
    return total + (in_features * sum(modes) if gate else 0)


def tr_mumoe_params(in_features: int, out_features: int, num_experts, ranks: Sequence[int],
                    hidden_features: int | None = None, bias: bool = True, gate: bool = True) -> int:
    """``sum_e r_e N_e r_{e+1} + r_{h+1} (I+1) r_{h+2} + r_{h+2} O r_1`` per layer, plus the gate ``I sum(N)``."""
    modes = _expert_modes(num_experts)
    r = _check_tr_ranks(ranks, len(modes))
    experts = sum(r[e] * n * r[e + 1] for e, n in enumerate(modes))
    total = sum(experts + r[-2] * (i + bias) * r[-1] + r[-1] * o * r[0]
                for i, o in _layer_dims(in_features, out_features, hidden_features))
    return total + (in_features * sum(modes) if gate else 0)


def _check_budget(budget) -> int:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget: expected a positive int number of parameters, got {budget!r}")
    return budget


def cp_rank_for_budget(budget: int, in_features: int, out_features: int, num_experts,
                       hidden_features: int | None = None, bias: bool = True) -> int:
    """The largest CP rank whose :func:`cp_mumoe_params` is at most ``budget``.

    Closed form ``R = floor((budget - I sum(N)) / sum_layers (sum(N) + I_l + 1 + O_l))``. Raises
    ``ValueError`` when even rank 1 does not fit (with thousands of flat experts the gate
    ``I N`` alone can exceed the budget: use expert modes, e.g. ``(64, 64)``).
    """
    budget = _check_budget(budget)
    modes = _expert_modes(num_experts)
    dims = _layer_dims(in_features, out_features, hidden_features)
    gate = in_features * sum(modes)
    per_rank = sum(sum(modes) + i + bias + o for i, o in dims)
    rank = (budget - gate) // per_rank
    if rank < 1:
        raise ValueError(
            f"budget: {budget} parameters cannot hold a CP μMoE with {modes} experts: the gate needs {gate} "
            f"and rank 1 another {per_rank}; raise the budget or use fewer / hierarchical experts (e.g. (64, 64))"
        )
    return int(rank)


def tr_rank_for_budget(budget: int, in_features: int, out_features: int, num_experts,
                       hidden_features: int | None = None, expert_ranks: int | Sequence[int] = DEFAULT_EXPERT_RANK,
                       bias: bool = True) -> tuple[int, ...]:
    """TR ranks ``(r_1, ..., r_{h+1}, r_{h+2})`` within ``budget``: the expert-side ranks are fixed
    (``expert_ranks``, 4 as in the paper) and the free rank ``r_{h+2}`` (between the input and output
    cores) is the largest that fits. Raises ``ValueError`` when ``r_{h+2} = 1`` does not fit.
    """
    budget = _check_budget(budget)
    modes = _expert_modes(num_experts)
    h = len(modes)
    if isinstance(expert_ranks, int):
        fixed = (_check_pos_int("expert_ranks", expert_ranks),) * (h + 1)
    else:
        if not isinstance(expert_ranks, Sequence) or len(expert_ranks) != h + 1:
            raise ValueError(f"expert_ranks: expected an int or {h + 1} ints (r_1, ..., r_{h + 1}), got {expert_ranks!r}")
        fixed = tuple(_check_pos_int(f"expert_ranks[{i}]", r) for i, r in enumerate(expert_ranks))
    dims = _layer_dims(in_features, out_features, hidden_features)
    const = in_features * sum(modes) + len(dims) * sum(fixed[e] * n * fixed[e + 1] for e, n in enumerate(modes))
    per_rank = sum(fixed[-1] * (i + bias) + o * fixed[0] for i, o in dims)
    last = (budget - const) // per_rank
    if last < 1:
        raise ValueError(
            f"budget: {budget} parameters cannot hold a TR μMoE with {modes} experts and expert ranks {fixed}: "
            f"the gate and expert cores need {const} and the smallest free rank another {per_rank}; raise the "
            "budget or use fewer / hierarchical experts"
        )
    return (*fixed, int(last))


# --------------------------------------------------------------------------------------------
# CP by alternating least squares (the compression view)
# --------------------------------------------------------------------------------------------
def _mttkrp(x: torch.Tensor, factors: list[torch.Tensor], mode: int) -> torch.Tensor:
    idx = _letters(x.dim())
    others = [m for m in range(x.dim()) if m != mode]
    spec = "".join(idx) + "," + ",".join(f"{idx[m]}z" for m in others) + f"->{idx[mode]}z"
    return torch.einsum(spec, x, *[factors[m] for m in others])


def cp_als(tensor: torch.Tensor, rank: int, n_iter: int = 100, tol: float = 1e-7, seed: int = 0
           ) -> tuple[list[torch.Tensor], list[float]]:
    r"""Fit a rank-``rank`` CP decomposition to ``tensor`` by alternating least squares.

    Each sweep solves for one factor with the others fixed (Kolda & Bader 2009, sec. 3.4):
    :math:`U^{(m)} \leftarrow X_{(m)} (\odot_{k \ne m} U^{(k)}) \big(\ast_{k \ne m} U^{(k)\top} U^{(k)}\big)^{+}`.
    Initialised from the leading left singular vectors of each unfolding (random columns where the
    rank exceeds a dimension). Computed in float64. Returns ``(factors, relative_errors)`` with one
    relative Frobenius error per sweep; stops when the error improves by less than ``tol``.
    """
    if not torch.is_tensor(tensor) or tensor.dim() < 2:
        raise ValueError(f"tensor: expected a tensor with at least 2 modes, got "
                         f"{tuple(tensor.shape) if torch.is_tensor(tensor) else type(tensor).__name__}")
    _check_pos_int("rank", rank)
    _check_pos_int("n_iter", n_iter)
    from ._validate import finite

    finite("tensor", tensor)
    x = tensor.detach().to(torch.float64)
    norm = x.norm().clamp_min(1e-300)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    factors = []
    for m in range(x.dim()):
        unfold = x.movedim(m, 0).reshape(x.shape[m], -1)
        u = torch.linalg.svd(unfold, full_matrices=False).U[:, :rank]
        if u.shape[1] < rank:
            extra = torch.randn(x.shape[m], rank - u.shape[1], generator=gen, dtype=torch.float64)
            u = torch.cat([u, extra.to(u.device) / math.sqrt(x.shape[m])], dim=1)
        factors.append(u)
    errors: list[float] = []
    for _ in range(n_iter):
        for m in range(x.dim()):
            gram = torch.ones(rank, rank, dtype=x.dtype, device=x.device)
            for k in range(x.dim()):
                if k != m:
                    gram = gram * (factors[k].T @ factors[k])
            factors[m] = torch.linalg.lstsq(gram, _mttkrp(x, factors, m).T, rcond=None).solution.T
        err = float((x - cp_to_tensor(factors)).norm() / norm)
        if errors and errors[-1] - err < tol:
            errors.append(err)
            break
        errors.append(err)
    return [f.to(tensor.dtype) for f in factors], errors


# --------------------------------------------------------------------------------------------
# the course's models: feed-forward builders
# --------------------------------------------------------------------------------------------
_FFN_OPTIONS = ("rank", "ranks", "expert_modes", "expert_ranks", "normalization", "gate", "budget")


def build_mumoe_ffn(cfg, factorization: str = "cp") -> MuMoEBlock:
    """A :class:`MuMoEBlock` for a model config (``LMConfig`` / ``ClassifierConfig``).

    Parameter-matched to the dense feed-forward the config describes (``d_model``, ``d_hidden``,
    ``activation``) unless ``cfg.ffn_options`` gives ``rank`` / ``ranks`` or ``budget``. Other
    options: ``expert_modes`` (e.g. ``(16, 16)``, default ``(cfg.num_experts,)``), ``expert_ranks``
    (TR, default 4), ``normalization`` (``"ln"``), ``gate`` (``"entmax15"``).
    """
    options = dict(getattr(cfg, "ffn_options", None) or {})
    unknown = sorted(set(options) - set(_FFN_OPTIONS))
    if unknown:
        raise ValueError(f"ffn_options: unknown key(s) {unknown} for a μMoE feed-forward; valid: {list(_FFN_OPTIONS)}")
    modes = _expert_modes(options.get("expert_modes", cfg.num_experts))
    d, h = cfg.d_model, cfg.d_hidden
    budget = options.get("budget") or dense_ffn_params(d, h, getattr(cfg, "activation", "gelu"))
    rank, ranks = options.get("rank"), options.get("ranks")
    if factorization == "cp" and rank is None:
        rank = cp_rank_for_budget(budget, d, d, modes, hidden_features=h)
    if factorization == "tr" and ranks is None:
        ranks = tr_rank_for_budget(budget, d, d, modes, hidden_features=h,
                                   expert_ranks=options.get("expert_ranks", DEFAULT_EXPERT_RANK))
    return MuMoEBlock(d, h, modes, factorization, rank=rank, ranks=ranks,
                      normalization=options.get("normalization", "ln"), gate=options.get("gate", "entmax15"))


# The models' extension point: importing this module makes ``ffn="mumoe-cp"`` / ``"mumoe-tr"`` valid
# in a model config (models sits below this module and never imports it).
models.register_ffn("mumoe-cp", lambda cfg: build_mumoe_ffn(cfg, "cp"))
models.register_ffn("mumoe-tr", lambda cfg: build_mumoe_ffn(cfg, "tr"))
