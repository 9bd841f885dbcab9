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
    "check_soft_moe_stacked",
    "check_gate_weight_grad",
    "check_unstack_experts",
    "check_soft_vs_topk_gap",
    "real_hidden_states",
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


# ============================================================================================
# The exercises as the notebook asks them now: variants the chapter does not show (the stacked,
# vectorised layer; the gradient of the gate MATRIX; the inverse of the chapter's stacking), the
# parameter count the chapter derives in math, and one exercise that runs the learner's layer on
# a trained zoo model. (The checkers above remain for older notebooks.)
# ============================================================================================
_NO_PACKAGE = ("moe_course.layers.SoftMoE", "moe_course.layers.Experts.forward_all",
               "moe_course.layers.Experts.expert_forward")
_NO_AUTOGRAD = ("torch.autograd.grad", "torch.autograd.backward", "torch.Tensor.backward")


def _reference_stacked(x, gate_weight, w_in, w_out, w_gate=None) -> torch.Tensor:
    x, gw = x.double(), gate_weight.double()
    g = torch.softmax(x @ gw.T, dim=-1)  # [T, N]
    h = torch.einsum("td,ndf->ntf", x, w_in.double())
    if w_gate is not None:
        h = torch.nn.functional.silu(torch.einsum("td,ndf->ntf", x, w_gate.double())) * h
    else:
        h = torch.nn.functional.gelu(h)
    outs = torch.einsum("ntf,nfd->ntd", h, w_out.double())
    return torch.einsum("tn,ntd->td", g, outs).float()


def _stacked_case(T: int, d: int, f: int, N: int, swiglu: bool = False, gate_scale: float = 1.0):
    x = torch.randn(T, d)
    gw = torch.randn(N, d) * gate_scale
    w_in, w_out = torch.randn(N, d, f) / math.sqrt(d), torch.randn(N, f, d) / math.sqrt(f)
    w_gate = torch.randn(N, d, f) / math.sqrt(d) if swiglu else None
    return x, gw, w_in, w_out, w_gate


def _stacked_variants(x, gw, w_in, w_out, w_gate) -> dict[str, torch.Tensor]:
    """What the usual mistakes compute, keyed by their hint."""
    F_ = torch.nn.functional
    xd = x.double()
    logits = xd @ gw.double().T
    if w_gate is None:
        pre = torch.einsum("td,ndf->ntf", xd, w_in.double())
        hidden = {"gelu": F_.gelu(pre), "relu": F_.relu(pre), "tanh": F_.gelu(pre, approximate="tanh"),
                  "none": pre}
    else:
        a = torch.einsum("td,ndf->ntf", xd, w_in.double())
        b = torch.einsum("td,ndf->ntf", xd, w_gate.double())
        hidden = {"gelu": F_.silu(b) * a, "swapped": F_.silu(a) * b, "no_gate_branch": F_.gelu(a),
                  "sigmoid": torch.sigmoid(b) * a}
    outs = {k: torch.einsum("ntf,nfd->ntd", h, w_out.double()) for k, h in hidden.items()}

    def mix(g, o="gelu"):
        return torch.einsum("tn,ntd->td", g, outs[o]).float()

    v = {
        "the softmax runs over the token axis (dim=0); each token needs its own distribution over the N "
        "experts: softmax over the last axis of the [T, N] logits": mix(torch.softmax(logits, dim=0)),
        "the experts are weighted by the raw logits; apply a softmax over the experts first":
            mix(logits),
        "the experts are added without the gate: y = sum_i g_i(x) E_i(x)": outs["gelu"].sum(0).float(),
        "the experts are averaged with equal weights 1/N; weight them by the gate g(x), which differs "
        "from token to token": outs["gelu"].mean(0).float(),
    }
    if w_gate is None:
        v["the hidden layer uses ReLU; the course's experts use GELU (torch.nn.functional.gelu, the exact "
          "erf form)"] = mix(torch.softmax(logits, -1), "relu")
        v["the hidden layer uses the tanh approximation of GELU; use the exact form, F.gelu(h) without "
          "approximate='tanh'"] = mix(torch.softmax(logits, -1), "tanh")
        v["there is no nonlinearity between w_in and w_out; apply GELU to x @ w_in[i]"] = \
            mix(torch.softmax(logits, -1), "none")
    else:
        v["SwiGLU's two branches are swapped: silu goes on the GATE branch, silu(x @ w_gate[i]) * "
          "(x @ w_in[i])"] = mix(torch.softmax(logits, -1), "swapped")
        v["w_gate is ignored: with w_gate given the experts are SwiGLU, silu(x @ w_gate[i]) * "
          "(x @ w_in[i]), not GELU"] = mix(torch.softmax(logits, -1), "no_gate_branch")
        v["SwiGLU uses silu(a) = a * sigmoid(a), not sigmoid(a) alone"] = \
            mix(torch.softmax(logits, -1), "sigmoid")
    return v


