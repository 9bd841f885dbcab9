"""Checkers for chapter 7, low-rank experts and weight sharing.

* 7.1 ``shared_base_factors``: the shared base plus low-rank deltas of section 7.4, written from its
  formula for a whole stack of experts (the chapter calls the package's ``share_experts``);
* 7.2 (use it) ``global_ranks``: one parameter budget spread over every expert matrix by singular
  value per parameter; the check runs it on the ``shakespeare-moe`` zoo model and compares the
  perplexity with a uniform rank;
* 7.3 (whole method) ``activation_aware_factors``: low-rank experts at least 2.4x smaller whose
  perplexity stays within 7 % of the original (the plain SVD of section 7.3 loses about 14 %).

Each checker compares with a reference written here and recognises the usual wrong answers so that
the hint names the mistake.
"""

from __future__ import annotations

import copy

import torch

from .core import CheckFailed, checker, describe, expect

__all__ = ["check_shared_base_factors", "check_global_ranks", "check_activation_aware_factors"]

NAMES = ("w_in", "w_gate", "w_out")


# --------------------------------------------------------------------------------------------
# Exercise 7.1: shared base + low-rank deltas
# --------------------------------------------------------------------------------------------
def _stack(n: int, m: int, k: int, seed: int, common: float = 1.0) -> torch.Tensor:
    """``n`` matrices ``[m, k]`` = a common part + private parts with distinct singular values."""
    g = torch.Generator().manual_seed(seed)
    base = common * torch.randn(m, k, generator=g)
    out = []
    for _ in range(n):
        u, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
        q = min(m, k)
        s = torch.linspace(3.0, 0.2, q, dtype=torch.float64) ** 2 * (1 + torch.rand(1, generator=g).item())
        out.append(base.double() + (u[:, :q] * s) @ v[:, :q].T)
    return torch.stack(out).float()


def _svd_parts(d: torch.Tensor, r: int):
    u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
    return u, s, vh


def _shared_ref(w: torch.Tensor, r: int, center=True, axis=0, smallest=False, split=True):
    base = w.double().mean(axis) if center else torch.zeros_like(w[0], dtype=torch.float64)
    d = w.double() - base if axis == 0 else w.double()
    u, s, vh = _svd_parts(d, r)
    sl = slice(s.shape[-1] - r, None) if smallest else slice(0, r)
    u, s, vh = u[..., :, sl], s[..., sl], vh[..., sl, :]
    if split:
        return base, u * s.sqrt().unsqueeze(-2), s.sqrt().unsqueeze(-1) * vh
    return base, u * s.unsqueeze(-2), vh


