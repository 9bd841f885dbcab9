"""Chapter 1: the soft MoE on stacked tensors, the gate matrix's gradient by hand, the parameter count,
unstacking experts into nn.Linear modules, the trained top-2 model run as a soft MoE."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import Chapter

M = Chapter("ch01")


# ------------------------------------------------------------------ 1.3 soft_moe_params
@M.right("check_soft_moe_params")
def params_per_expert(d_model, d_hidden, num_experts, output_proj=False):
    """Per expert (two matrices plus its gate row), then the projection."""
    per_expert = d_model * d_hidden + d_hidden * d_model + d_model
    return num_experts * per_expert + (d_model * (d_model + 1) if output_proj else 0)


@M.wrong("check_soft_moe_params", "gate is missing")
def params_no_gate(d_model, d_hidden, num_experts, output_proj=False):
    """The gate is not counted."""
    return num_experts * 2 * d_model * d_hidden + (d_model * d_model + d_model if output_proj else 0)


@M.wrong("check_soft_moe_params", "bias is missing")
def params_proj_no_bias(d_model, d_hidden, num_experts, output_proj=False):
    """The projection without its bias."""
    return num_experts * 2 * d_model * d_hidden + num_experts * d_model + (d_model * d_model if output_proj else 0)


@M.wrong("check_soft_moe_params", "counted although output_proj=false")
def params_always_proj(d_model, d_hidden, num_experts, output_proj=False):
    """The projection is always counted."""
    return num_experts * 2 * d_model * d_hidden + num_experts * d_model + d_model * d_model + d_model


@M.wrong("check_soft_moe_params", "biases were counted inside the experts")
def params_expert_biases(d_model, d_hidden, num_experts, output_proj=False):
    """Expert biases (the package's experts have none)."""
    experts = num_experts * (2 * d_model * d_hidden + d_hidden + d_model)
    return experts + num_experts * d_model + (d_model * d_model + d_model if output_proj else 0)


@M.wrong("check_soft_moe_params", "bias was counted in the gate")
def params_gate_bias(d_model, d_hidden, num_experts, output_proj=False):
    """A bias in the gate."""
    return num_experts * 2 * d_model * d_hidden + num_experts * (d_model + 1) + (d_model * d_model + d_model if output_proj else 0)


@M.wrong("check_soft_moe_params", "one of the two expert matrices is missing")
def params_one_matrix(d_model, d_hidden, num_experts, output_proj=False):
    """One matrix per expert."""
    return num_experts * d_model * d_hidden + num_experts * d_model + (d_model * d_model + d_model if output_proj else 0)


@M.wrong("check_soft_moe_params", "only one expert")
def params_one_expert(d_model, d_hidden, num_experts, output_proj=False):
    """A single expert counted."""
    return 2 * d_model * d_hidden + num_experts * d_model + (d_model * d_model + d_model if output_proj else 0)


# ================================================================== the exercises as asked now
def _mix(x, gate_weight, outs, dim=-1):
    return torch.einsum("tn,ntd->td", torch.softmax(x @ gate_weight.T, dim=dim), outs)


def _outs(x, w_in, w_out, w_gate=None, act=F.gelu):
    h = torch.einsum("td,ndf->ntf", x, w_in)
    h = act(h) if w_gate is None else F.silu(torch.einsum("td,ndf->ntf", x, w_gate)) * h
    return torch.einsum("ntf,nfd->ntd", h, w_out)


# ------------------------------------------------------------------ 1.1 soft_moe_stacked
@M.right("check_soft_moe_stacked")
def stacked_bmm(x, gate_weight, w_in, w_out, w_gate=None):
    """torch.matmul broadcasting over the expert axis, F.linear for the logits."""
    g = F.softmax(F.linear(x, gate_weight), dim=1)
    h = torch.matmul(x.unsqueeze(0), w_in)
    h = F.gelu(h) if w_gate is None else F.silu(torch.matmul(x.unsqueeze(0), w_gate)) * h
    outs = torch.matmul(h, w_out)
    return (g.T.unsqueeze(-1) * outs).sum(0)


@M.wrong("check_soft_moe_stacked", "token axis")
def stacked_softmax_tokens(x, gate_weight, w_in, w_out, w_gate=None):
    """softmax over dim=0 (the tokens)."""
    return _mix(x, gate_weight, _outs(x, w_in, w_out, w_gate), dim=0)


@M.wrong("check_soft_moe_stacked", "raw logits")
def stacked_no_softmax(x, gate_weight, w_in, w_out, w_gate=None):
    """The raw logits weight the experts."""
    return torch.einsum("tn,ntd->td", x @ gate_weight.T, _outs(x, w_in, w_out, w_gate))


@M.wrong("check_soft_moe_stacked", "equal weights")
def stacked_mean(x, gate_weight, w_in, w_out, w_gate=None):
    """The experts averaged, gate ignored."""
    return _outs(x, w_in, w_out, w_gate).mean(0)


@M.wrong("check_soft_moe_stacked", "relu")
def stacked_relu(x, gate_weight, w_in, w_out, w_gate=None):
    """ReLU instead of GELU."""
    return _mix(x, gate_weight, _outs(x, w_in, w_out, w_gate, act=torch.relu))


@M.wrong("check_soft_moe_stacked", "tanh approximation")
def stacked_gelu_tanh(x, gate_weight, w_in, w_out, w_gate=None):
    """GELU with approximate='tanh'."""
    return _mix(x, gate_weight, _outs(x, w_in, w_out, w_gate, act=lambda h: F.gelu(h, approximate="tanh")))


@M.wrong("check_soft_moe_stacked", "w_gate is ignored")
def stacked_ignores_w_gate(x, gate_weight, w_in, w_out, w_gate=None):
    """Always GELU, even for SwiGLU experts."""
    return _mix(x, gate_weight, _outs(x, w_in, w_out, None))


@M.wrong("check_soft_moe_stacked", "branches are swapped")
def stacked_swiglu_swapped(x, gate_weight, w_in, w_out, w_gate=None):
    """silu on the w_in branch."""
    if w_gate is None:
        return _mix(x, gate_weight, _outs(x, w_in, w_out))
    return _mix(x, gate_weight, _outs(x, w_gate, w_out, w_in))


@M.wrong("check_soft_moe_stacked", "shape error")
def stacked_transposed_w_in(x, gate_weight, w_in, w_out, w_gate=None):
    """nn.Linear habits: x @ w_in[i].T."""
    return _mix(x, gate_weight, _outs(x, w_in.transpose(1, 2), w_out.transpose(1, 2),
                                      None if w_gate is None else w_gate.transpose(1, 2)))


@M.wrong("check_soft_moe_stacked", "SoftMoE")
def stacked_calls_package(x, gate_weight, w_in, w_out, w_gate=None):
    """Builds a package SoftMoE and copies the weights in (forbidden)."""
    from moe_course.layers import SoftMoE
    layer = SoftMoE(x.shape[1], w_in.shape[0], w_in.shape[2])
    with torch.no_grad():
        layer.router.gate.weight.copy_(gate_weight)
        layer.experts.w_in.copy_(w_in)
        layer.experts.w_out.copy_(w_out)
    return layer(x)


@M.wrong("check_soft_moe_stacked", "differentiably")
def stacked_detached(x, gate_weight, w_in, w_out, w_gate=None):
    """Computed under torch.no_grad()."""
    with torch.no_grad():
        return _mix(x, gate_weight, _outs(x, w_in, w_out, w_gate))


# ------------------------------------------------------------------ 1.2 gate_weight_grad
def _dz(x, gate_weight, outs, grad_y):
    g = torch.softmax(x @ gate_weight.T, dim=-1)
    y = torch.einsum("tn,ntd->td", g, outs)
    return g, y, g * torch.einsum("td,ntd->tn", grad_y, outs - y)


@M.right("check_gate_weight_grad")
def grad_by_loops(x, gate_weight, expert_outputs, grad_y):
    """Per token and expert with Python loops, outer products summed."""
    T, d = x.shape
    N = gate_weight.shape[0]
    g = torch.softmax(x @ gate_weight.T, dim=-1)
    out = torch.zeros(N, d, dtype=x.dtype)
    for t in range(T):
        y = sum(g[t, i] * expert_outputs[i, t] for i in range(N))
        for j in range(N):
            out[j] += g[t, j] * torch.dot(grad_y[t], expert_outputs[j, t] - y) * x[t]
    return out


@M.wrong("check_gate_weight_grad", "'- y' is missing")
def grad_no_minus_y(x, gate_weight, expert_outputs, grad_y):
    """<dL/dy, E_j> without subtracting the mix."""
    g = torch.softmax(x @ gate_weight.T, dim=-1)
    return (g * torch.einsum("td,ntd->tn", grad_y, expert_outputs)).T @ x


@M.wrong("check_gate_weight_grad", "factor g_j is missing")
def grad_no_g(x, gate_weight, expert_outputs, grad_y):
    """The softmax Jacobian's g_j factor forgotten."""
    g, y, _ = _dz(x, gate_weight, expert_outputs, grad_y)
    return torch.einsum("td,ntd->tn", grad_y, expert_outputs - y).T @ x


@M.wrong("check_gate_weight_grad", "sign is flipped")
def grad_negated(x, gate_weight, expert_outputs, grad_y):
    """The descent direction instead of the gradient."""
    return -(_dz(x, gate_weight, expert_outputs, grad_y)[2].T @ x)


@M.wrong("check_gate_weight_grad", "averaged over the tokens")
def grad_mean(x, gate_weight, expert_outputs, grad_y):
    """Divided by T."""
    return _dz(x, gate_weight, expert_outputs, grad_y)[2].T @ x / x.shape[0]


@M.wrong("check_gate_weight_grad", "gradient of the logits")
def grad_of_logits(x, gate_weight, expert_outputs, grad_y):
    """Returns dL/dz [T, N] (no chain rule through z = x W_g^T)."""
    return _dz(x, gate_weight, expert_outputs, grad_y)[2]


@M.wrong("check_gate_weight_grad", "shape [d, n]")
def grad_transposed(x, gate_weight, expert_outputs, grad_y):
    """x.T @ dL/dz: [d, N]."""
    return x.T @ _dz(x, gate_weight, expert_outputs, grad_y)[2]


@M.wrong("check_gate_weight_grad", "plain average")
def grad_mean_not_mix(x, gate_weight, expert_outputs, grad_y):
    """y taken as the unweighted mean of the experts."""
    g = torch.softmax(x @ gate_weight.T, dim=-1)
    return (g * torch.einsum("td,ntd->tn", grad_y, expert_outputs - expert_outputs.mean(0))).T @ x


@M.wrong("check_gate_weight_grad", "autograd")
def grad_autograd(x, gate_weight, expert_outputs, grad_y):
    """torch.autograd.grad (forbidden: derive it)."""
    w = gate_weight.clone().requires_grad_(True)
    with torch.enable_grad():
        y = torch.einsum("tn,ntd->td", torch.softmax(x @ w.T, -1), expert_outputs)
        return torch.autograd.grad((y * grad_y).sum(), w)[0]


# ------------------------------------------------------------------ 1.4 unstack_experts
def _unstack(w_in, w_out, t=True, bias=False, act=torch.nn.GELU, swap=False, order=None):
    import torch.nn as nn
    N, d, f = w_in.shape
    out = []
    for i in (order if order is not None else range(N)):
        a, b = (w_out[i], w_in[i]) if swap else (w_in[i], w_out[i])
        m = nn.Sequential(nn.Linear(a.shape[0], a.shape[1], bias=bias), act(),
                          nn.Linear(b.shape[0], b.shape[1], bias=bias))
        with torch.no_grad():
            m[0].weight.copy_(a.T if t else a.reshape(a.shape[1], a.shape[0]))
            m[2].weight.copy_(b.T if t else b.reshape(b.shape[1], b.shape[0]))
        out.append(m)
    return out


@M.right("check_unstack_experts")
def unstack_parameters(w_in, w_out):
    """nn.Parameter of transposed copies, ModuleList returned."""
    import torch.nn as nn
    mlps = nn.ModuleList()
    for wi, wo in zip(w_in, w_out):
        m = nn.Sequential(nn.Linear(wi.shape[0], wi.shape[1], bias=False), nn.GELU(),
                          nn.Linear(wo.shape[0], wo.shape[1], bias=False))
        m[0].weight = nn.Parameter(wi.t().contiguous().clone())
        m[2].weight = nn.Parameter(wo.t().contiguous().clone())
        mlps.append(m)
    return mlps


@M.wrong("check_unstack_experts", "reshape")
def unstack_reshape(w_in, w_out):
    """reshape instead of a transpose."""
    return _unstack(w_in, w_out, t=False)


@M.wrong("check_unstack_experts", "no biases")
def unstack_with_bias(w_in, w_out):
    """nn.Linear with its default bias."""
    return _unstack(w_in, w_out, bias=True)


@M.wrong("check_unstack_experts", "relu")
def unstack_relu(w_in, w_out):
    """nn.ReLU as the hidden nonlinearity."""
    return _unstack(w_in, w_out, act=torch.nn.ReLU)


@M.wrong("check_unstack_experts", "swapped")
def unstack_swapped(w_in, w_out):
    """The first Linear built from w_out."""
    return _unstack(w_in, w_out, swap=True)


@M.wrong("check_unstack_experts", "keep the order")
def unstack_reversed(w_in, w_out):
    """The experts in reverse order."""
    return _unstack(w_in, w_out, order=range(w_in.shape[0] - 1, -1, -1))


@M.wrong("check_unstack_experts", "expected 3 experts", "got 4")
def unstack_off_by_one(w_in, w_out):
    """One expert too many (range(N + 1) with the last repeated)."""
    out = _unstack(w_in, w_out)
    return out + out[-1:]


# ------------------------------------------------------------------ 1.5 soft_vs_topk_gap (use it)
def _gap_parts(layer, x, w_gate=True):
    e = layer.experts
    with torch.no_grad():
        y_soft = _mix(x, layer.router.gate.weight, _outs(x, e.w_in, e.w_out, e.w_gate if w_gate else None))
        y_topk = layer(x)
    return y_soft, y_topk


@M.right("check_soft_vs_topk_gap")
def gap_via_forward_sum(layer, x):
    """Squared norms summed by hand, a tensor returned."""
    y_soft, y_topk = _gap_parts(layer, x)
    return ((y_soft - y_topk).pow(2).sum() / y_topk.pow(2).sum()).sqrt()


@M.wrong("check_soft_vs_topk_gap", "percentage")
def gap_percent(layer, x):
    """100 x the ratio."""
    y_soft, y_topk = _gap_parts(layer, x)
    return 100 * float((y_soft - y_topk).norm() / y_topk.norm())


@M.wrong("check_soft_vs_topk_gap", "soft output's norm")
def gap_over_soft(layer, x):
    """Relative to the soft output."""
    y_soft, y_topk = _gap_parts(layer, x)
    return float((y_soft - y_topk).norm() / y_soft.norm())


@M.wrong("check_soft_vs_topk_gap", "not relative")
def gap_absolute(layer, x):
    """The absolute norm of the difference."""
    y_soft, y_topk = _gap_parts(layer, x)
    return float((y_soft - y_topk).norm())


@M.wrong("check_soft_vs_topk_gap", "per-token ratios")
def gap_per_token(layer, x):
    """The mean of per-token relative differences."""
    y_soft, y_topk = _gap_parts(layer, x)
    return float(((y_soft - y_topk).norm(dim=1) / y_topk.norm(dim=1)).mean())


@M.wrong("check_soft_vs_topk_gap", "swiglu")
def gap_gelu(layer, x):
    """w_gate not passed: GELU experts instead of the model's SwiGLU."""
    y_soft, y_topk = _gap_parts(layer, x, w_gate=False)
    return float((y_soft - y_topk).norm() / y_topk.norm())


@M.wrong("check_soft_vs_topk_gap", "package's own")
def gap_package(layer, x):
    """Runs the experts with the package's Experts.forward_all (forbidden)."""
    with torch.no_grad():
        g = torch.softmax(x @ layer.router.gate.weight.T, -1)
        y_soft = torch.einsum("tn,ntd->td", g, layer.experts.forward_all(x))
        y_topk = layer(x)
    return float((y_soft - y_topk).norm() / y_topk.norm())
