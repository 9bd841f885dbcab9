"""Checkers for chapter 10, μMoE: the backward pass of entmax-1.5 from its closed form (10.1), the
forward pass of a hierarchical CPμMoE with two expert modes (10.2), one sweep of CP alternating
least squares, then run on the expert tensor of the ``shakespeare-moe`` zoo model (10.3, use it),
and a whole method: a μMoE feed-forward trained to replace one MoE layer of that zoo model
(10.4, graded on a size and perplexity target).

Each checker compares the student's function with a reference on hand-made, random and edge cases
and recognises the usual wrong answers (``p`` used where ``s = sqrt(p)`` belongs, the projection
term left out, softmax's Jacobian, the 1 of ``[x; 1]`` forgotten or put first, a sum instead of
the elementwise product, stale factors in the ALS sweep, the Gram matrices left out) so that the
hint names the mistake.
"""

from __future__ import annotations

import copy
import math

import torch

from moe_course.factorized import cp_to_tensor, entmax15

from .core import CheckFailed, checker, describe, expect

__all__ = ["check_entmax15_backward", "check_cp_hier_forward", "check_als_sweep", "check_mumoe_replacement",
           "real_expert_tensor", "als_init", "replacement_setup", "MAX_PARAM_SHARE", "MAX_PPL_INCREASE"]


def _close(a, b, rtol: float = 1e-5, atol: float = 1e-7) -> bool:
    if not (torch.is_tensor(a) and torch.is_tensor(b)):
        return False
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True))


def _diagnose(out, ref, variants, hints: dict[str, str], what: str, otherwise: str,
              not_finite: str | None = None) -> None:
    """Pass if ``out`` matches ``ref``; else name the typical mistake whose output it matches
    (NaN where the mistake gives NaN), else ``not_finite`` for NaN or inf, else ``otherwise``."""
    if _close(out, ref):
        return
    for name, value in variants().items():
        if _close(out, value):
            raise CheckFailed(f"{what}: {hints[name]}")
    if not_finite and not bool(torch.isfinite(out).all()):
        raise CheckFailed(f"{what}: {not_finite}")
    raise CheckFailed(f"{what}: {otherwise}")


# --------------------------------------------------------------------------------------------
# Exercise 10.1: the backward pass of entmax-1.5
# --------------------------------------------------------------------------------------------
def _entmax_grad(z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    z = z.detach().clone().requires_grad_(True)
    p = entmax15(z)
    (p * g).sum().backward()
    return z.grad.detach()


def _backward_variants(p, g):
    s = p.sqrt()

    def proj(u, denom):
        return u * g - u * (u * g).sum(-1, keepdim=True) / denom

    return {
        "p_not_s": lambda: proj(p, p.sum(-1, keepdim=True)),
        "no_projection": lambda: s * g,
        "sum_p": lambda: proj(s, p.sum(-1, keepdim=True)),
        "sign": lambda: -proj(s, s.sum(-1, keepdim=True)),
        "wrong_axis": lambda: s * g - s * (s * g).sum(0, keepdim=True) / s.sum(0, keepdim=True),
    }


_BACKWARD_HINTS = {
    "p_not_s": "you used p where the closed form has s = sqrt(p) (with p, and sum_j p_j = 1, that is softmax's "
               "Jacobian p * (g - p . g)): dp/dz = diag(s) - s s^T / sum_j s_j, since on the support "
               "p_i = (z_i/2 - theta)^2 gives dp_i/dz_i = s_i",
    "no_projection": "you returned s * g only: subtract the projection term s (s . g) / sum_j s_j, which keeps "
                     "the coefficients on the simplex (the constraint sum_i p_i = 1 moves theta)",
    "sum_p": "you divided by sum_j p_j (which is 1): the denominator of the projection is sum_j s_j, the sum of "
             "the SQUARE ROOTS of p",
    "sign": "the sign is flipped: grad_z = s * g - s (s . g) / sum_j s_j",
    "wrong_axis": "you summed over the wrong axis: the sums (s . g and sum_j s_j) run over the LAST axis, the "
                  "experts of one token, not over the tokens",
}


@checker("Exercise 10.1: the backward pass of entmax-1.5")
def check_entmax15_backward(backward_fn) -> None:
    """``entmax15_backward(p, g) -> grad_z`` for ``p = entmax15(z)`` and an upstream gradient ``g``
    (same shape, last axis = experts), against autograd through the package's ``entmax15``."""
    gen = torch.Generator().manual_seed(10)
    cases = [(torch.tensor([[2.0, 1.0, -1.0, 0.5]], dtype=torch.float64), "one token, 4 logits, two of them cut")]
    cases += [(torch.randn(6, 10, generator=gen, dtype=torch.float64) * 2, "6 tokens, 10 experts"),
              (torch.randn(2, 3, 16, generator=gen, dtype=torch.float64) * 3, "shape [2, 3, 16]"),
              (torch.randn(5, generator=gen, dtype=torch.float64), "a single token of shape [5]"),
              (torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64), "equal logits (every expert in)"),
              (torch.tensor([[9.0, 0.0, -3.0]], dtype=torch.float64), "one expert takes all (p = [1, 0, 0])")]
    for z, desc in cases:
        g = torch.randn(z.shape, generator=gen, dtype=torch.float64)
        p = entmax15(z).detach()
        out = backward_fn(p.clone(), g.clone())
        expect(torch.is_tensor(out) and tuple(out.shape) == tuple(z.shape),
               f"return the gradient with respect to z, a tensor of shape {tuple(z.shape)}, got {describe(out)} ({desc})")
        ref = _entmax_grad(z, g)
        _diagnose(out, ref, lambda: {k: f() for k, f in _backward_variants(p, g).items()}, _BACKWARD_HINTS,
                  desc, "your gradient differs from autograd's: grad_z = s * g - s (s . g) / sum_j s_j with "
                        "s = sqrt(p), sums over the last axis",
                  not_finite="your gradient has NaN or inf: outside the support p = 0, so s = sqrt(p) = 0 "
                             "there; only sum_j s_j (> 0) divides")