@checker("Exercise 7.1: shared base + low-rank deltas for a stack of experts")
def check_shared_base_factors(shared_base_factors) -> None:
    cases = [(_stack(3, 6, 4, 0), 2), (_stack(4, 12, 8, 1), 3), (_stack(2, 8, 10, 2, common=3.0), 1),
             (_stack(5, 6, 6, 3), 6), (_stack(3, 5, 4, 4), 0)]
    for w, r in cases:
        n, m, k = w.shape
        desc = f"(w of shape {tuple(w.shape)} = [N, m, n], rank={r})"
        out = shared_base_factors(w.clone(), r)
        if not (isinstance(out, (tuple, list)) and len(out) == 3 and all(torch.is_tensor(t) for t in out)):
            raise CheckFailed(f"return three tensors (base, L, R), got {describe(out)} {desc}")
        base, left, right = out
        ref_b, ref_l, ref_r = _shared_ref(w, r)
        if tuple(base.shape) != (m, k):
            raise CheckFailed(f"base must have shape [m, n] = {(m, k)}, got {tuple(base.shape)}: it is the mean of "
                              f"the N experts, w.mean(dim=0), one matrix for the whole layer {desc}")
        if not torch.allclose(base.double(), ref_b, atol=1e-4):
            if torch.allclose(base.double(), w.double().sum(0), atol=1e-4):
                raise CheckFailed(f"base is the MEAN of the experts (sum / N), not their sum {desc}")
            if r > 0 and torch.allclose(base.double(), torch.zeros_like(ref_b), atol=1e-6):
                raise CheckFailed(f"base is zero: it must be the mean of the experts, w.mean(dim=0) {desc}")
            raise CheckFailed(f"base must be the mean of the N experts, w.mean(dim=0) (max |diff| = "
                              f"{float((base.double() - ref_b).abs().max()):.3g}) {desc}")
        if (tuple(left.shape), tuple(right.shape)) != ((n, m, r), (n, r, k)):
            raise CheckFailed(f"L must have shape [N, m, r] = {(n, m, r)} and R [N, r, n] = {(n, r, k)}, got "
                              f"{tuple(left.shape)} and {tuple(right.shape)}" + (
                                  " (rank 0 keeps no delta: L is [N, m, 0] and R [N, 0, n], e.g. slicing u[..., :0])"
                                  if r == 0 else ": Vh = V^T already has the rows you need, R = S^(1/2) Vh[:r]")
                              + f" {desc}")
        if r == 0:
            continue
        prod, ref = left.double() @ right.double(), ref_l @ ref_r
        if not torch.allclose(prod, ref, atol=1e-4, rtol=1e-4):
            _, raw_l, raw_r = _shared_ref(w, r, center=False)
            if torch.allclose(prod, raw_l @ raw_r, atol=1e-4):
                raise CheckFailed(f"you factored the experts themselves: the deltas are the truncated SVD of "
                                  f"w[i] - base (subtract the mean first), so that base + L[i] @ R[i] approximates "
                                  f"w[i] {desc}")
            if torch.allclose(prod + base.double(), raw_l @ raw_r, atol=1e-4):
                raise CheckFailed(f"base + L @ R is the rank-r SVD of w[i], not base + the SVD of the delta: factor "
                                  f"w[i] - base {desc}")
            _, sm_l, sm_r = _shared_ref(w, r, smallest=True)
            if torch.allclose(prod, sm_l @ sm_r, atol=1e-4):
                raise CheckFailed(f"you kept the r SMALLEST singular values of each delta: torch.linalg.svd returns "
                                  f"them in descending order, keep the first r {desc}")
            u, s, vh = _svd_parts(w.double() - ref_b, r)
            if torch.allclose(prod, (u[..., :r] * s[..., :r].square().unsqueeze(-2)) @ vh[..., :r, :], atol=1e-4):
                raise CheckFailed(f"Sigma is applied twice: L[i] @ R[i] gives U S^2 V^T; each factor carries the "
                                  f"SQUARE ROOT of the singular values {desc}")
            raise CheckFailed(f"L[i] @ R[i] must be the best rank-{r} approximation of w[i] - base (Eckart-Young); "
                              f"max |diff| = {float((prod - ref).abs().max()):.3g} {desc}")
        ln = left.double().flatten(1).norm(dim=1)
        rn = right.double().flatten(1).norm(dim=1)
        if not torch.allclose(ln, rn, rtol=1e-3):
            raise CheckFailed(f"L[i] @ R[i] is right, but Sigma is not split: each factor carries S^(1/2), "
                              f"L[i] = U_r S_r^(1/2), R[i] = S_r^(1/2) Vh[:r], so ||L[i]||_F = ||R[i]||_F {desc}")


# --------------------------------------------------------------------------------------------
# Exercise 7.2 (use it): one global budget of parameters over every expert matrix
# --------------------------------------------------------------------------------------------
def _global_ref(spectra, shapes, budget, *, per_param=True, normalise=False, ascending=False, skip=False,
                overshoot=False) -> list[int]:
    scores, costs, owner = [], [], []
    for i, (s, (m, n)) in enumerate(zip(spectra, shapes)):
        e = s.double().square()
        if normalise:
            e = e / e.sum()
        sc = e / (m + n) if per_param else e
        scores.append(sc)
        costs.append(torch.full_like(sc, float(m + n)))
        owner.append(torch.full(sc.shape, i, dtype=torch.long))
    sc, cost, own = torch.cat(scores), torch.cat(costs), torch.cat(owner)
    order = torch.sort(sc, descending=not ascending, stable=True).indices
    ranks, used = [0] * len(spectra), 0.0
    for j in order.tolist():
        c = float(cost[j])
        if used + c > budget:
            if overshoot:
                ranks[int(own[j])] += 1
                break
            if skip:
                continue
            break
        used += c
        ranks[int(own[j])] += 1
    return ranks


