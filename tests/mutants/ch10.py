"""Chapter 10: the backward pass of entmax-1.5, the hierarchical CPμMoE forward, one CP-ALS sweep
(then on a real expert tensor), and a μMoE feed-forward that replaces one MoE layer of the zoo LM."""

from __future__ import annotations

import copy

import torch

from moe_course.calib import layer_inputs
from moe_course.factorized import MuMoEBlock
from moe_course.layers import moe_layers

from . import Chapter

M = Chapter("ch10")


# ------------------------------------------------------------------ 10.1 entmax15_backward
@M.right("check_entmax15_backward")
def backward_via_jacobian(p, g):
    """Builds the N x N Jacobian and multiplies (correct, only slower)."""
    s = p.sqrt()
    jac = torch.diag_embed(s) - s[..., :, None] * s[..., None, :] / s.sum(-1)[..., None, None]
    return (jac.transpose(-1, -2) @ g[..., None])[..., 0]


def _proj(u, g, denom):
    return u * g - u * (u * g).sum(-1, keepdim=True) / denom


@M.wrong("check_entmax15_backward", "sqrt")
def backward_p_not_s(p, g):
    """Uses p where s = sqrt(p) belongs."""
    return _proj(p, g, p.sum(-1, keepdim=True))


@M.wrong("check_entmax15_backward", "projection")
def backward_diagonal_only(p, g):
    """Only the diagonal term s * g."""
    return p.sqrt() * g


@M.wrong("check_entmax15_backward", "sum_j s_j")
def backward_divides_by_sum_p(p, g):
    """Divides by sum p (= 1) instead of sum s."""
    return _proj(p.sqrt(), g, p.sum(-1, keepdim=True))


@M.wrong("check_entmax15_backward", "softmax")
def backward_softmax_jacobian(p, g):
    """Softmax's backward."""
    return p * (g - (p * g).sum(-1, keepdim=True))


@M.wrong("check_entmax15_backward", "sign")
def backward_sign_flipped(p, g):
    """The whole gradient negated."""
    return -_proj(p.sqrt(), g, p.sqrt().sum(-1, keepdim=True))


@M.wrong("check_entmax15_backward", "wrong axis")
def backward_sums_over_tokens(p, g):
    """Sums over the first axis (tokens) instead of the experts."""
    s = p.sqrt()
    return s * g - s * (s * g).sum(0, keepdim=True) / s.sum(0, keepdim=True)


# ------------------------------------------------------------------ 10.2 cp_hier_forward
def _ones(x):
    return torch.ones(x.shape[0], 1, dtype=x.dtype)


@M.right("check_cp_hier_forward")
def hier_via_outer_coefficients(x, a1, a2, U1, U2, U_in, U_out):
    """Flattens the two modes into N1 N2 experts with outer-product coefficients and a
    Khatri-Rao expert factor (correct, larger intermediates)."""
    a = (a1[:, :, None] * a2[:, None, :]).reshape(x.shape[0], -1)
    U = (U1[:, None, :] * U2[None, :, :]).reshape(-1, U1.shape[1])
    return ((a @ U) * (torch.cat([x, _ones(x)], 1) @ U_in)) @ U_out.T


@M.wrong("check_cp_hier_forward", "[x; 1]")
def hier_no_bias_row(x, a1, a2, U1, U2, U_in, U_out):
    """Drops the appended 1 (and the bias row)."""
    return ((a1 @ U1) * (a2 @ U2) * (x @ U_in[:-1])) @ U_out.T


@M.wrong("check_cp_hier_forward", "at the END")
def hier_one_prepended(x, a1, a2, U1, U2, U_in, U_out):
    """Prepends the 1 instead of appending it."""
    return ((a1 @ U1) * (a2 @ U2) * (torch.cat([_ones(x), x], 1) @ U_in)) @ U_out.T


@M.wrong("check_cp_hier_forward", "elementwise")
def hier_sum_of_modes(x, a1, a2, U1, U2, U_in, U_out):
    """Adds the two expert projections."""
    return (((a1 @ U1) + (a2 @ U2)) * (torch.cat([x, _ones(x)], 1) @ U_in)) @ U_out.T


@M.wrong("check_cp_hier_forward", "second expert mode")
def hier_first_mode_only(x, a1, a2, U1, U2, U_in, U_out):
    """Forgets the second mode."""
    return ((a1 @ U1) * (torch.cat([x, _ones(x)], 1) @ U_in)) @ U_out.T


@M.wrong("check_cp_hier_forward", "first expert mode")
def hier_second_mode_only(x, a1, a2, U1, U2, U_in, U_out):
    """Forgets the first mode."""
    return ((a2 @ U2) * (torch.cat([x, _ones(x)], 1) @ U_in)) @ U_out.T


# ------------------------------------------------------------------ 10.3 als_sweep
def _rhs(X, factors, m):
    letters = "abcdefgh"[: X.dim()]
    others = [k for k in range(X.dim()) if k != m]
    spec = ",".join([letters] + [letters[k] + "r" for k in others]) + f"->{letters[m]}r"
    return torch.einsum(spec, X, *[factors[k] for k in others])


