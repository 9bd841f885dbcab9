"""Chapter 10: entmax-1.5, CP and TR μMoE forward passes, CP rank for a budget."""

from __future__ import annotations

import math

import torch

from . import Chapter

M = Chapter("ch10")


# ------------------------------------------------------------------ 10.1 entmax15
def _entmax(z, *, halve=True, shift=True, clamp_sqrt=True, clamp_out=True, detach_tau=False, dim=-1,
            descending=True):
    z = z.transpose(dim, -1) if dim != -1 else z
    if shift:
        z = z - z.max(dim=-1, keepdim=True).values
    if halve:
        z = z / 2
    zs = z.sort(dim=-1, descending=descending).values
    k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    mean = zs.cumsum(-1) / k
    mean_sq = (zs ** 2).cumsum(-1) / k
    inner = (1 - k * (mean_sq - mean ** 2)) / k
    tau = mean - (inner.clamp(min=0) if clamp_sqrt else inner).sqrt()
    support = (tau <= zs).sum(dim=-1, keepdim=True)
    t = tau.gather(-1, (support - 1).clamp(min=0))
    if detach_tau:
        t = t.detach()
    d = z - t
    out = (d.clamp(min=0) if clamp_out else d) ** 2
    return out.transpose(dim, -1) if dim != -1 else out


@M.right("check_entmax15")
def entmax_support_mask(z):
    """Support as a boolean mask; tau recomputed from the support's mean and variance."""
    z = (z - z.amax(-1, keepdim=True)) / 2
    zs, _ = torch.sort(z, dim=-1, descending=True)
    k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    mean = zs.cumsum(-1) / k
    var = (zs ** 2).cumsum(-1) / k - mean ** 2
    tau = mean - torch.sqrt(torch.relu((1 - k * var) / k))
    in_support = tau <= zs
    size = in_support.sum(-1, keepdim=True)
    tau_star = torch.gather(tau, -1, size - 1)
    return torch.relu(z - tau_star) ** 2


@M.wrong("check_entmax15", "softmax")
def entmax_is_softmax(z):
    """softmax."""
    return torch.softmax(z, -1)


@M.wrong("check_entmax15", "halve the logits")
def entmax_not_halved(z):
    """z not halved."""
    return _entmax(z, halve=False)


@M.wrong("check_entmax15", "sparsemax")
def entmax_sparsemax(z):
    """sparsemax: p = [z - tau]_+ with the linear threshold."""
    zs = z.sort(dim=-1, descending=True).values
    k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    tau = (zs.cumsum(-1) - 1) / k
    support = (zs > tau).sum(-1, keepdim=True)
    return (z - tau.gather(-1, support - 1)).clamp(min=0)


@M.wrong("check_entmax15", "wrong axis")
def entmax_over_tokens(z):
    """Normalised over dim=0."""
    return _entmax(z, dim=0)


@M.wrong("check_entmax15", "around 1000")
def entmax_no_shift(z):
    """No max subtraction (float32 cancellation for large logits)."""
    return _entmax(z, shift=False)


@M.wrong("check_entmax15", "gradient")
def entmax_detached_tau(z):
    """tau detached."""
    return _entmax(z, detach_tau=True)


@M.wrong("check_entmax15", "clamp")
def entmax_no_clamp(z):
    """(z/2 - tau) ** 2 without clamping negatives at 0."""
    return _entmax(z, clamp_out=False)


@M.wrong("check_entmax15", "gradient")
def entmax_unclamped_sqrt(z):
    """sqrt of a negative for k outside the support: nan that only shows in the gradient."""
    return _entmax(z, clamp_sqrt=False)


@M.wrong("check_entmax15", "sort")
def entmax_ascending_sort(z):
    """Sorted ascending."""
    return _entmax(z, descending=False)


# ------------------------------------------------------------------ 10.2 cp_mumoe_forward
def _zbar(z, first=False):
    ones = torch.ones(z.shape[0], 1, dtype=z.dtype)
    return torch.cat([ones, z] if first else [z, ones], dim=1)


@M.right("check_cp_mumoe_forward")
def cp_einsum(z, a, U_exp, U_in, U_out):
    """einsum per factor; the bias row added separately."""
    e = torch.einsum("tn,nr->tr", a, U_exp)
    x = torch.einsum("ti,ir->tr", z, U_in[:-1]) + U_in[-1]
    return torch.einsum("tr,or->to", e * x, U_out)