def _spectra_cases():
    g = torch.Generator().manual_seed(7)
    out = []
    # shapes differ: energy per parameter and energy alone disagree
    for n_mat, budget in ((3, 60), (5, 300), (8, 900)):
        spectra, shapes = [], []
        for _ in range(n_mat):
            m, n = int(torch.randint(3, 12, (1,), generator=g)), int(torch.randint(3, 12, (1,), generator=g))
            s = torch.sort(torch.rand(min(m, n), generator=g) * (1 + 4 * torch.rand(1, generator=g)),
                           descending=True).values
            spectra.append(s)
            shapes.append((m, n))
        out.append((spectra, shapes, budget))
    # one matrix much larger than the others, and a budget that cannot buy one rank
    out.append(([torch.tensor([10.0, 1.0]), torch.tensor([2.0, 1.5])], [(40, 40), (2, 2)], 20))
    out.append(([torch.tensor([1.0])], [(5, 5)], 3))
    # the second rank of the big matrix does not fit; cheaper ones would (stop, do not skip)
    out.append(([torch.tensor([10.0, 3.0]), torch.tensor([1.0, 0.9])], [(10, 10), (2, 2)], 26))
    # hand case: two matrices of the same shape [2, 2] (cost 4 per rank)
    out.append(([torch.tensor([4.0, 1.0]), torch.tensor([3.0, 2.0])], [(2, 2), (2, 2)], 12))
    return out


def _as_ranks(out, n: int, desc: str) -> list[int]:
    if torch.is_tensor(out):
        out = out.tolist()
    if not isinstance(out, (list, tuple)) or len(out) != n:
        raise CheckFailed(f"return one rank per matrix (a list of {n} ints), got {describe(out)} {desc}")
    ranks = []
    for r in out:
        if isinstance(r, float) and r.is_integer():
            r = int(r)
        if not isinstance(r, int) or isinstance(r, bool):
            raise CheckFailed(f"each rank must be an int, got {r!r} {desc}")
        ranks.append(r)
    return ranks


AVG_RANKS = (8, 16)
PPL_TOLERANCE = 0.01
_ZOO: dict = {}


def zoo_model():
    """The ``shakespeare-moe`` zoo model, 32 validation blocks and 64 training blocks for calibration."""
    if not _ZOO:
        from moe_course import zoo
        _ZOO["lm"] = zoo.pretrained("shakespeare-moe", progress=False).cpu().eval()
        data = zoo.data("shakespeare-moe")
        _ZOO["val"] = data["validation"].select(range(32))
        _ZOO["calib"] = data["train"].select(range(64))
    return _ZOO["lm"], _ZOO["val"], _ZOO["calib"]


def _perplexity(model, val) -> float:
    from moe_course.train import evaluate
    return float(evaluate(model, val, batch_size=128)["perplexity"])


def _expert_stacks(model):
    from moe_course.layers import moe_layers
    return [(li, name, getattr(layer.experts, name)) for li, layer in enumerate(moe_layers(model))
            for name in NAMES if getattr(layer.experts, name) is not None]


def _with_ranks(model, ranks: list[int]):
    """A copy of ``model`` whose expert matrices are replaced by their truncated SVD at ``ranks``
    (one per matrix, in the order layer, w_in/w_gate/w_out, expert)."""
    m = copy.deepcopy(model)
    it = iter(ranks)
    with torch.no_grad():
        for _, _, w in _expert_stacks(m):
            for e in range(w.shape[0]):
                r = next(it)
                u, s, vh = torch.linalg.svd(w[e].double(), full_matrices=False)
                w[e].copy_(((u[:, :r] * s[:r]) @ vh[:r]).float())
    return m


def zoo_spectra(model):
    spectra, shapes = [], []
    for _, _, w in _expert_stacks(model):
        for e in range(w.shape[0]):
            spectra.append(torch.linalg.svdvals(w[e].detach().double()).float())
            shapes.append(tuple(w.shape[1:]))
    return spectra, shapes