def _gram(factors, m):
    G = torch.ones(factors[0].shape[1], factors[0].shape[1], dtype=factors[0].dtype)
    for k, f in enumerate(factors):
        if k != m:
            G = G * (f.T @ f)
    return G


@M.right("check_als_sweep")
def sweep_with_unfoldings(X, factors):
    """Explicit unfolding and Khatri-Rao product, lstsq instead of pinv."""
    factors = [f.clone() for f in factors]
    for m in range(X.dim()):
        unfold = X.movedim(m, 0).reshape(X.shape[m], -1)
        others = [factors[k] for k in range(X.dim()) if k != m]
        kr = others[0]
        for f in others[1:]:
            kr = (kr[:, None, :] * f[None, :, :]).reshape(-1, kr.shape[1])
        factors[m] = torch.linalg.lstsq(_gram(factors, m), (unfold @ kr).T).solution.T
    return factors


@M.wrong("check_als_sweep", "LATEST")
def sweep_stale_factors(X, factors):
    """Solves every mode with the factors of the start of the sweep (Jacobi, not Gauss-Seidel)."""
    old = [f.clone() for f in factors]
    return [_rhs(X, old, m) @ torch.linalg.pinv(_gram(old, m)) for m in range(X.dim())]


@M.wrong("check_als_sweep", "Gram")
def sweep_without_gram(X, factors):
    """Leaves out the pseudo-inverse of the Hadamard product of the Grams."""
    factors = [f.clone() for f in factors]
    for m in range(X.dim()):
        factors[m] = _rhs(X, factors, m)
    return factors


@M.wrong("check_als_sweep", "Khatri-Rao")
def sweep_reversed_khatri_rao(X, factors):
    """Khatri-Rao product of the other factors in the reverse order of the unfolding's columns."""
    factors = [f.clone() for f in factors]
    for m in range(X.dim()):
        unfold = X.movedim(m, 0).reshape(X.shape[m], -1)
        others = [factors[k] for k in range(X.dim()) if k != m][::-1]
        kr = others[0]
        for f in others[1:]:
            kr = (kr[:, None, :] * f[None, :, :]).reshape(-1, kr.shape[1])
        factors[m] = (unfold @ kr) @ torch.linalg.pinv(_gram(factors, m))
    return factors


@M.wrong("check_als_sweep", "factors")
def sweep_returns_reconstruction(X, factors):
    """Returns the reconstructed tensor instead of the factors."""
    from moe_course.factorized import cp_to_tensor
    return cp_to_tensor([f.clone() for f in factors])


@M.wrong("check_als_sweep", "every mode")
def sweep_first_mode_only(X, factors):
    """Updates only the first factor."""
    factors = [f.clone() for f in factors]
    factors[0] = _rhs(X, factors, 0) @ torch.linalg.pinv(_gram(factors, 0))
    return factors


# ------------------------------------------------------------------ 10.4 replace_with_mumoe
def _fit(model, layer_index, calib, rank, steps, copy_model=True):
    torch.manual_seed(0)
    out = copy.deepcopy(model) if copy_model else model
    layer = moe_layers(out)[layer_index]
    x = layer_inputs(model, calib)[layer_index]
    with torch.no_grad():
        y = layer(x)
    block = MuMoEBlock(layer.experts.d_model, layer.experts.d_hidden, 64, "cp", rank=rank)
    opt = torch.optim.Adam(block.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (512,))
        loss = (block(x[idx]) - y[idx]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    next(b for b in out.blocks if b.ffn is layer).ffn = block.eval()
    return out


@M.right("check_mumoe_replacement")
def replace_rank_48(model, layer_index, calib):
    """A CPμMoE block at rank 48 (19 % of the expert parameters), 400 Adam steps."""
    return _fit(model, layer_index, calib, 48, 400)


@M.wrong("check_mumoe_replacement", "untrained")
def replace_untrained(model, layer_index, calib):
    """Swaps in a fresh, untrained block."""
    return _fit(model, layer_index, calib, 48, 0)


@M.wrong("check_mumoe_replacement", "too large")
def replace_too_large(model, layer_index, calib):
    """Rank 96: a third of the expert parameters."""
    return _fit(model, layer_index, calib, 96, 20)


@M.wrong("check_mumoe_replacement", "modified the input model")
def replace_in_place(model, layer_index, calib):
    """Replaces the layer of the INPUT model."""
    return _fit(model, layer_index, calib, 48, 400, copy_model=False)


@M.wrong("check_mumoe_replacement", "still a sparse MoE")
def replace_nothing(model, layer_index, calib):
    """Returns a copy with the MoE layer still in place."""
    return copy.deepcopy(model)


@M.wrong("check_mumoe_replacement", "perplexity rises")
def replace_barely_trained(model, layer_index, calib):
    """Only 15 Adam steps."""
    return _fit(model, layer_index, calib, 48, 15)


@M.wrong("check_mumoe_replacement", "nn.Module")
def replace_returns_the_block(model, layer_index, calib):
    """Returns the fitted feed-forward instead of the model."""
    out = _fit(model, layer_index, calib, 48, 5)
    return out.blocks[-1].ffn.state_dict()
