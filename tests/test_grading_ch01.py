"""Chapter 1 checkers: the reference passes, typical mistakes are caught (stubs: test_grading_scaffold.py)."""

from __future__ import annotations

import math

import pytest
import torch

from moe_course.grading import ch01
from moe_course.grading.core import ERROR, FAIL, PASS
from moe_course.layers import SoftMoE


# ---- Exercise 1.1 ---------------------------------------------------------------------------
def soft_moe_forward(x, gate_weight, experts):
    g = torch.softmax(x @ gate_weight.T, dim=-1)
    return sum(g[:, i : i + 1] * e(x) for i, e in enumerate(experts))


def forward_softmax_over_tokens(x, gate_weight, experts):
    g = torch.softmax(x @ gate_weight.T, dim=0)
    return sum(g[:, i : i + 1] * e(x) for i, e in enumerate(experts))


def forward_no_softmax(x, gate_weight, experts):
    g = x @ gate_weight.T
    return sum(g[:, i : i + 1] * e(x) for i, e in enumerate(experts))


def forward_unweighted(x, gate_weight, experts):
    return sum(e(x) for e in experts)


def forward_naive_exp(x, gate_weight, experts):
    z = (x @ gate_weight.T).exp()
    g = z / z.sum(dim=-1, keepdim=True)
    return sum(g[:, i : i + 1] * e(x) for i, e in enumerate(experts))


def forward_no_transpose(x, gate_weight, experts):
    g = torch.softmax(x @ gate_weight, dim=-1)
    return sum(g[:, i : i + 1] * e(x) for i, e in enumerate(experts))


# ---- Exercise 1.2 ---------------------------------------------------------------------------
def gate_entropy(probs):
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


def entropy_nan_at_zero(probs):
    return -(probs * probs.log()).sum(dim=-1)


def entropy_wrong_axis(probs):
    return -torch.special.xlogy(probs, probs).sum(dim=0)


def entropy_bits(probs):
    return -(torch.special.xlogy(probs, probs) / math.log(2)).sum(dim=-1)


def entropy_no_minus(probs):
    return torch.special.xlogy(probs, probs).sum(dim=-1)


# ---- Exercise 1.3 ---------------------------------------------------------------------------
def soft_moe_params(d_model, d_hidden, num_experts, output_proj=False):
    experts = num_experts * 2 * d_model * d_hidden
    gate = num_experts * d_model
    proj = d_model * d_model + d_model if output_proj else 0
    return experts + gate + proj


def params_no_gate(d_model, d_hidden, num_experts, output_proj=False):
    return soft_moe_params(d_model, d_hidden, num_experts, output_proj) - num_experts * d_model


def params_no_proj_bias(d_model, d_hidden, num_experts, output_proj=False):
    return soft_moe_params(d_model, d_hidden, num_experts, output_proj) - (d_model if output_proj else 0)


def params_expert_biases(d_model, d_hidden, num_experts, output_proj=False):
    return soft_moe_params(d_model, d_hidden, num_experts, output_proj) + num_experts * (d_hidden + d_model)


# ---- Exercise 1.4 ---------------------------------------------------------------------------
def load_experts_into_stack(mlps):
    w_in = torch.stack([m[0].weight.detach().T for m in mlps])
    w_out = torch.stack([m[2].weight.detach().T for m in mlps])
    return w_in, w_out


def load_no_transpose(mlps):
    return torch.stack([m[0].weight.detach() for m in mlps]), torch.stack([m[2].weight.detach() for m in mlps])


def load_swapped(mlps):
    w_in, w_out = load_experts_into_stack(mlps)
    return w_out, w_in


def load_reshape_instead_of_transpose(mlps):
    # Right shape, wrong values: a reshape is not a transpose.
    d, h = mlps[0][0].in_features, mlps[0][0].out_features
    return (torch.stack([m[0].weight.detach().reshape(d, h) for m in mlps]),
            torch.stack([m[2].weight.detach().reshape(h, d) for m in mlps]))


CASES = [
    (ch01.check_soft_moe_forward, soft_moe_forward,
     [forward_softmax_over_tokens, forward_no_softmax, forward_unweighted, forward_naive_exp, forward_no_transpose]),
    (ch01.check_gate_entropy, gate_entropy, [entropy_nan_at_zero, entropy_wrong_axis, entropy_bits, entropy_no_minus]),
    (ch01.check_soft_moe_params, soft_moe_params, [params_no_gate, params_no_proj_bias, params_expert_biases]),
    (ch01.check_load_experts_into_stack, load_experts_into_stack,
     [load_no_transpose, load_swapped, load_reshape_instead_of_transpose]),
]