@checker("Exercise 7.2: one global rank budget over every expert matrix", timeout=600)
def check_global_ranks(global_ranks) -> None:
    hints = {
        "normalise": "you ranked each matrix's energy FRACTION (sigma^2 / sum of its sigma^2): compare absolute "
                     "sigma^2 across matrices, the squared Frobenius error they remove",
        "per_param": "you ranked singular values by sigma^2 alone: a rank of a bigger matrix costs more "
                     "parameters, so rank by energy PER PARAMETER, sigma^2 / (m + n)",
        "ascending": "you took the SMALLEST singular values first: take them in decreasing order of "
                     "sigma^2 / (m + n)",
        "skip": "you skipped a singular value that did not fit and went on with cheaper ones: stop at the first "
                "one that does not fit",
    }
    variants = {"normalise": dict(normalise=True), "per_param": dict(per_param=False),
                "ascending": dict(ascending=True), "skip": dict(skip=True)}
    candidates, first = None, None
    for spectra, shapes, budget in _spectra_cases():
        desc = (f"({len(spectra)} matrices of shapes {shapes[:4]}{'...' if len(shapes) > 4 else ''}, "
                f"budget={budget} parameters)")
        out = _as_ranks(global_ranks([s.clone() for s in spectra], list(shapes), budget), len(spectra), desc)
        ref = _global_ref(spectra, shapes, budget)
        if out == ref:
            continue
        cost = sum(r * (m + n) for r, (m, n) in zip(out, shapes))
        if any(r > s.numel() for r, s in zip(out, spectra)):
            raise CheckFailed(f"a rank exceeds the number of singular values of its matrix: rank r_i <= "
                              f"min(m_i, n_i) {desc}")
        if cost > budget:
            raise CheckFailed(f"your ranks cost {cost} parameters, over the budget of {budget}: a rank of a "
                              f"[m, n] matrix costs m + n parameters, and the total must stay within the budget "
                              f"(stop at the first singular value that does not fit) {desc}")
        matches = {k for k, kw in variants.items() if out == _global_ref(spectra, shapes, budget, **kw)}
        candidates = matches if candidates is None else candidates & matches
        if first is None:
            first = (ref, out, desc)
    if first is not None:
        ref, out, desc = first
        if candidates:
            raise CheckFailed(f"{hints[sorted(candidates, key=list(hints).index)[0]]} {desc}")
        raise CheckFailed(f"expected ranks {ref}, got {out}: take singular values in decreasing order of "
                          f"sigma^2 / (m + n) while the total cost sum r_i (m_i + n_i) stays within the budget "
                          f"{desc}")
    pristine, val, _ = zoo_model()
    spectra, shapes = zoo_spectra(pristine)
    per_rank = shapes[0][0] + shapes[0][1]
    if "fp32" not in _ZOO:
        _ZOO["fp32"] = _perplexity(pristine, val)
    lines = [f"fp32 {_ZOO['fp32']:.3f}"]
    for avg in AVG_RANKS:
        budget = avg * per_rank * len(spectra)
        desc = f"(shakespeare-moe, {len(spectra)} expert matrices, budget = average rank {avg})"
        out = _as_ranks(global_ranks([s.clone() for s in spectra], list(shapes), budget), len(spectra), desc)
        ref = _global_ref(spectra, shapes, budget)
        got = _perplexity(_with_ranks(pristine, out), val)
        if out != ref:
            want = _perplexity(_with_ranks(pristine, ref), val)
            expect(abs(got - want) <= PPL_TOLERANCE,
                   f"with your ranks the perplexity is {got:.3f}, with the reference's {want:.3f} {desc}")
        if ("uniform", avg) not in _ZOO:
            _ZOO["uniform", avg] = _perplexity(_with_ranks(pristine, [avg] * len(spectra)), val)
        uniform = _ZOO["uniform", avg]
        lines.append(f"average rank {avg}: yours {got:.3f}, uniform rank {avg} {uniform:.3f}")
    print("shakespeare-moe, 32 validation blocks, perplexity: " + "; ".join(lines))


# --------------------------------------------------------------------------------------------
# Exercise 7.3 (whole method): activation-aware low-rank experts, >= 2.4x smaller, <= +7 % perplexity
# --------------------------------------------------------------------------------------------
MIN_SMALLER = 2.4
MAX_PPL_INCREASE = 0.07


