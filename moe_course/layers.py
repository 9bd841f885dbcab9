"""MoE building blocks (chapter 1: experts and the soft MoE; chapter 2: the top-k router and the
sparse MoE layer): stacked experts, the top-k router, soft (dense) and sparse MoE layers.

Every MoE layer in the package follows one protocol (:class:`MoELayer`): a ``router``
(:class:`TopKRouter`, whose ``gate`` is a ``Linear(d_model, E)``), an ``experts``
(:class:`Experts`, weights stacked along the expert axis) and ``k``. Compression functions find
MoE layers with :func:`moe_layers` and work on these tensors by indexing and batched matmuls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _validate
from .dispatch import STRATEGIES, capacity_mask, dispatch
from .losses import load_balancing_loss, router_z_loss

ACTIVATIONS = ("gelu", "swiglu")


class Experts(nn.Module):
    r"""``E`` feed-forward experts stored as stacked tensors.

    Expert ``i`` computes :math:`E_i(x) = W^{out}_i\,\phi(W^{in}_i x)` with GELU, or
    :math:`W^{out}_i\,(\mathrm{silu}(W^{gate}_i x) \odot W^{in}_i x)` with SwiGLU (Shazeer 2020,
    as in Mixtral). Shapes: ``w_in``/``w_gate`` ``[E, d_model, d_hidden]``, ``w_out``
    ``[E, d_hidden, d_model]`` (row vectors: ``x @ w_in[i]``). Stacking makes pruning, merging
    and quantizing index operations; ``experts[i]`` still gives one readable expert. In HF
    transformers' MoE models (chapter 12) the same stacks are ``gate_up_proj [E, 2 d_hidden, d_model]``
    (``w_gate`` and ``w_in``, transposed, concatenated) and ``down_proj [E, d_model, d_hidden]``
    (``w_out`` transposed).
    """

    compressed = False  # stored as plain fp32 stacks (see CompressedExperts)

    def __init__(self, num_experts: int, d_model: int, d_hidden: int, activation: str = "gelu"):
        super().__init__()
        _check_experts_args(num_experts, d_model, d_hidden, activation)
        self.activation = activation
        bound_in, bound_out = 1 / math.sqrt(d_model), 1 / math.sqrt(d_hidden)
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, d_hidden).uniform_(-bound_in, bound_in))
        self.w_gate = (
            nn.Parameter(torch.empty(num_experts, d_model, d_hidden).uniform_(-bound_in, bound_in))
            if activation == "swiglu"
            else None
        )
        self.w_out = nn.Parameter(torch.empty(num_experts, d_hidden, d_model).uniform_(-bound_out, bound_out))

    @property
    def num_experts(self) -> int:
        return self.w_in.shape[0]

    @property
    def d_model(self) -> int:
        return self.w_in.shape[1]

    @property
    def d_hidden(self) -> int:
        return self.w_in.shape[2]

    @property
    def params_per_expert(self) -> int:
        return (3 if self.w_gate is not None else 2) * self.d_model * self.d_hidden

    @property
    def flops_per_token_per_expert(self) -> int:
        """2 FLOPs per multiply-accumulate of one expert on one token."""
        return 2 * self.params_per_expert

    def weights(self, dtype: torch.dtype | None = None):
        """``(w_in, w_gate or None, w_out)``, cast to ``dtype`` (subclasses may dequantize here)."""
        cast = (lambda w: w) if dtype is None else (lambda w: w.to(dtype))
        return cast(self.w_in), (cast(self.w_gate) if self.w_gate is not None else None), cast(self.w_out)

    def act(self, h: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """The hidden nonlinearity: GELU(h), or SwiGLU silu(gate) * h."""
        return F.silu(gate) * h if gate is not None else F.gelu(h)

    def expert_forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``i`` applied to rows ``x [n, d_model]``."""
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.num_experts:
            raise IndexError(f"i: expected an expert index in [0, {self.num_experts}), got {i!r}")
        w_in, w_gate, w_out = self.weights(x.dtype)
        gate = x @ w_gate[i] if w_gate is not None else None
        return self.act(x @ w_in[i], gate) @ w_out[i]

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every token: ``[T, d] -> [E, T, d]`` (soft MoE, shared experts)."""
        w_in, w_gate, w_out = self.weights(x.dtype)
        gate = torch.einsum("td,edh->eth", x, w_gate) if w_gate is not None else None
        return torch.bmm(self.act(torch.einsum("td,edh->eth", x, w_in), gate), w_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)

    def __len__(self) -> int:
        return self.num_experts

    def __getitem__(self, i: int) -> "ExpertView":
        if not isinstance(i, int) or isinstance(i, bool):
            raise TypeError(f"i: expected an int expert index, got {i!r}")
        if not -self.num_experts <= i < self.num_experts:
            raise IndexError(f"expert index {i} out of range for {self.num_experts} experts")
        return ExpertView(self, i % self.num_experts)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, "
            f"d_hidden={self.d_hidden}, activation={self.activation!r}"
        )


class CompressedExperts(Experts):
    """Base of experts stored in another form (packed codes, low-rank factors, shared bases).

    It keeps the source's real sizes, so ``num_experts``, ``d_model``, ``d_hidden`` and the FLOPs
    stay those of the function computed; subclasses store their tensors and override
    :meth:`weights` (every dispatch strategy goes through it) and ``params_per_expert``.
    """

    compressed = True  # techniques that rewrite expert weights refuse these (moe_course._validate)

    def __init__(self, source: Experts):
        nn.Module.__init__(self)  # no dense fp32 parameters: subclasses register their own storage
        if not isinstance(source, Experts):
            raise TypeError(f"experts: expected a moe_course.layers.Experts, got {type(source).__name__}")
        self.activation = source.activation
        self._sizes = (source.num_experts, source.d_model, source.d_hidden)

    @property
    def num_experts(self) -> int:
        return self._sizes[0]

    @property
    def d_model(self) -> int:
        return self._sizes[1]

    @property
    def d_hidden(self) -> int:
        return self._sizes[2]

    def weights(self, dtype: torch.dtype | None = None):  # pragma: no cover - abstract
        raise NotImplementedError


class ExpertView(nn.Module):
    """One expert of an :class:`Experts`, sharing its storage (edits and gradients go through)."""

    def __init__(self, experts: Experts, index: int):
        super().__init__()
        if not isinstance(experts, Experts):
            raise TypeError(f"experts: expected a moe_course.layers.Experts, got {type(experts).__name__}")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < experts.num_experts:
            raise IndexError(f"index: expected an expert index in [0, {experts.num_experts}), got {index!r}")
        object.__setattr__(self, "_experts", experts)  # not a submodule: no double counting
        self.index = index

    @property
    def w_in(self) -> torch.Tensor:
        return self._experts.w_in[self.index]

    @property
    def w_gate(self) -> torch.Tensor | None:
        g = self._experts.w_gate
        return None if g is None else g[self.index]

    @property
    def w_out(self) -> torch.Tensor:
        return self._experts.w_out[self.index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return self._experts.expert_forward(self.index, x.reshape(-1, shape[-1])).reshape(shape)

    def extra_repr(self) -> str:
        e = self._experts
        return f"index={self.index}, d_model={e.d_model}, d_hidden={e.d_hidden}, activation={e.activation!r}"


@dataclass
class RouterOutput:
    """What a router decided for ``T`` tokens.

    ``weights [T,k]`` gate values used to mix the experts, ``indices [T,k]`` chosen experts,
    ``logits [T,E]`` clean router logits (float32, before noise), ``probs [T,E]`` softmax of the
    (noisy, while training) logits, ``keep [T,k]`` assignments kept by capacity (``None``: all).
    """

    weights: torch.Tensor
    indices: torch.Tensor
    logits: torch.Tensor
    probs: torch.Tensor
    keep: torch.Tensor | None = None

    def detach(self) -> "RouterOutput":
        return RouterOutput(*(None if t is None else t.detach() for t in
                              (self.weights, self.indices, self.logits, self.probs, self.keep)))


class TopKRouter(nn.Module):
    r"""Softmax-then-top-k router, optionally noisy (Shazeer et al. 2017).

    .. math::
        H(x) = x W_g + \epsilon \odot \mathrm{softplus}(x W_{noise}), \quad \epsilon \sim \mathcal N(0, I)
        \text{ (training only)}

        p = \mathrm{softmax}(H(x)), \quad (w, i) = \mathrm{TopK}(p, k), \quad w \leftarrow w / \textstyle\sum_j w_j
        \text{ if renormalize}

    Softmax over all experts, then top-k, then renormalise equals Shazeer's softmax over the kept
    logits. With ``k=1`` keep ``renormalize=False`` (Switch): a renormalised top-1 gate is always
    1 and the router gets no gradient. Computed in float32 even under autocast.
    """

    def __init__(self, d_model: int, num_experts: int, k: int, noisy: bool = False, renormalize: bool = True):
        super().__init__()
        _check_router_args(d_model, num_experts, k)
        self.k, self.noisy, self.renormalize = k, bool(noisy), bool(renormalize)
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.noise = nn.Linear(d_model, num_experts, bias=False) if noisy else None
        if noisy:  # Shazeer et al. zero-initialise both: at step 0 only the noise spreads tokens.
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.noise.weight)
        else:
            nn.init.normal_(self.gate.weight, std=0.02)

    @property
    def num_experts(self) -> int:
        return self.gate.out_features

    def forward(self, x: torch.Tensor) -> RouterOutput:
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.float()
            logits = F.linear(xf, self.gate.weight.float())
            h = logits
            if self.noisy and self.training:
                h = logits + torch.randn_like(logits) * F.softplus(F.linear(xf, self.noise.weight.float()))
            probs = torch.softmax(h, dim=-1)
            weights, indices = probs.topk(self.k, dim=-1)
            if self.renormalize:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        return RouterOutput(weights, indices, logits, probs)

    def extra_repr(self) -> str:
        return f"k={self.k}, noisy={self.noisy}, renormalize={self.renormalize}"


class MoELayer(nn.Module):
    """Common protocol of every MoE layer: ``router``, ``experts``, ``k``, routing records."""

    router: TopKRouter
    experts: Experts

    def __init__(self):
        super().__init__()
        self.last_routing: RouterOutput | None = None
        self.aux_losses: dict[str, torch.Tensor] = {}

    @property
    def k(self) -> int:
        return self.router.k

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def d_model(self) -> int:
        return self.experts.d_model

    def _flatten_input(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., d_model] -> [T, d_model]``: every token of the batch, one per row."""
        _check_layer_input(x, self.d_model)
        return x.reshape(-1, self.d_model)

    def _record(self, r: RouterOutput) -> None:
        self.aux_losses = {
            "balance": load_balancing_loss(r.probs, r.indices, self.num_experts),
            "z": router_z_loss(r.logits),
        }
        self.last_routing = r.detach()

    def __getstate__(self):
        # After a forward with gradients on, aux_losses hold non-leaf tensors that deepcopy (and
        # pickle) refuse; copies of a layer (every compression function makes one) keep detached values.
        state = self.__dict__.copy()
        state["aux_losses"] = {name: t.detach() for name, t in self.aux_losses.items()}
        return state

    def _extra_active(self) -> tuple[int, int]:
        return 0, 0

    def active_params_per_token(self) -> int:
        """Router + the ``k`` experts a token runs (+ shared experts and projections)."""
        extra_p, _ = self._extra_active()
        return self.router.gate.weight.numel() + self.k * self.experts.params_per_expert + extra_p

    def flops_per_token(self) -> int:
        """2 x multiply-accumulates of the router and the experts a token runs."""
        _, extra_f = self._extra_active()
        return 2 * self.router.gate.weight.numel() + self.k * self.experts.flops_per_token_per_expert + extra_f