def _call_stacked(fn, x, gw, w_in, w_out, w_gate):
    args = (x.clone(), gw.clone(), w_in.clone(), w_out.clone())
    try:
        return fn(*args) if w_gate is None else fn(*args, w_gate.clone())
    except RuntimeError as exc:
        if "shape" in str(exc) or "size" in str(exc) or "dimension" in str(exc):
            raise CheckFailed(
                f"a shape error ({exc}). Shapes: x [T, d]; gate_weight [N, d] like nn.Linear.weight, so the "
                "logits are x @ gate_weight.T ([T, N]); w_in and w_gate [N, d, f] and w_out [N, f, d] in the "
                "row-vector form: expert i computes act(x @ w_in[i]) @ w_out[i], no transposes") from None
        raise


def _check_stacked_case(fn, case, where: str) -> None:
    x, gw, w_in, w_out, w_gate = case
    y = _call_stacked(fn, x, gw, w_in, w_out, w_gate)
    T, d = x.shape
    expect(torch.is_tensor(y), f"{where}: return a torch.Tensor of shape [T, d], got {type(y).__name__}")
    expect(tuple(y.shape) == (T, d), f"{where}: expected y of shape [T, d] = {(T, d)}, got {tuple(y.shape)}")
    ref = _reference_stacked(x, gw, w_in, w_out, w_gate)
    if not _close(y, ref):
        for hint, wrong in _stacked_variants(x, gw, w_in, w_out, w_gate).items():
            if _close(y, wrong):
                raise CheckFailed(f"{where}: {hint}")
    expect(bool(torch.isfinite(y).all()), f"{where}: the output has inf/nan; use torch.softmax (it subtracts "
                                          "the largest logit before exp), not exp(z) / exp(z).sum()")
    expect_close(y, ref, f"{where}: wrong values. Compute g = softmax(x @ gate_weight.T) over the experts, "
                 "every expert's output with einsum over the stacked weights ([N, T, d]), then sum_i g_i E_i(x)",
                 rtol=1e-4, atol=1e-5)


@checker("Exercise 1.1: soft_moe_stacked", forbid=_NO_PACKAGE)
def check_soft_moe_stacked(soft_moe_stacked: Callable) -> None:
    """y = sum_i softmax(x W_g^T)_i act(x w_in[i]) w_out[i] on stacked tensors, GELU or SwiGLU."""
    # T, d, f, N all different, so an axis mix-up cannot hide.
    _check_stacked_case(soft_moe_stacked, _stacked_case(7, 6, 10, 3), "GELU experts, T=7, d=6, f=10, N=3")
    _check_stacked_case(soft_moe_stacked, _stacked_case(5, 4, 9, 6, swiglu=True),
                        "SwiGLU experts (w_gate given), T=5, d=4, f=9, N=6")
    # identity-like case: one token (a softmax over the tokens would give every gate 1)
    _check_stacked_case(soft_moe_stacked, _stacked_case(1, 6, 8, 4), "one token, N=4")
    _check_stacked_case(soft_moe_stacked, _stacked_case(6, 8, 8, 5, gate_scale=60.0),
                        "large router logits (a nearly one-hot gate)")
    # the same weights as a package SoftMoE: the learner's layer is the chapter's layer
    layer = SoftMoE(8, 4, 12)
    with torch.no_grad():
        layer.router.gate.weight.normal_()
        x = torch.randn(9, 8)
        y_ref = layer(x)
        y = _call_stacked(soft_moe_stacked, x, layer.router.gate.weight.detach(), layer.experts.w_in.detach(),
                          layer.experts.w_out.detach(), None)
    expect_close(y, y_ref, "your layer differs from moe_course.layers.SoftMoE with the same weights")
    # gradients must flow (the function is a layer, it will be trained)
    x, gw, w_in, w_out, _ = _stacked_case(4, 5, 6, 3)
    gw.requires_grad_(True)
    y = soft_moe_stacked(x, gw, w_in, w_out)
    expect(torch.is_tensor(y) and y.requires_grad, "the output does not depend differentiably on gate_weight "
           "(no .detach(), no .item(), no torch.no_grad() inside the function)")