# --------------------------------------------------------------------------------------------
# Exercise 10.2: the hierarchical CPμMoE forward pass
# --------------------------------------------------------------------------------------------
def _hier_variants(x, a1, a2, U1, U2, U_in, U_out):
    ones = torch.ones(x.shape[0], 1, dtype=x.dtype)
    xb, xf = torch.cat([x, ones], 1), torch.cat([ones, x], 1)
    e1, e2 = a1 @ U1, a2 @ U2
    return {
        "no_ones": lambda: (e1 * e2 * (x @ U_in[:-1])) @ U_out.T,
        "ones_first": lambda: (e1 * e2 * (xf @ U_in)) @ U_out.T,
        "sum": lambda: ((e1 + e2) * (xb @ U_in)) @ U_out.T,
        "one_mode": lambda: (e1 * (xb @ U_in)) @ U_out.T,
        "second_mode_only": lambda: (e2 * (xb @ U_in)) @ U_out.T,
    }


_HIER_HINTS = {
    "no_ones": "you contracted x with U_in[:-1] only: append the constant 1, x_bar = [x; 1], so that the last "
               "row of U_in carries the biases",
    "ones_first": "the constant 1 goes at the END, x_bar = [x; 1]: the last row of U_in is the bias row",
    "sum": "the three projections are multiplied elementwise, (U_1^T a1) * (U_2^T a2) * (U_in^T x_bar), not "
           "added: the output is linear in each of a1, a2 and x_bar",
    "one_mode": "the second expert mode is missing: multiply by (a2 @ U2) too (expert (n1, n2) has the "
                "coefficient a1[n1] * a2[n2])",
    "second_mode_only": "the first expert mode is missing: multiply by (a1 @ U1) too",
}