class SoftMoE(MoELayer):
    r"""Dense (soft) mixture of experts (Jacobs et al. 1991): every expert runs on every token.

    .. math:: y = \sum_{i=1}^{N} \mathrm{softmax}(W_g x)_i \, E_i(x)

    ``output_proj=True`` gives the slide deck's form "experts -> gated mix -> output projection"
    (a ``Linear(d_model, d_model)`` after the mix). Compute is ``N`` times one expert.
    """

    def __init__(self, d_model: int, num_experts: int, d_hidden: int, activation: str = "gelu",
                 output_proj: bool = False):
        super().__init__()
        self.experts = Experts(num_experts, d_model, d_hidden, activation)
        self.router = TopKRouter(d_model, num_experts, k=num_experts, renormalize=True)
        self.proj = nn.Linear(d_model, d_model) if output_proj else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self._flatten_input(x)
        r = self.router(flat)
        y = torch.einsum("te,etd->td", r.probs.to(flat.dtype), self.experts.forward_all(flat))
        if self.proj is not None:
            y = self.proj(y)
        self._record(r)
        return y.reshape(x.shape)

    def _extra_active(self) -> tuple[int, int]:
        n = 0 if self.proj is None else self.proj.weight.numel()
        extra_p = 0 if self.proj is None else n + self.proj.bias.numel()
        return extra_p, 2 * n