# --------------------------------------------------------------------------------------------
# Exercise 1.2: the gradient of the gate matrix, without autograd
# --------------------------------------------------------------------------------------------
def _grad_case(T: int, d: int, N: int, scale: float = 1.0):
    x = torch.randn(T, d, dtype=torch.float64)
    gw = torch.randn(N, d, dtype=torch.float64) * scale
    outs = torch.randn(N, T, d, dtype=torch.float64)
    gy = torch.randn(T, d, dtype=torch.float64)
    return x, gw, outs, gy


def _reference_grad(x, gw, outs, gy) -> torch.Tensor:
    w = gw.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        g = torch.softmax(x @ w.T, dim=-1)
        y = torch.einsum("tn,ntd->td", g, outs)
        (grad,) = torch.autograd.grad((y * gy).sum(), w)
    return grad


def _grad_variants(x, gw, outs, gy) -> dict[str, torch.Tensor]:
    g = torch.softmax(x @ gw.T, dim=-1)  # [T, N]
    y = torch.einsum("tn,ntd->td", g, outs)
    inner = torch.einsum("td,ntd->tn", gy, outs - y)  # <dL/dy, E_j - y>
    dz = g * inner
    return {
        "the '- y' is missing: the gate's gradient compares each expert with the current mix, "
        "dL/dz_j = g_j <dL/dy, E_j(x) - y>": (g * torch.einsum("td,ntd->tn", gy, outs)).T @ x,
        "the factor g_j is missing: dL/dz_j = g_j <dL/dy, E_j(x) - y> (the softmax Jacobian "
        "g_i (delta_ij - g_j) brings it)": inner.T @ x,
        "the sign is flipped: this is the direction of steepest descent, return the gradient itself":
            -(dz.T @ x),
        "this is averaged over the tokens; the loss is a SUM over tokens, so the gradients of the "
        "tokens add up (dz.T @ x, no division by T)": dz.T @ x / x.shape[0],
        "y in E_j(x) - y is the gate-weighted mix sum_i g_i E_i(x), not the plain average of the experts":
            (g * torch.einsum("td,ntd->tn", gy, outs - outs.mean(0))).T @ x,
    }