@pytest.mark.parametrize("check, solution", [(c, s) for c, s, _ in CASES], ids=lambda v: getattr(v, "__name__", ""))
def test_reference_solution_passes(check, solution):
    result = check(solution, quiet=True)
    assert result.status == PASS, result.message


@pytest.mark.parametrize(
    "check, wrong", [(c, w) for c, _, ws in CASES for w in ws], ids=lambda v: getattr(v, "__name__", "")
)
def test_typical_mistakes_are_caught(check, wrong):
    result = check(wrong, quiet=True)
    assert result.status in (FAIL, ERROR), f"{wrong.__name__} was not caught"
    assert result.message


@pytest.mark.parametrize("wrong, phrase", [
    (forward_softmax_over_tokens, "token axis"),
    (forward_no_softmax, "raw logits"),
    (forward_unweighted, "without the gate"),
    (forward_naive_exp, "torch.softmax"),
    (forward_no_transpose, "gate_weight.T"),
])
def test_soft_moe_forward_hints_name_the_mistake(wrong, phrase):
    assert phrase in ch01.check_soft_moe_forward(wrong, quiet=True).message


@pytest.mark.parametrize("wrong, phrase", [
    (entropy_nan_at_zero, "0 * log 0"),
    (entropy_wrong_axis, "expert axis"),
    (entropy_bits, "bits"),
    (entropy_no_minus, "sign"),
])
def test_gate_entropy_hints_name_the_mistake(wrong, phrase):
    assert phrase in ch01.check_gate_entropy(wrong, quiet=True).message


@pytest.mark.parametrize("wrong, phrase", [
    (params_no_gate, "gate is missing"),
    (params_no_proj_bias, "bias is missing"),
    (params_expert_biases, "biases were counted inside the experts"),
])
def test_soft_moe_params_hints_name_the_mistake(wrong, phrase):
    assert phrase in ch01.check_soft_moe_params(wrong, quiet=True).message


@pytest.mark.parametrize("wrong, phrase", [
    (load_no_transpose, "not transposed"),
    (load_swapped, "swapped"),
])
def test_load_experts_hints_name_the_mistake(wrong, phrase):
    assert phrase in ch01.check_load_experts_into_stack(wrong, quiet=True).message


def test_reference_count_matches_the_package():
    layer = SoftMoE(12, 5, 20, output_proj=True)
    assert soft_moe_params(12, 20, 5, True) == sum(p.numel() for p in layer.parameters())


def test_checkers_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ch01.check_soft_moe_forward(soft_moe_forward, quiet=True)
    assert torch.equal(torch.rand(3), expected)


def test_a_non_callable_is_an_error_not_a_crash():
    assert ch01.check_gate_entropy(None, quiet=True).status == ERROR


# ============================================================================================
# The exercises as the notebook asks them now (solutions/01_dense_moe.ipynb); the mutation suite
# (tests/mutants/ch01.py) holds one mutant per mistake class and the hint each must produce.
# ============================================================================================
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def soft_moe_stacked(x, gate_weight, w_in, w_out, w_gate=None):
    g = torch.softmax(x @ gate_weight.T, dim=-1)
    h = torch.einsum("td,ndf->ntf", x, w_in)
    h = F.gelu(h) if w_gate is None else F.silu(torch.einsum("td,ndf->ntf", x, w_gate)) * h
    return torch.einsum("tn,ntd->td", g, torch.einsum("ntf,nfd->ntd", h, w_out))


def stacked_python_loop(x, gate_weight, w_in, w_out, w_gate=None):
    # a weak attempt: the chapter's list version with GELU only (SwiGLU experts come out wrong)
    g = torch.softmax(x @ gate_weight.T, dim=-1)
    return sum(g[:, i:i + 1] * (F.gelu(x @ w_in[i]) @ w_out[i]) for i in range(w_in.shape[0]))


def gate_weight_grad(x, gate_weight, expert_outputs, grad_y):
    g = torch.softmax(x @ gate_weight.T, dim=-1)
    y = torch.einsum("tn,ntd->td", g, expert_outputs)
    return (g * torch.einsum("td,ntd->tn", grad_y, expert_outputs - y)).T @ x