def _count_and_build(model, factors, desc: str):
    """Validate ``factors`` ({(layer, name): [(L, R) per expert]}), return (factor params, model copy)."""
    stacks = _expert_stacks(model)
    if not isinstance(factors, dict):
        raise CheckFailed(f"return a dict {{(layer, name): [(L, R) for each expert]}}, got {describe(factors)}")
    want = {(li, name) for li, name, _ in stacks}
    missing = sorted(want - set(factors))
    if missing:
        raise CheckFailed(f"the dict has no entry for {missing[0]} ({len(missing)} of {len(want)} missing): give "
                          f"factors for every expert matrix, keys (layer index, name) with name in {NAMES}")
    m = copy.deepcopy(model)
    params = 0
    with torch.no_grad():
        for li, name, w in _expert_stacks(m):
            pairs = factors[(li, name)]
            if not isinstance(pairs, (list, tuple)) or len(pairs) != w.shape[0]:
                raise CheckFailed(f"factors[{(li, name)}] must be a list of {w.shape[0]} pairs (L, R), one per "
                                  f"expert, got {describe(pairs)}")
            for e, pair in enumerate(pairs):
                if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(torch.is_tensor(t) for t in pair)):
                    raise CheckFailed(f"factors[{(li, name)}][{e}] must be a pair of tensors (L, R), got "
                                      f"{describe(pair)}")
                left, right = pair
                shape = tuple(w.shape[1:])
                if left.dim() != 2 or right.dim() != 2 or left.shape[0] != shape[0] or right.shape[1] != shape[1] \
                        or left.shape[1] != right.shape[0]:
                    raise CheckFailed(f"factors[{(li, name)}][{e}]: L @ R must have the expert matrix's shape "
                                      f"{shape} (experts store {name} as [in, out]: a token computes x @ W), got "
                                      f"L {tuple(left.shape)} and R {tuple(right.shape)}")
                params += left.numel() + right.numel()
                w[e].copy_((left.double() @ right.double()).float())
    return params, m


@checker("Exercise 7.3: activation-aware low-rank experts (>= 2.4x smaller, <= +7 % perplexity)", timeout=600)
def check_activation_aware_factors(lowrank_factors) -> None:
    pristine, val, calib = zoo_model()
    lm = copy.deepcopy(pristine)
    before = {k: v.detach().clone() for k, v in lm.state_dict().items()}
    factors = lowrank_factors(lm, calib)
    changed = [k for k, v in lm.state_dict().items() if not torch.equal(v, before[k])]
    expect(not changed, f"your function modified the model it was given ({changed[:1]}): compute factors, leave "
                        f"the model as it is")
    params, built = _count_and_build(pristine, factors, "")
    full = sum(w.numel() for _, _, w in _expert_stacks(pristine))
    smaller = full / max(params, 1)
    base = _perplexity(pristine, val)
    got = _perplexity(built, val)
    increase = got / base - 1
    print(f"shakespeare-moe, 32 validation blocks: experts {smaller:.2f}x smaller ({params:,} factor parameters "
          f"instead of {full:,}), perplexity {got:.3f} against {base:.3f} fp32 ({100 * increase:+.1f} %)")
    if smaller < MIN_SMALLER - 1e-9:
        raise CheckFailed(f"the factors hold {params:,} parameters, only {smaller:.2f}x fewer than the experts' "
                          f"{full:,}: the target is at least {MIN_SMALLER}x (for example rank 16 for every "
                          f"96 x 64 matrix, or a global budget of the same size)")
    if increase > MAX_PPL_INCREASE:
        if increase > 1.0:
            raise CheckFailed(f"perplexity {got:.3f} is more than twice the original's {base:.3f}: the product "
                              f"L @ R is far from W. If you factored the whitened matrix S^T W, undo the whitening "
                              f"on the left factor (L = S^-T U_r Sigma_r^(1/2)), and check the inputs of w_out are "
                              f"the expert's hidden activations, not the layer's input")
        raise CheckFailed(f"perplexity {got:.3f} is {100 * increase:.1f} % above the original's {base:.3f} (target "
                          f"<= {100 * MAX_PPL_INCREASE:.0f} %): the plain SVD minimises the error on the WEIGHTS; "
                          f"minimise it on the expert's OUTPUTS for its calibration inputs X instead, by factoring "
                          f"S^T W where S S^T = X^T X (Cholesky) and mapping the left factor back with S^-T")
