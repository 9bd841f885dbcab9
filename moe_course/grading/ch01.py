"""Checkers for chapter 1, dense (soft) mixture of experts (Jacobs et al. 1991).

Each checker runs the student's function next to the package's reference (:class:`~moe_course.layers.SoftMoE`,
:class:`~moe_course.layers.Experts`) on fixed inputs, random inputs and edge cases, and recognises
the usual wrong answers (softmax over the token axis, no softmax, a forgotten gate or bias, a
missing transpose) so the hint names the mistake rather than only "values differ".
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence

import torch
import torch.nn as nn

from ..layers import Experts, SoftMoE
from .core import CheckFailed, checker, expect, expect_close

__all__ = [
    "check_soft_moe_forward",
    "check_gate_entropy",
    "check_soft_moe_params",
    "check_load_experts_into_stack",
]


def _close(a, b, rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    """True when ``a`` is a tensor of ``b``'s shape with (float32, CPU) values close to it."""
    if not torch.is_tensor(a) or not torch.is_tensor(b):
        return False
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=rtol, atol=atol))


# --------------------------------------------------------------------------------------------
# Exercise 1.1: the soft MoE forward pass
# --------------------------------------------------------------------------------------------
def _soft_moe_case(T: int, d: int, h: int, N: int, gate_scale: float = 1.0):
    """A package SoftMoE with random weights, its experts as callables and its reference output."""
    layer = SoftMoE(d, N, h)
    with torch.no_grad():
        layer.router.gate.weight.normal_(0.0, gate_scale)
    x = torch.randn(T, d)
    with torch.no_grad():
        y_ref = layer(x)
    experts = [layer.experts[i] for i in range(N)]
    return x, layer.router.gate.weight.detach().clone(), experts, y_ref


def _wrong_mixes(x: torch.Tensor, gate_weight: torch.Tensor, experts: Sequence[Callable]) -> dict[str, torch.Tensor]:
    """The outputs of the usual mistakes, each keyed by the hint that explains it."""
    with torch.no_grad():
        outs = torch.stack([e(x) for e in experts])  # [N, T, d]
        logits = x @ gate_weight.T  # [T, N]

        def mix(g: torch.Tensor) -> torch.Tensor:
            return torch.einsum("tn,ntd->td", g, outs)

        return {
            "the softmax runs over the token axis (dim=0); the gate is a distribution over the "
            "N experts for each token: softmax over the expert axis (dim=-1) of the [T, N] logits":
                mix(torch.softmax(logits, dim=0)),
            "the expert outputs are weighted by the raw logits x @ gate_weight.T; apply a softmax "
            "over the experts first so the gate values are positive and sum to 1":
                mix(logits),
            "the expert outputs are added without the gate: y = sum_i g_i(x) E_i(x), with "
            "g(x) = softmax(x @ gate_weight.T) over the experts":
                outs.sum(0),
            "the expert outputs are averaged with equal weights 1/N; weight them by the gate "
            "g(x) = softmax(x @ gate_weight.T) instead (different for every token)":
                outs.mean(0),
            "the gate uses a sigmoid; a soft MoE gate is a softmax over the experts (values sum to 1)":
                mix(torch.sigmoid(logits)),
            "the gate uses log_softmax: those are log-probabilities (negative numbers); weight the experts by "
            "the probabilities themselves, torch.softmax(x @ gate_weight.T, dim=-1)":
                mix(torch.log_softmax(logits, dim=-1)),
        }


def _call_forward(fn: Callable, x, gate_weight, experts):
    try:
        return fn(x.clone(), gate_weight.clone(), list(experts))
    except RuntimeError as exc:
        if "shape" in str(exc) or "size" in str(exc):
            raise CheckFailed(
                f"a shape error ({exc}). Shapes: x [T, d], gate_weight [N, d] (stored like "
                "nn.Linear.weight, so the logits are x @ gate_weight.T, [T, N]), each expert maps "
                "[T, d] -> [T, d]"
            ) from None
        raise