@checker("Exercise 10.2: the hierarchical CPμMoE forward pass")
def check_cp_hier_forward(forward_fn) -> None:
    """``cp_hier_forward(x, a1, a2, U1, U2, U_in, U_out) -> y`` ``[T, O]``: two expert modes,
    ``y = U_out ((U1^T a1) * (U2^T a2) * (U_in^T [x; 1]))``, against the unfactorised tensor."""
    gen = torch.Generator().manual_seed(102)
    for T, I, O, N1, N2, R in ((5, 3, 2, 2, 3, 4), (16, 8, 6, 4, 5, 7), (1, 4, 9, 3, 3, 2)):
        x = torch.randn(T, I, generator=gen, dtype=torch.float64)
        a1 = torch.softmax(torch.randn(T, N1, generator=gen, dtype=torch.float64), -1)
        a2 = torch.softmax(torch.randn(T, N2, generator=gen, dtype=torch.float64), -1)
        U1, U2 = (torch.randn(n, R, generator=gen, dtype=torch.float64) for n in (N1, N2))
        U_in = torch.randn(I + 1, R, generator=gen, dtype=torch.float64)
        U_out = torch.randn(O, R, generator=gen, dtype=torch.float64)
        desc = f"T={T}, I={I}, O={O}, N1={N1}, N2={N2}, R={R}"
        out = forward_fn(x.clone(), a1.clone(), a2.clone(), U1.clone(), U2.clone(), U_in.clone(), U_out.clone())
        expect(torch.is_tensor(out) and tuple(out.shape) == (T, O),
               f"return y of shape [T, O] = {(T, O)}, got {describe(out)} ({desc})")
        W = cp_to_tensor([U1, U2, U_in, U_out])  # [N1, N2, I+1, O], built for the check only
        xb = torch.cat([x, torch.ones(T, 1, dtype=x.dtype)], 1)
        ref = torch.einsum("tn,tm,ti,nmio->to", a1, a2, xb, W)
        _diagnose(out, ref, lambda: {k: f() for k, f in _hier_variants(x, a1, a2, U1, U2, U_in, U_out).items()},
                  _HIER_HINTS, desc, "y differs from W x_1 a1 x_2 a2 x_3 [x; 1]: compute "
                  "((a1 @ U1) * (a2 @ U2) * (x_bar @ U_in)) @ U_out.T")


# --------------------------------------------------------------------------------------------
# Exercise 10.3 (use it): one sweep of CP-ALS, then on a real expert tensor
# --------------------------------------------------------------------------------------------
def _mttkrp(x: torch.Tensor, factors, m: int) -> torch.Tensor:
    """X_(m) times the Khatri-Rao product of the other factors, ``[I_m, R]`` (no unfolding built)."""
    letters = "abcdefgh"[: x.dim()]
    ins = [letters] + [letters[k] + "r" for k in range(x.dim()) if k != m]
    ops = [x] + [factors[k] for k in range(x.dim()) if k != m]
    return torch.einsum(",".join(ins) + "->" + letters[m] + "r", *ops)


def _sweep(x, factors, *, gram=True, fresh=True):
    old = [f.clone() for f in factors]
    new = [f.clone() for f in factors]
    for m in range(x.dim()):
        src = new if fresh else old
        rhs = _mttkrp(x, src, m)
        if gram:
            G = torch.ones(rhs.shape[1], rhs.shape[1], dtype=x.dtype)
            for k in range(x.dim()):
                if k != m:
                    G = G * (src[k].T @ src[k])
            new[m] = rhs @ torch.linalg.pinv(G)
        else:
            new[m] = rhs
    return new


def als_init(x: torch.Tensor, rank: int, seed: int = 0) -> list[torch.Tensor]:
    """The package's initialisation (leading left singular vectors of each unfolding, random columns
    where the rank exceeds a dimension), float64."""
    x = x.detach().double()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for m in range(x.dim()):
        u = torch.linalg.svd(x.movedim(m, 0).reshape(x.shape[m], -1), full_matrices=False).U[:, :rank]
        if u.shape[1] < rank:
            extra = torch.randn(x.shape[m], rank - u.shape[1], generator=gen, dtype=torch.float64)
            u = torch.cat([u, extra / math.sqrt(x.shape[m])], dim=1)
        out.append(u)
    return out


_ALS_HINTS = {
    "stale": "each factor must be solved with the LATEST others: update U^(0), then use the new U^(0) when you "
             "solve for U^(1), and so on (you used the factors as they were at the start of the sweep)",
    "no_gram": "you left out the Gram term: U^(m) = X_(m) (Khatri-Rao of the others) (Hadamard product of "
               "U^(k)T U^(k), k != m)^+; without the pseudo-inverse it is not a least-squares solution",
}


def _as_factors(out, n, desc):
    expect(isinstance(out, (list, tuple)) and len(out) == n and all(torch.is_tensor(f) for f in out),
           f"return the {n} updated factors (a list of tensors), got {describe(out)} ({desc})")
    return [f.detach().double() for f in out]


_REAL: dict = {}
REAL_RANK, REAL_SWEEPS = 16, 25


def real_expert_tensor() -> torch.Tensor:
    """``w_in`` of layer 0 of the ``shakespeare-moe`` zoo model: 8 experts x 96 inputs x 64 hidden."""
    if "w" not in _REAL:
        from moe_course import zoo
        from moe_course.layers import moe_layers
        lm = zoo.pretrained("shakespeare-moe", progress=False).cpu().eval()
        _REAL["w"] = moe_layers(lm)[0].experts.w_in.detach().double().clone()
    return _REAL["w"].clone()