def grad_logits_only(x, gate_weight, expert_outputs, grad_y):
    # the chapter's dL/dz, not chained through z = x W_g
    g = torch.softmax(x @ gate_weight.T, dim=-1)
    y = torch.einsum("tn,ntd->td", g, expert_outputs)
    return g * torch.einsum("td,ntd->tn", grad_y, expert_outputs - y)


def unstack_experts(w_in, w_out):
    out = []
    for wi, wo in zip(w_in, w_out):
        m = nn.Sequential(nn.Linear(*wi.shape, bias=False), nn.GELU(), nn.Linear(*wo.shape, bias=False))
        with torch.no_grad():
            m[0].weight.copy_(wi.T)
            m[2].weight.copy_(wo.T)
        out.append(m)
    return out


def unstack_no_transpose(w_in, w_out):
    # the chapter's copy loop run backwards without thinking about nn.Linear's layout
    out = []
    for wi, wo in zip(w_in, w_out):
        m = nn.Sequential(nn.Linear(*wi.shape, bias=False), nn.GELU(), nn.Linear(*wo.shape, bias=False))
        with torch.no_grad():
            m[0].weight.copy_(wi.reshape(m[0].weight.shape))
            m[2].weight.copy_(wo.reshape(m[2].weight.shape))
        out.append(m)
    return out


def soft_vs_topk_gap(layer, x):
    e = layer.experts
    with torch.no_grad():
        y_soft = soft_moe_stacked(x, layer.router.gate.weight, e.w_in, e.w_out, e.w_gate)
        y_topk = layer(x)
    return float((y_soft - y_topk).norm() / y_topk.norm())


def gap_with_gelu_experts(layer, x):
    # a weak attempt: w_gate forgotten, so the SwiGLU experts are run as GELU experts
    e = layer.experts
    with torch.no_grad():
        y_soft = soft_moe_stacked(x, layer.router.gate.weight, e.w_in, e.w_out)
        y_topk = layer(x)
    return float((y_soft - y_topk).norm() / y_topk.norm())


NEW_CASES = [
    (ch01.check_soft_moe_stacked, soft_moe_stacked, stacked_python_loop, "w_gate is ignored"),
    (ch01.check_gate_weight_grad, gate_weight_grad, grad_logits_only, "gradient of the logits"),
    (ch01.check_unstack_experts, unstack_experts, unstack_no_transpose, "reshape"),
]


@pytest.mark.parametrize("check, good, weak, phrase", NEW_CASES, ids=lambda v: getattr(v, "__name__", ""))
def test_new_exercises_graded_both_ways(check, good, weak, phrase):
    assert check(good, quiet=True).status == PASS
    bad = check(weak, quiet=True)
    assert bad.status == FAIL and phrase in bad.message, bad.message


def test_gate_weight_grad_forbids_autograd():
    def with_autograd(x, gate_weight, expert_outputs, grad_y):
        w = gate_weight.clone().requires_grad_(True)
        with torch.enable_grad():
            y = torch.einsum("tn,ntd->td", torch.softmax(x @ w.T, -1), expert_outputs)
            (y * grad_y).sum().backward()
        return w.grad

    result = ch01.check_gate_weight_grad(with_autograd, quiet=True)
    assert result.status == FAIL and "autograd" in result.message


def test_soft_moe_stacked_forbids_the_package_layer():
    from moe_course.layers import SoftMoE as _SoftMoE

    def via_package(x, gate_weight, w_in, w_out, w_gate=None):
        layer = _SoftMoE(x.shape[1], w_in.shape[0], w_in.shape[2])
        with torch.no_grad():
            layer.router.gate.weight.copy_(gate_weight)
            layer.experts.w_in.copy_(w_in)
            layer.experts.w_out.copy_(w_out)
        return layer(x)

    result = ch01.check_soft_moe_stacked(via_package, quiet=True)
    assert result.status == FAIL and "package's own" in result.message


def test_use_it_on_the_zoo_model_both_ways():
    """The "use it" exercise runs the learner's function on the trained mnist1d-moe model and
    accepts the reference within 1 %; the weak attempt (GELU experts) is caught with its hint."""
    good = ch01.check_soft_vs_topk_gap(soft_vs_topk_gap, quiet=True)
    assert good.status == PASS, good.message
    bad = ch01.check_soft_vs_topk_gap(gap_with_gelu_experts, quiet=True)
    assert bad.status == FAIL and "SwiGLU" in bad.message, bad.message
    model, xs = ch01.real_hidden_states()
    assert len(xs) == len(model.moe_layers()) and all(x.shape[0] == 256 * 20 for x in xs)