@checker("Exercise 1.1: soft_moe_forward")
def check_soft_moe_forward(soft_moe_forward: Callable) -> None:
    """y = sum_i softmax(W_g x)_i E_i(x) against :class:`~moe_course.layers.SoftMoE`."""
    # Fixed case with T, d, N all different, so an axis mix-up cannot hide.
    x, w, experts, y_ref = _soft_moe_case(T=7, d=6, h=10, N=3)
    y = _call_forward(soft_moe_forward, x, w, experts)
    expect(torch.is_tensor(y), f"return a torch.Tensor of shape [T, d], got {type(y).__name__}")
    expect(tuple(y.shape) == (7, 6), f"expected y of shape [T, d] = (7, 6), got {tuple(y.shape)}")
    if not _close(y, y_ref):
        for hint, wrong in _wrong_mixes(x, w, experts).items():
            if _close(y, wrong):
                raise CheckFailed(hint)
    expect_close(y, y_ref, "compute g = softmax(x @ gate_weight.T, dim=-1) ([T, N]) and "
                 "y = sum_i g[:, i:i+1] * experts[i](x)")

    # Identity experts: whatever the gate, a convex mix of x with itself is x.
    ident = [lambda t: t for _ in range(4)]
    xi = torch.randn(5, 6)
    wi = torch.randn(4, 6)
    yi = _call_forward(soft_moe_forward, xi, wi, ident)
    expect_close(yi, xi, "with N identical experts E_i(x) = x the output must be x: the gate "
                 "values of each token must be positive and sum to 1 (a softmax over the experts)")

    # Edge cases: one token (a softmax over tokens would give every gate 1), one expert (gate = 1).
    for T, N in ((1, 4), (9, 1)):
        x, w, experts, y_ref = _soft_moe_case(T=T, d=5, h=8, N=N)
        y = _call_forward(soft_moe_forward, x, w, experts)
        if not _close(y, y_ref):
            for hint, wrong in _wrong_mixes(x, w, experts).items():
                if _close(y, wrong):
                    raise CheckFailed(f"with T={T} tokens and N={N} experts: {hint}")
        expect_close(y, y_ref, f"wrong result with T={T} tokens and N={N} expert(s)")

    # Large logits: exp() of them overflows unless the softmax subtracts the max first.
    x, w, experts, y_ref = _soft_moe_case(T=6, d=8, h=8, N=5, gate_scale=60.0)
    y = _call_forward(soft_moe_forward, x, w, experts)
    expect(torch.is_tensor(y) and bool(torch.isfinite(y).all()),
           "the output has inf/nan for large router logits: use torch.softmax (it subtracts the "
           "max logit before exp) rather than exp(logits) / exp(logits).sum()")
    expect_close(y, y_ref, "wrong result for large router logits (a nearly one-hot gate)", rtol=1e-3, atol=1e-4)

    # Random sizes.
    for _ in range(3):
        T, d, h, N = (int(v) for v in torch.randint(2, 12, (4,)))
        x, w, experts, y_ref = _soft_moe_case(T, d, h, N)
        expect_close(_call_forward(soft_moe_forward, x, w, experts), y_ref,
                     f"wrong result on random inputs with T={T}, d={d}, N={N}")


# --------------------------------------------------------------------------------------------
# Exercise 1.2: entropy of the gate
# --------------------------------------------------------------------------------------------
def _entropy_ref(probs: torch.Tensor) -> torch.Tensor:
    return torch.special.entr(probs.double()).sum(dim=-1).float()  # entr(0) = 0 by definition