class SparseMoE(MoELayer):
    r"""Sparse top-k MoE (Shazeer et al. 2017; GShard; Switch): each token runs ``k`` experts.

    .. math:: y = \sum_{j=1}^{k} w_j(x)\, E_{i_j(x)}(x) \;+\; \sum_{s=1}^{S} E^{shared}_s(x)

    * ``capacity_factor``: each expert takes at most ``C = ceil(cf * T * k / N)`` assignments
      per batch; the rest are dropped and contribute 0 (the residual stream carries the token).
    * ``num_shared_experts``: always-on experts added for every token (DeepSeekMoE).
    * ``dispatch``: ``"naive" | "loop" | "grouped" | "auto"`` (:mod:`moe_course.dispatch`).

    After each forward, ``aux_losses`` holds the Switch balance loss ``N sum_i f_i P_i`` and the
    router z-loss (unweighted), and ``last_routing`` the detached routing decision.
    """

    def __init__(self, d_model: int, num_experts: int, d_hidden: int, k: int = 2,
                 capacity_factor: float | None = None, num_shared_experts: int = 0,
                 dispatch: str = "auto", activation: str = "gelu", noisy: bool = False,
                 renormalize: bool = True):
        super().__init__()
        _check_sparse_args(capacity_factor, num_shared_experts, dispatch)
        self.router = TopKRouter(d_model, num_experts, k, noisy=noisy, renormalize=renormalize)
        self.experts = Experts(num_experts, d_model, d_hidden, activation)
        self.shared = Experts(num_shared_experts, d_model, d_hidden, activation) if num_shared_experts else None
        self.capacity_factor = capacity_factor
        self.dispatch = dispatch

    def capacity(self, num_tokens: int) -> int | None:
        """Slots per expert for a batch of ``num_tokens`` (``None`` = unlimited)."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.k / self.num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self._flatten_input(x)
        r = self.router(flat)
        cap = self.capacity(flat.shape[0])
        if cap is not None:
            r = replace(r, keep=capacity_mask(r.indices, self.num_experts, cap))
        y = dispatch(flat, r.weights, r.indices, self.experts, self.dispatch, r.keep)
        if self.shared is not None:
            y = y + self.shared.forward_all(flat).sum(dim=0)
        self._record(r)
        return y.reshape(x.shape)

    def _extra_active(self) -> tuple[int, int]:
        if self.shared is None:
            return 0, 0
        n = self.shared.num_experts
        return n * self.shared.params_per_expert, n * self.shared.flops_per_token_per_expert

    def extra_repr(self) -> str:
        return f"k={self.k}, capacity_factor={self.capacity_factor}, dispatch={self.dispatch!r}"


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """All MoE layers of ``model`` in module order (the protocol compression functions rely on)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def require_moe_layers(model: nn.Module, action: str = "compress") -> list[MoELayer]:
    """:func:`moe_layers`, raising a clear error when ``model`` is no module or has none to ``action``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"model: {type(model).__name__} has no MoE layers (moe_course.layers.MoELayer) to {action}")
    return layers


# --------------------------------------------------------------------------------------------
# argument checks, kept out of the layers above. Shapes and dtypes only: a NaN/inf check in a
# forward would synchronise the GPU on every call (NaNs surface in the loss, which fit() stops on).
# --------------------------------------------------------------------------------------------
def _check_experts_args(num_experts, d_model, d_hidden, activation) -> None:
    for name, v in (("num_experts", num_experts), ("d_model", d_model), ("d_hidden", d_hidden)):
        _validate.positive_int(name, v)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


def _check_router_args(d_model, num_experts, k) -> None:
    _validate.positive_int("d_model", d_model)
    _validate.positive_int("num_experts", num_experts)
    if not isinstance(k, int) or not 1 <= k <= num_experts:
        raise ValueError(f"k: expected an integer in [1, num_experts={num_experts}], got {k!r}")


def _check_sparse_args(capacity_factor, num_shared_experts, dispatch) -> None:
    if capacity_factor is not None and not (isinstance(capacity_factor, (int, float)) and not isinstance(capacity_factor, bool)
                                            and math.isfinite(capacity_factor) and capacity_factor > 0):
        raise ValueError(f"capacity_factor: expected None or a finite number > 0, got {capacity_factor!r}")
    if not isinstance(num_shared_experts, int) or num_shared_experts < 0:
        raise ValueError(f"num_shared_experts: expected an integer >= 0, got {num_shared_experts!r}")
    if dispatch != "auto" and dispatch not in STRATEGIES:
        raise ValueError(f"dispatch: expected one of {STRATEGIES + ('auto',)}, got {dispatch!r}")


def _check_layer_input(x, d_model: int) -> None:
    if not torch.is_tensor(x):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != d_model:
        raise ValueError(f"x: expected last dimension d_model={d_model}, got shape {tuple(x.shape)}")
