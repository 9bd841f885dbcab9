"""Chapter 1: soft MoE forward, gate entropy, parameter count, stacking nn.Linear experts."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import Chapter

M = Chapter("ch01")


# ------------------------------------------------------------------ 1.1 soft_moe_forward
@M.right("check_soft_moe_forward")
def soft_moe_forward_loop(x, gate_weight, experts):
    """A Python loop over the experts, F.linear for the logits."""
    g = F.softmax(F.linear(x, gate_weight), dim=1)
    y = torch.zeros_like(x)
    for i, expert in enumerate(experts):
        y = y + g[:, i:i + 1] * expert(x)
    return y


@M.wrong("check_soft_moe_forward", "token axis")
def softmax_over_tokens(x, gate_weight, experts):
    """softmax over dim=0 (the tokens)."""
    g = torch.softmax(x @ gate_weight.T, dim=0)
    return sum(g[:, i:i + 1] * e(x) for i, e in enumerate(experts))


@M.wrong("check_soft_moe_forward", "raw logits")
def no_softmax(x, gate_weight, experts):
    """The raw logits weight the experts."""
    g = x @ gate_weight.T
    return sum(g[:, i:i + 1] * e(x) for i, e in enumerate(experts))


@M.wrong("check_soft_moe_forward", "without the gate")
def experts_summed(x, gate_weight, experts):
    """The gate is forgotten: the experts' outputs are added."""
    return sum(e(x) for e in experts)


@M.wrong("check_soft_moe_forward", "equal weights")
def experts_averaged(x, gate_weight, experts):
    """Uniform 1/N weights."""
    return torch.stack([e(x) for e in experts]).mean(0)


@M.wrong("check_soft_moe_forward", "sigmoid")
def sigmoid_gate(x, gate_weight, experts):
    """A sigmoid gate instead of a softmax."""
    g = torch.sigmoid(x @ gate_weight.T)
    return sum(g[:, i:i + 1] * e(x) for i, e in enumerate(experts))


@M.wrong("check_soft_moe_forward", "inf/nan")
def unstable_softmax(x, gate_weight, experts):
    """exp(logits) / sum exp(logits) without subtracting the max."""
    e = (x @ gate_weight.T).exp()
    g = e / e.sum(dim=-1, keepdim=True)
    return sum(g[:, i:i + 1] * ex(x) for i, ex in enumerate(experts))


@M.wrong("check_soft_moe_forward", "shape error")
def gate_not_transposed(x, gate_weight, experts):
    """x @ gate_weight instead of x @ gate_weight.T."""
    g = torch.softmax(x @ gate_weight, dim=-1)
    return sum(g[:, i:i + 1] * e(x) for i, e in enumerate(experts))


@M.wrong("check_soft_moe_forward", "log_softmax")
def log_softmax_gate(x, gate_weight, experts):
    """log_softmax (log-probabilities) as gate values."""
    g = torch.log_softmax(x @ gate_weight.T, dim=-1)
    return sum(g[:, i:i + 1] * e(x) for i, e in enumerate(experts))


# ------------------------------------------------------------------ 1.2 gate_entropy
@M.right("check_gate_entropy")
def gate_entropy_where(probs):
    """0 log 0 handled with torch.where."""
    logp = torch.where(probs > 0, probs.log(), torch.zeros_like(probs))
    return -(probs * logp).sum(dim=-1)


@M.right("check_gate_entropy")
def gate_entropy_entr(probs):
    """torch.special.entr."""
    return torch.special.entr(probs).sum(-1)


@M.wrong("check_gate_entropy", "one value per expert")
def entropy_over_tokens(probs):
    """Summed over the token axis."""
    return -torch.special.xlogy(probs, probs).sum(dim=0)


@M.wrong("check_gate_entropy", "sign is flipped")
def entropy_sign(probs):
    """sum p log p, without the minus."""
    return torch.special.xlogy(probs, probs).sum(dim=-1)


@M.wrong("check_gate_entropy", "bits")
def entropy_bits(probs):
    """log2 instead of the natural log."""
    return -torch.special.xlogy(probs, probs).sum(dim=-1) / math.log(2)


@M.wrong("check_gate_entropy", "normalised by log n")
def entropy_normalised(probs):
    """Divided by log N."""
    return -torch.special.xlogy(probs, probs).sum(dim=-1) / math.log(probs.shape[-1])


@M.wrong("check_gate_entropy", "nan for a gate with exact zeros")
def entropy_nan_on_zeros(probs):
    """p * log p, nan where p = 0."""
    return -(probs * probs.log()).sum(dim=-1)


@M.wrong("check_gate_entropy", "single number")
def entropy_mean_over_tokens(probs):
    """One number: the mean over tokens."""
    return -torch.special.xlogy(probs, probs).sum(dim=-1).mean()


@M.wrong("check_gate_entropy", "[b, t, n]")
def entropy_dim_1(probs):
    """dim=1 hard-coded: right for [T, N], wrong for [B, T, N]."""
    return -torch.special.xlogy(probs, probs).sum(dim=1)


@M.wrong("check_gate_entropy", "averaged over the experts")
def entropy_mean_over_experts(probs):
    """Mean over the experts instead of the sum."""
    return -torch.special.xlogy(probs, probs).mean(dim=-1)


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


# ------------------------------------------------------------------ 1.4 load_experts_into_stack
@M.right("check_load_experts_into_stack")
def stack_then_transpose(mlps):
    """Stack the [out, in] weights, then swap the last two axes."""
    w_in = torch.stack([m[0].weight for m in mlps]).transpose(1, 2).detach().clone()
    w_out = torch.stack([m[2].weight for m in mlps]).transpose(1, 2).detach().clone()
    return w_in, w_out


@M.wrong("check_load_experts_into_stack", "not transposed")
def stack_no_transpose(mlps):
    """nn.Linear's [out, in] weights stacked as they are."""
    return torch.stack([m[0].weight.detach() for m in mlps]), torch.stack([m[2].weight.detach() for m in mlps])


@M.wrong("check_load_experts_into_stack", "swapped")
def stack_swapped(mlps):
    """w_in from the last Linear, w_out from the first."""
    return torch.stack([m[2].weight.detach().T for m in mlps]), torch.stack([m[0].weight.detach().T for m in mlps])


@M.wrong("check_load_experts_into_stack", "reverse order")
def stack_reversed(mlps):
    """The experts in reverse order."""
    return (torch.stack([m[0].weight.detach().T for m in reversed(mlps)]),
            torch.stack([m[2].weight.detach().T for m in reversed(mlps)]))


@M.wrong("check_load_experts_into_stack", "reshape")
def stack_reshaped(mlps):
    """reshape/view instead of a transpose (right shape, scrambled values)."""
    d, h = mlps[0][0].in_features, mlps[0][0].out_features
    return (torch.stack([m[0].weight.detach().reshape(d, h) for m in mlps]),
            torch.stack([m[2].weight.detach().reshape(h, d) for m in mlps]))


@M.wrong("check_load_experts_into_stack", "expected shape")
def stack_on_wrong_axis(mlps):
    """torch.stack(..., dim=1): the expert axis in the middle."""
    return (torch.stack([m[0].weight.detach().T for m in mlps], dim=1),
            torch.stack([m[2].weight.detach().T for m in mlps], dim=1))


@M.wrong("check_load_experts_into_stack", "mlps[i][0].weight.t")
def stack_first_expert_only(mlps):
    """Every slot filled with expert 0."""
    return (torch.stack([mlps[0][0].weight.detach().T for _ in mlps]),
            torch.stack([mlps[0][2].weight.detach().T for _ in mlps]))