def _rel_error(x, factors) -> float:
    return float((x - cp_to_tensor(factors)).norm() / x.norm())


@checker("Exercise 10.3 (use it): one sweep of CP alternating least squares", timeout=180)
def check_als_sweep(sweep_fn) -> None:
    """``als_sweep(X, factors) -> new factors``: one ALS sweep over the modes in order, each factor
    the least-squares solution with the latest others; then 25 sweeps on layer 0's ``w_in`` of
    shakespeare-moe at rank 16 from :func:`als_init` (relative error printed, tolerance 1e-6)."""
    gen = torch.Generator().manual_seed(103)
    for shape, R in (((3, 4, 5), 2), ((6, 5, 4), 3), ((2, 7, 3, 4), 3)):
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        init = [torch.randn(n, R, generator=gen, dtype=torch.float64) for n in shape]
        desc = f"a random tensor of shape {shape}, rank {R}"
        got = _as_factors(sweep_fn(x.clone(), [f.clone() for f in init]), len(shape), desc)
        ref = _sweep(x, init)
        for m, (a, b) in enumerate(zip(got, ref)):
            expect(tuple(a.shape) == tuple(b.shape), f"factor {m} must have shape {tuple(b.shape)}, got "
                                                     f"{tuple(a.shape)} ({desc})")
        if all(_close(a, b, rtol=1e-6, atol=1e-8) for a, b in zip(got, ref)):
            continue
        for name, opts in (("stale", dict(fresh=False)), ("no_gram", dict(gram=False))):
            v = _sweep(x, init, **opts)
            if all(_close(a, b, rtol=1e-6, atol=1e-8) for a, b in zip(got, v)):
                raise CheckFailed(f"{_ALS_HINTS[name]} ({desc})")
        if any(_close(a, b, rtol=0, atol=0) for a, b in zip(got[1:], init[1:])):
            raise CheckFailed(f"you did not update every mode: one sweep solves for EVERY factor once, in order "
                              f"U^(0), U^(1), ... ({desc})")
        if _close(got[0], ref[0], rtol=1e-6, atol=1e-8):
            raise CheckFailed(f"factor 0 is right but a later one is not: for mode m, multiply the mode-m "
                              f"unfolding by the Khatri-Rao product of the OTHER factors in the same order as the "
                              f"unfolding's columns (or use einsum, as the chapter's formula reads) ({desc})")
        raise CheckFailed(f"the updated factors differ from the ALS update U^(m) = X_(m) (Khatri-Rao of the others) "
                          f"(Hadamard of the Grams)^+ ({desc})")
    x = torch.randn(4, 5, 6, generator=gen, dtype=torch.float64)
    before = _rel_error(x, init3 := [torch.randn(n, 3, generator=gen, dtype=torch.float64) for n in (4, 5, 6)])
    after = _rel_error(x, _as_factors(sweep_fn(x, [f.clone() for f in init3]), 3, "a sweep"))
    expect(after <= before + 1e-12, "one ALS sweep never increases the error, yours did")
    w = real_expert_tensor()
    factors, ref = als_init(w, REAL_RANK), als_init(w, REAL_RANK)
    for _ in range(REAL_SWEEPS):
        factors = _as_factors(sweep_fn(w, factors), 3, "the real tensor")
        ref = _sweep(w, ref)
    err, err_ref = _rel_error(w, factors), _rel_error(w, ref)
    expect(abs(err - err_ref) <= 1e-6, f"on shakespeare-moe's layer 0 w_in your {REAL_SWEEPS} sweeps reach a "
                                       f"relative error of {err:.6f}, the reference {err_ref:.6f}")
    size = sum(f.numel() for f in factors)
    print(f"shakespeare-moe layer 0 w_in {tuple(w.shape)}, CP rank {REAL_RANK}, {REAL_SWEEPS} sweeps of your "
          f"als_sweep: relative error {err:.4f} with {size:,} numbers instead of {w.numel():,} "
          f"({size / w.numel():.2f} of the size)")


# --------------------------------------------------------------------------------------------
# Exercise 10.4 (a whole method): a μMoE feed-forward replaces one MoE layer of the zoo LM
# --------------------------------------------------------------------------------------------
MAX_PARAM_SHARE = 0.25   # of the replaced layer's expert parameters
MAX_PPL_INCREASE = 2.0   # percent, validation perplexity of the whole model
REPLACED_LAYER = 3       # the last MoE layer of shakespeare-moe
_REP: dict = {}