@checker("Exercise 1.2: gate_weight_grad", forbid=_NO_AUTOGRAD)
def check_gate_weight_grad(gate_weight_grad: Callable) -> None:
    """dL/d gate_weight (= W_g^T) for L = sum_t <grad_y_t, y_t>, from the chapter's derivation,
    checked against autograd."""
    for T, d, N in ((7, 5, 3), (1, 4, 6), (12, 3, 2)):
        x, gw, outs, gy = _grad_case(T, d, N)
        where = f"T={T}, d={d}, N={N}"
        try:
            got = gate_weight_grad(x.clone(), gw.clone(), outs.clone(), gy.clone())
        except CheckFailed as exc:
            if "torch." in str(exc):
                raise CheckFailed("your function calls autograd (backward / torch.autograd.grad): the exercise "
                                  "asks for the gradient from the chapter's formula, computed by hand") from None
            raise
        expect(torch.is_tensor(got), f"{where}: return a tensor [N, d], got {type(got).__name__}")
        ref = _reference_grad(x, gw, outs, gy)
        if tuple(got.shape) == (T, N) and (T, N) != (N, d):
            raise CheckFailed(f"{where}: got shape [T, N] = {(T, N)}: that is dL/dz, the gradient of the logits. "
                              "Chain it through z = x @ gate_weight.T: the gradient of gate_weight is "
                              "(dL/dz).T @ x, shape [N, d]")
        if tuple(got.shape) == (d, N) and (d, N) != (N, d):
            raise CheckFailed(f"{where}: got shape [d, N]; gate_weight is stored [N, d] like nn.Linear.weight, so "
                              "its gradient has that shape too: (dL/dz).T @ x")
        expect(tuple(got.shape) == (N, d), f"{where}: expected shape [N, d] = {(N, d)}, got {tuple(got.shape)}")
        if not _close(got, ref, rtol=1e-4, atol=1e-6):
            for hint, wrong in _grad_variants(x, gw, outs, gy).items():
                if _close(got, wrong, rtol=1e-4, atol=1e-6) and not _close(wrong, ref, rtol=1e-4, atol=1e-6):
                    raise CheckFailed(f"{where}: {hint}")
        expect_close(got.double(), ref, f"{where}: wrong values. dL/dz_tj = g_tj <grad_y_t, E_j(x_t) - y_t> with "
                     "g = softmax(x @ gate_weight.T) and y the mix; then d L / d gate_weight = (dL/dz).T @ x",
                     rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Exercise 1.4: from stacked tensors back to nn.Linear experts (the inverse of section 1.3)
# --------------------------------------------------------------------------------------------
@checker("Exercise 1.4: unstack_experts", forbid=_NO_PACKAGE)
def check_unstack_experts(unstack_experts: Callable) -> None:
    """``unstack_experts(w_in [N, d, f], w_out [N, f, d])`` -> N ``nn.Sequential(Linear, GELU, Linear)``
    that compute what the stacked experts compute."""
    for N, d, f in ((3, 6, 10), (2, 4, 4), (1, 5, 7)):
        layer = SoftMoE(d, N, f)
        w_in, w_out = layer.experts.w_in.detach().clone(), layer.experts.w_out.detach().clone()
        where = f"N={N}, d={d}, f={f}"
        mlps = unstack_experts(w_in.clone(), w_out.clone())
        expect(isinstance(mlps, (list, tuple, nn.ModuleList)), f"{where}: return a list of N modules, "
               f"got {type(mlps).__name__}")
        expect(len(mlps) == N, f"{where}: expected {N} experts, got {len(mlps)}")
        x = torch.randn(5, d)
        with torch.no_grad():
            want = layer.experts.forward_all(x)
        for i, m in enumerate(mlps):
            expect(isinstance(m, nn.Module), f"{where}: expert {i} is a {type(m).__name__}, not an nn.Module")
            lins = [c for c in m.modules() if isinstance(c, nn.Linear)]
            expect(len(lins) == 2, f"{where}: expert {i} must hold two nn.Linear layers (d -> f, f -> d), "
                   f"found {len(lins)}")
            a, b = lins
            if (a.in_features, a.out_features) == (f, d) and (b.in_features, b.out_features) == (d, f) and d != f:
                raise CheckFailed(f"{where}: the two Linear layers are swapped: the first maps d -> f "
                                  "(from w_in), the second f -> d (from w_out)")
            expect((a.in_features, a.out_features, b.in_features, b.out_features) == (d, f, f, d),
                   f"{where}: expert {i}: expected Linear({d}, {f}) then Linear({f}, {d}), got Linear("
                   f"{a.in_features}, {a.out_features}) then Linear({b.in_features}, {b.out_features})")
            expect(a.bias is None and b.bias is None, f"{where}: the stacked experts have no biases: build "
                   "nn.Linear(..., bias=False) (a bias initialised at random changes the function)")
            if _close(a.weight, w_in[i].reshape(f, d)) and d != f:
                raise CheckFailed(f"{where}: reshape/view reinterprets the memory, it does not transpose: "
                                  "Linear.weight = w_in[i].T")
            if d == f and _close(a.weight, w_in[i]) and not _close(w_in[i], w_in[i].T):
                raise CheckFailed(f"{where}: the weights are not transposed: nn.Linear stores [out, in] and "
                                  "computes x @ weight.T, so Linear.weight = w_in[i].T (and w_out[i].T)")
            with torch.no_grad():
                got = m(x)
            if torch.is_tensor(got) and tuple(got.shape) == (5, d) and N > 1 and any(
                    _close(got, want[j]) for j in range(N) if j != i):
                raise CheckFailed(f"{where}: expert {i} computes another expert's function: keep the order, "
                                  "mlps[i] from w_in[i] and w_out[i]")
            if torch.is_tensor(got) and tuple(got.shape) == (5, d) and _close(
                    got, torch.relu(x @ w_in[i]) @ w_out[i]) and not _close(got, want[i]):
                raise CheckFailed(f"{where}: the hidden nonlinearity is ReLU; the experts use GELU (nn.GELU())")
            expect(torch.is_tensor(got) and _close(got, want[i], rtol=1e-4, atol=1e-5),
                   f"{where}: expert {i} does not compute gelu(x @ w_in[i]) @ w_out[i]")



# --------------------------------------------------------------------------------------------
# Exercise 1.5 (use it): the trained top-2 model run as a soft MoE
# --------------------------------------------------------------------------------------------
_REAL: dict[str, object] = {}


def real_hidden_states(num_signals: int = 256):
    """``(model, xs)``: the ``mnist1d-moe`` zoo model (trained on first use, then loaded from the
    cache) and ``xs[l]``, the real hidden states ``[T, d]`` that reach its MoE layer ``l`` on the
    first ``num_signals`` validation signals (20 tokens each)."""
    key = f"hidden-{num_signals}"
    if key not in _REAL:
        from moe_course import zoo
        model = zoo.pretrained("mnist1d-moe", progress=False).eval()
        data = zoo.data("mnist1d-moe")["validation"][:num_signals]
        xs: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda mod, args, out: xs.append(args[0].detach().reshape(-1, mod.d_model)))
                 for m in model.moe_layers()]
        try:
            with torch.no_grad():
                model(data["x"])
        finally:
            for h in hooks:
                h.remove()
        _REAL[key] = (model, xs)
    return _REAL[key]