@checker("Exercise 1.2: gate_entropy")
def check_gate_entropy(gate_entropy: Callable) -> None:
    """H(g(x)) = -sum_i g_i log g_i per token, in nats, with 0 log 0 = 0."""
    probs = torch.softmax(torch.randn(6, 4) * 2, dim=-1)  # T=6 tokens, N=4 experts
    h = gate_entropy(probs.clone())
    expect(torch.is_tensor(h), f"return a torch.Tensor of shape [T], got {type(h).__name__}")
    ref = _entropy_ref(probs)
    if tuple(h.shape) == (4,):
        raise CheckFailed("got one value per expert ([N]); sum over the expert axis (dim=-1) to get "
                          "one entropy per token ([T])")
    if h.dim() == 0:
        raise CheckFailed("got a single number; return one entropy per token (shape [T]), do not average")
    expect(tuple(h.shape) == (6,), f"expected shape [T] = (6,), got {tuple(h.shape)}")
    if _close(h, -ref):
        raise CheckFailed("the sign is flipped: H = -sum_i p_i log p_i is >= 0")
    if _close(h, ref / math.log(2)):
        raise CheckFailed("this is the entropy in bits (log2); use the natural log (nats)")
    if _close(h, ref / math.log(4)):
        raise CheckFailed("this is normalised by log N; return the plain entropy in nats")
    if _close(h, ref / 4):
        raise CheckFailed("you averaged over the experts (.mean): the entropy SUMS -p_i log p_i over the N experts "
                          "(.sum(dim=-1))")
    expect_close(h, ref, "compute -(probs * probs.log()).sum(dim=-1)")

    # Uniform gate: log N; one-hot gate: 0 (needs 0 * log 0 = 0, not nan).
    uniform = torch.full((3, 8), 1 / 8)
    expect_close(gate_entropy(uniform), torch.full((3,), math.log(8)),
                 "a uniform gate over N=8 experts has entropy log 8")
    onehot = torch.eye(5)
    h0 = gate_entropy(onehot.clone())
    expect(torch.is_tensor(h0) and bool(torch.isfinite(h0).all()),
           "nan for a gate with exact zeros: 0 * log 0 is nan in floating point but 0 by definition; "
           "use torch.special.xlogy(p, p) or torch.special.entr, or clamp p before the log")
    expect_close(h0, torch.zeros(5), "a one-hot gate (one expert takes all) has entropy 0")

    # Extra leading axes: [B, T, N] -> [B, T].
    p3 = torch.softmax(torch.randn(2, 3, 5), dim=-1)
    h3 = gate_entropy(p3.clone())
    expect_close(h3, _entropy_ref(p3), "for probs of shape [B, T, N] return [B, T]: reduce over the last axis only")


# --------------------------------------------------------------------------------------------
# Exercise 1.3: parameter count
# --------------------------------------------------------------------------------------------
def _params_ref(d_model: int, d_hidden: int, num_experts: int, output_proj: bool) -> int:
    layer = SoftMoE(d_model, num_experts, d_hidden, output_proj=output_proj)
    return sum(p.numel() for p in layer.parameters())


@checker("Exercise 1.3: soft_moe_params")
def check_soft_moe_params(soft_moe_params: Callable) -> None:
    """Parameters of :class:`~moe_course.layers.SoftMoE` (GELU experts without biases, gate without bias)."""
    cases = [(16, 32, 4, False), (16, 32, 4, True), (8, 8, 1, False), (8, 8, 1, True),
             (64, 128, 8, False), (64, 128, 8, True), (5, 7, 3, True)]
    for d, h, N, proj in cases:
        got = soft_moe_params(d, h, N, proj)
        where = f"soft_moe_params(d_model={d}, d_hidden={h}, num_experts={N}, output_proj={proj})"
        if torch.is_tensor(got) and got.numel() == 1:
            got = got.item()
        expect(isinstance(got, numbers.Integral) or (isinstance(got, float) and got.is_integer()),
               f"{where} returned {got!r}; return a whole number (int)")
        got = int(got)
        ref = _params_ref(d, h, N, proj)
        if got == ref:
            continue
        diff = ref - got
        hints = {
            N * d: "the gate is missing: W_g is a [N, d_model] matrix (N * d_model parameters)",
            d: "the output projection's bias is missing: Linear(d_model, d_model) has d_model^2 + d_model parameters",
            d * d + d: "the output projection is missing when output_proj=True (d_model^2 + d_model parameters)",
            -(d * d + d): "the output projection is counted although output_proj=False",
            -N * (h + d): "biases were counted inside the experts; the package's experts have none "
                          "(w_in [N, d, h] and w_out [N, h, d] only)",
            -N: "a bias was counted in the gate; the gate is a Linear(d_model, N, bias=False)",
            N * d * h: "one of the two expert matrices is missing: each expert has w_in [d, h] and w_out [h, d]",
            (N - 1) * 2 * d * h: "only one expert was counted: all N experts are stored (and all run)",
        }
        if diff in hints:
            raise CheckFailed(f"{where} = {got}, expected {ref}: {hints[diff]}")
        raise CheckFailed(f"{where} = {got}, expected {ref}. Count N experts x (w_in + w_out), the gate "
                          "W_g [N, d_model], and the projection's weight and bias when output_proj=True")