def replacement_setup():
    """``(model, layer_index, calibration, validation)`` for exercise 10.4: the ``shakespeare-moe``
    zoo model, the MoE layer to replace (the last one), 256 TRAINING blocks to fit on and the
    validation split that grades."""
    if not _REP:
        from moe_course import zoo
        d = zoo.data("shakespeare-moe")
        _REP["model"] = zoo.pretrained("shakespeare-moe", progress=False).cpu().eval()
        _REP["calib"] = d["train"].shuffle(seed=0).select(range(256))
        _REP["val"] = d["validation"]
    return _REP["model"], REPLACED_LAYER, _REP["calib"], _REP["val"]


def _ppl(model, val) -> float:
    from moe_course.train import evaluate
    return float(evaluate(model, val, batch_size=256)["perplexity"])


@checker("Exercise 10.4 (a whole method): a μMoE layer replaces an MoE layer", timeout=1200, check_mutation=False)
def check_mumoe_replacement(replace_fn) -> None:
    """``replace_with_mumoe(model, layer_index, calib) -> new model`` whose MoE layer ``layer_index``
    is a feed-forward with at most a quarter of that layer's expert parameters, and whose validation
    perplexity is at most 2 % above the original's; the input model must stay as it was."""
    from moe_course.layers import SparseMoE, moe_layers

    pristine, li, calib, val = replacement_setup()
    model = copy.deepcopy(pristine)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = replace_fn(model, li, calib)
    expect(isinstance(out, torch.nn.Module), f"return the new model (an nn.Module), got {describe(out)}")
    after = model.state_dict()
    changed = [k for k in before if k not in after or not torch.equal(before[k], after[k])]
    expect(out is not model and not changed,
           "your function modified the input model" + (f" ({changed[0]})" if changed else "") +
           ": work on copy.deepcopy(model) and leave the original as it is")
    old_blocks, new_blocks = list(pristine.blocks), list(getattr(out, "blocks", []))
    expect(len(new_blocks) == len(old_blocks), "the new model must keep every block; replace only the "
                                               "feed-forward (blocks[i].ffn) of the chosen MoE layer")
    target = moe_layers(pristine)[li]
    idx = next(i for i, b in enumerate(old_blocks) if b.ffn is target)
    new_ffn = new_blocks[idx].ffn
    expect(not isinstance(new_ffn, SparseMoE),
           f"blocks[{idx}].ffn is still a sparse MoE layer: replace it by your μMoE feed-forward")
    budget = sum(p.numel() for p in target.experts.parameters())
    n = sum(p.numel() for p in new_ffn.parameters()) + sum(b.numel() for b in new_ffn.buffers())
    ppl0, ppl = _ppl(pristine, val), _ppl(out.eval(), val)
    rise = 100 * (ppl / ppl0 - 1)
    summary = (f"layer {li} (block {idx}): {n:,} parameters instead of {budget:,} expert parameters "
               f"({n / budget:.2f}); validation perplexity {ppl0:.4f} -> {ppl:.4f} ({rise:+.2f}%)")
    print("shakespeare-moe, your replace_with_mumoe: " + summary)
    expect(n <= MAX_PARAM_SHARE * budget, f"the new feed-forward is too large: at most {MAX_PARAM_SHARE:.0%} of "
                                          f"the replaced layer's expert parameters ({summary})")
    if rise > MAX_PPL_INCREASE:
        from moe_course.compress.trimming import Skipped
        dropped = copy.deepcopy(pristine)
        dropped.blocks[idx].ffn = Skipped()
        rise_drop = 100 * (_ppl(dropped, val) / ppl0 - 1)
        if rise >= rise_drop - 0.05:
            raise CheckFailed(
                f"perplexity rises by {rise:.2f}%, no better than dropping the layer altogether "
                f"({rise_drop:+.2f}%): your feed-forward looks untrained or wired wrongly; fit it to the MoE layer's "
                f"OUTPUTS on the layer's own inputs (moe_course.calib.layer_inputs gives them), with the block's "
                f"residual and norm left outside it ({summary})")
        raise CheckFailed(
            f"perplexity rises by {rise:.2f}% (at most {MAX_PPL_INCREASE:g}%; dropping the layer costs "
            f"{rise_drop:+.2f}%): fit longer or on more calibration tokens, or use the whole parameter budget for "
            f"the rank; make sure you fit the layer's output (not the block's) ({summary})")