def _reference_gap(layer, x) -> float:
    with torch.no_grad():
        e = layer.experts
        y_soft = _reference_stacked(x, layer.router.gate.weight, e.w_in, e.w_out, e.w_gate).double()
        y_sparse = layer(x).double()
    return float((y_soft - y_sparse).norm() / y_sparse.norm())


def _gap_variants(layer, x) -> dict[str, float]:
    with torch.no_grad():
        e = layer.experts
        y_soft = _reference_stacked(x, layer.router.gate.weight, e.w_in, e.w_out, e.w_gate).double()
        y_gelu = _reference_stacked(x, layer.router.gate.weight, e.w_in, e.w_out, None).double()
        y_sparse = layer(x).double()
    diff = y_soft - y_sparse
    return {
        "a percentage; return the ratio itself (0.05, not 5)": 100 * float(diff.norm() / y_sparse.norm()),
        "divided by the soft output's norm; the question measures the change relative to what the trained "
        "top-k layer outputs: ||y_soft - y_sparse|| / ||y_sparse||": float(diff.norm() / y_soft.norm()),
        "not relative: divide by ||y_sparse||": float(diff.norm()),
        "a mean of per-token ratios; the question asks one ratio of norms over all tokens (Frobenius norms "
        "of the [T, d] matrices)": float((diff.norm(dim=1) / y_sparse.norm(dim=1)).mean()),
        "the zoo's experts are SwiGLU: pass layer.experts.w_gate to your soft_moe_stacked":
            float((y_gelu - y_sparse).norm() / y_sparse.norm()),
    }


@checker("Exercise 1.5: soft_vs_topk_gap on a real model", forbid=_NO_PACKAGE, timeout=120)
def check_soft_vs_topk_gap(soft_vs_topk_gap: Callable) -> None:
    """``soft_vs_topk_gap(layer, x) -> float``: ||y_soft - y_topk|| / ||y_topk|| on each MoE layer of the
    trained mnist1d-moe model (tolerance 1 % relative)."""
    model, xs = real_hidden_states()
    lines = []
    for l, (layer, x) in enumerate(zip(model.moe_layers(), xs)):
        out = soft_vs_topk_gap(layer, x.clone())
        if torch.is_tensor(out):
            expect(out.numel() == 1, f"layer {l}: return one number, got a tensor of shape {tuple(out.shape)}")
            out = out.item()
        expect(isinstance(out, numbers.Real) and not isinstance(out, bool),
               f"layer {l}: return a float, got {type(out).__name__}")
        ref = _reference_gap(layer, x)
        if not math.isclose(out, ref, rel_tol=0.01, abs_tol=1e-4):
            for hint, value in _gap_variants(layer, x).items():
                if math.isclose(out, value, rel_tol=0.01, abs_tol=1e-4):
                    raise CheckFailed(f"layer {l}: you get {out:.4f}: {hint}")
            raise CheckFailed(f"layer {l}: you get {out:.4f}, the reference {ref:.4f} (tolerance 1 %). Run your "
                              "soft_moe_stacked with the layer's own weights (router.gate.weight, experts.w_in, "
                              "experts.w_out, experts.w_gate), run the layer itself, and return ||y_soft - "
                              "y_topk|| / ||y_topk||")
        lines.append(f"layer {l}: {out:.3f}")
    print("mnist1d-moe, 5,120 validation tokens, ||y_soft - y_top2|| / ||y_top2||: " + ", ".join(lines))