@M.wrong("check_cp_mumoe_forward", "bias is missing")
def cp_no_bias(z, a, U_exp, U_in, U_out):
    """The bias row dropped."""
    return ((a @ U_exp) * (z @ U_in[:-1])) @ U_out.T


@M.wrong("check_cp_mumoe_forward", "wrong end")
def cp_bias_first(z, a, U_exp, U_in, U_out):
    """The 1 prepended."""
    return ((a @ U_exp) * (_zbar(z, first=True) @ U_in)) @ U_out.T


@M.wrong("check_cp_mumoe_forward", "elementwise product")
def cp_sum(z, a, U_exp, U_in, U_out):
    """The two R-vectors added."""
    return ((a @ U_exp) + (_zbar(z) @ U_in)) @ U_out.T


@M.wrong("check_cp_mumoe_forward", "expert coefficients are ignored")
def cp_no_experts(z, a, U_exp, U_in, U_out):
    """a ignored."""
    return (_zbar(z) @ U_in) @ U_out.T


@M.wrong("check_cp_mumoe_forward", "materialise")
def cp_builds_w(z, a, U_exp, U_in, U_out):
    """Builds W[n, i, o] and contracts it."""
    w = torch.einsum("nr,ir,or->nio", U_exp, U_in, U_out)
    return torch.einsum("tn,ti,nio->to", a, _zbar(z), w)


@M.wrong("check_cp_mumoe_forward", "gradient")
def cp_detached(z, a, U_exp, U_in, U_out):
    """Computed under no_grad."""
    with torch.no_grad():
        return ((a @ U_exp) * (_zbar(z) @ U_in)) @ U_out.T


@M.wrong("check_cp_mumoe_forward", "u_out")
def cp_u_out_untransposed(z, a, U_exp, U_in, U_out):
    """U_out used as [R, O] through a reshape instead of a transpose."""
    return ((a @ U_exp) * (_zbar(z) @ U_in)) @ U_out.reshape(U_out.shape[1], U_out.shape[0])


# ------------------------------------------------------------------ 10.3 tr_mumoe_forward
def _tr(z, a, G1, G2, G3, *, bias="last", order="ab", close="coa"):
    zb = z if bias is None else _zbar(z, first=(bias == "first"))
    g2 = G2[:, :-1] if bias is None else G2
    A = torch.einsum("tn,anb->tab", a, G1)
    B = torch.einsum("ti,bic->tbc", zb, g2)
    Mx = torch.bmm(A, B) if order == "ab" else torch.bmm(B, A).transpose(1, 2)
    return torch.einsum(f"tac,{close}->to", Mx, G3)


@M.right("check_tr_mumoe_forward")
def tr_trace(z, a, G1, G2, G3):
    """y_o = trace(A B G3[:, o, :]) per token, through einsum over the ring."""
    zb = _zbar(z)
    A = torch.einsum("tn,anb->tab", a, G1)
    B = torch.einsum("ti,bic->tbc", zb, G2)
    return torch.einsum("tab,tbc,coa->to", A, B, G3)


@M.wrong("check_tr_mumoe_forward", "bias is missing")
def tr_no_bias(z, a, G1, G2, G3):
    """The bias slice dropped."""
    return _tr(z, a, G1, G2, G3, bias=None)


@M.wrong("check_tr_mumoe_forward", "wrong end")
def tr_bias_first(z, a, G1, G2, G3):
    """The 1 prepended."""
    return _tr(z, a, G1, G2, G3, bias="first")


@M.wrong("check_tr_mumoe_forward", "wrong way round")
def tr_ring_transposed(z, a, G1, G2, G3):
    """G3 contracted as G3[a, o, c]."""
    return _tr(z, a, G1, G2, G3, close="aoc")


@M.wrong("check_tr_mumoe_forward", "a_n g1")
def tr_unweighted_experts(z, a, G1, G2, G3):
    """A = sum_n G1[:, n, :] (the expert coefficients a forgotten)."""
    zb = _zbar(z)
    A = G1.sum(1).expand(z.shape[0], -1, -1)
    B = torch.einsum("ti,bic->tbc", zb, G2)
    return torch.einsum("tac,coa->to", torch.bmm(A, B), G3)