# --------------------------------------------------------------------------------------------
# Exercise 1.4: from a list of nn.Linear experts to stacked tensors
# --------------------------------------------------------------------------------------------
def _mlps(N: int, d: int, h: int) -> list[nn.Sequential]:
    return [nn.Sequential(nn.Linear(d, h, bias=False), nn.GELU(), nn.Linear(h, d, bias=False)) for _ in range(N)]


@checker("Exercise 1.4: load_experts_into_stack")
def check_load_experts_into_stack(load_experts_into_stack: Callable) -> None:
    """Stack ``nn.Linear`` weights (``[out, in]``) into the row-vector layout of :class:`~moe_course.layers.Experts`."""
    for N, d, h in ((3, 6, 10), (2, 4, 4), (1, 5, 7)):
        mlps = _mlps(N, d, h)
        out = load_experts_into_stack(mlps)
        expect(isinstance(out, (tuple, list)) and len(out) == 2,
               f"return a pair (w_in, w_out), got {type(out).__name__}")
        w_in, w_out = out
        expect(torch.is_tensor(w_in) and torch.is_tensor(w_out), "w_in and w_out must be torch tensors")
        ref_in = torch.stack([m[0].weight.detach().T for m in mlps])
        ref_out = torch.stack([m[2].weight.detach().T for m in mlps])
        no_t_in = torch.stack([m[0].weight.detach() for m in mlps])
        no_t_out = torch.stack([m[2].weight.detach() for m in mlps])
        if _close(w_in, ref_out) or _close(w_out, ref_in):
            raise CheckFailed("w_in and w_out are swapped: w_in comes from the first Linear (mlp[0]), "
                              "w_out from the last (mlp[2])")
        if _close(w_in, no_t_in) or _close(w_out, no_t_out) or (d != h and tuple(w_in.shape) == (N, h, d)):
            raise CheckFailed(
                "the weights are not transposed: nn.Linear stores weight as [out_features, in_features] "
                "and computes x @ weight.T; Experts uses row vectors, x @ w_in[i], so w_in[i] = "
                "mlp[0].weight.T ([d_model, d_hidden]) and w_out[i] = mlp[2].weight.T ([d_hidden, d_model])")
        expect(tuple(w_in.shape) == (N, d, h), f"w_in: expected shape [N, d_model, d_hidden] = {(N, d, h)}, "
               f"got {tuple(w_in.shape)}")
        expect(tuple(w_out.shape) == (N, h, d), f"w_out: expected shape [N, d_hidden, d_model] = {(N, h, d)}, "
               f"got {tuple(w_out.shape)}")
        reshaped = torch.stack([m[0].weight.detach().reshape(d, h) for m in mlps])
        if d != h and _close(w_in, reshaped):
            raise CheckFailed("w_in has the right shape but scrambled values: reshape/view reinterprets the memory "
                              "in a new shape, it does not transpose; use mlp[0].weight.T (or .transpose(0, 1))")
        if N > 1 and _close(w_in, ref_in.flip(0)):
            raise CheckFailed("the experts are in reverse order: w_in[i] must come from mlps[i]")
        expect_close(w_in, ref_in, "w_in[i] must be mlps[i][0].weight.T")
        expect_close(w_out, ref_out, "w_out[i] must be mlps[i][2].weight.T")

        # End to end: loaded into the package's Experts, every expert reproduces its MLP.
        stack = Experts(N, d, h)
        with torch.no_grad():
            stack.w_in.copy_(w_in)
            stack.w_out.copy_(w_out)
            x = torch.randn(4, d)
            for i, m in enumerate(mlps):
                expect_close(stack[i](x), m(x), f"expert {i} loaded into Experts does not reproduce mlps[{i}]")