@M.wrong("check_tr_mumoe_forward", "materialise")
def tr_builds_w(z, a, G1, G2, G3):
    """Builds W[n, i, o] = trace(G1 G2 G3) and contracts it."""
    w = torch.einsum("anb,bic,coa->nio", G1, G2, G3)
    return torch.einsum("tn,ti,nio->to", a, _zbar(z), w)


@M.wrong("check_tr_mumoe_forward", "gradient")
def tr_detached(z, a, G1, G2, G3):
    """Computed under no_grad."""
    with torch.no_grad():
        return _tr(z, a, G1, G2, G3)


# ------------------------------------------------------------------ 10.4 cp_rank_for_budget
def _per_rank(d, h, n, bias=1):
    return (n + d + bias + h) + (n + h + bias + d)


@M.right("check_cp_rank_for_budget")
def rank_by_search(budget, d_model, d_hidden, num_experts):
    """Counts up while the next rank still fits."""
    gate, per = d_model * num_experts, _per_rank(d_model, d_hidden, num_experts)
    r = 0
    while gate + (r + 1) * per <= budget:
        r += 1
    if r < 1:
        raise ValueError(f"budget {budget} too small")
    return r


def _ok(r, budget):
    if r < 1:
        raise ValueError(f"budget {budget} too small")
    return int(r)


@M.wrong("check_cp_rank_for_budget", "gate is not counted")
def rank_no_gate(budget, d_model, d_hidden, num_experts):
    """The gate forgotten."""
    return _ok(budget // _per_rank(d_model, d_hidden, num_experts), budget)


@M.wrong("check_cp_rank_for_budget", "bias rows are missing")
def rank_no_bias(budget, d_model, d_hidden, num_experts):
    """No bias rows."""
    return _ok((budget - d_model * num_experts) // _per_rank(d_model, d_hidden, num_experts, bias=0), budget)


@M.wrong("check_cp_rank_for_budget", "rounded up")
def rank_ceil(budget, d_model, d_hidden, num_experts):
    """Rounded up."""
    return _ok(math.ceil((budget - d_model * num_experts) / _per_rank(d_model, d_hidden, num_experts)), budget)


@M.wrong("check_cp_rank_for_budget", "two layers")
def rank_one_layer(budget, d_model, d_hidden, num_experts):
    """One layer's factors only."""
    return _ok((budget - d_model * num_experts) // (num_experts + d_model + 1 + d_hidden), budget)


@M.wrong("check_cp_rank_for_budget", "share one gate")
def rank_gate_twice(budget, d_model, d_hidden, num_experts):
    """A gate per layer."""
    return _ok((budget - 2 * d_model * num_experts) // _per_rank(d_model, d_hidden, num_experts), budget)


@M.wrong("check_cp_rank_for_budget", "exactly")
def rank_strictly_below(budget, d_model, d_hidden, num_experts):
    """Strictly under the budget (a block of exactly `budget` parameters is rejected)."""
    gate, per = d_model * num_experts, _per_rank(d_model, d_hidden, num_experts)
    return _ok(math.ceil((budget - gate) / per) - 1, budget)


@M.wrong("check_cp_rank_for_budget", "rank 1")
def rank_raises_at_one(budget, d_model, d_hidden, num_experts):
    """Raises when the rank is <= 1 (rank 1 is a valid answer)."""
    r = (budget - d_model * num_experts) // _per_rank(d_model, d_hidden, num_experts)
    if r <= 1:
        raise ValueError(f"budget {budget} too small")
    return int(r)


@M.wrong("check_cp_rank_for_budget", "valueerror")
def rank_returns_zero(budget, d_model, d_hidden, num_experts):
    """Returns 0 (or less) instead of raising."""
    return max((budget - d_model * num_experts) // _per_rank(d_model, d_hidden, num_experts), 0)


@M.wrong("check_cp_rank_for_budget", "python int")
def rank_float(budget, d_model, d_hidden, num_experts):
    """floor of a float division, kept as a float."""
    return _ok(float((budget - d_model * num_experts) // _per_rank(d_model, d_hidden, num_experts)), budget) * 1.0


@M.wrong("check_cp_rank_for_budget", "d_hidden")
def rank_square_layers(budget, d_model, d_hidden, num_experts):
    """Both layers counted as d_model -> d_model (d_hidden ignored)."""
    return _ok((budget - d_model * num_experts) // _per_rank(d_model, d_model, num_experts), budget)
