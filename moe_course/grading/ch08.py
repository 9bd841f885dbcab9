"""Checkers for chapter 8, merging experts: neuron matching by activations (8.1), one real group
merged by hand (8.2, "use it"), and a whole merging method for every layer of the Shakespeare
model, graded on perplexity against frequency pruning at the same number of experts (8.3).

Each checker compares the student's function with the package's reference
(:func:`moe_course.compress.merging.match_neurons` and
:func:`~moe_course.compress.merging.frequency_weighted_merge`) on planted, random and edge cases,
and recognises the usual wrong answers so that the hint names the mistake.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from moe_course.compress.merging import frequency_weighted_merge, match_neurons

from .core import CheckFailed, checker, describe, expect

__all__ = ["check_match_by_activations", "check_merge_group", "real_group", "check_merge_model",
           "shakespeare", "check_match_neurons", "check_frequency_weighted_merge"]


# --------------------------------------------------------------------------------------------
# Exercise 8.1: weight matching of hidden neurons
# --------------------------------------------------------------------------------------------
def _lap(c: torch.Tensor, maximize: bool) -> torch.Tensor:
    rows, cols = linear_sum_assignment(c.double().numpy(), maximize=maximize)
    return torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)


def _cases():
    g = torch.Generator().manual_seed(8)
    out = []
    for d, h, noise_in, noise_out in ((6, 5, 0.0, 0.0), (8, 12, 0.3, 0.3), (10, 16, 2.0, 0.2), (4, 20, 1.5, 0.1)):
        ref_in, ref_out = torch.randn(d, h, generator=g), torch.randn(h, d, generator=g)
        p = torch.randperm(h, generator=g)
        w_in = ref_in[:, p] + noise_in * torch.randn(d, h, generator=g)       # a permuted, perturbed copy
        w_out = ref_out[p] + noise_out * torch.randn(h, d, generator=g)
        out.append((ref_in, ref_out, w_in, w_out))
    return out


@checker("Exercise 8.1: match neurons by weight matching")
def check_match_neurons(match_neurons_fn) -> None:
    for ref_in, ref_out, w_in, w_out in _cases():
        d, h = ref_in.shape
        desc = f"(d={d}, h={h})"
        got = match_neurons_fn(ref_in.clone(), ref_out.clone(), w_in.clone(), w_out.clone())
        got = torch.as_tensor(np.asarray(got) if not torch.is_tensor(got) else got).reshape(-1).long()
        expect(got.numel() == h and sorted(got.tolist()) == list(range(h)),
               f"return a permutation of range(h={h}) (one entry per hidden neuron) {desc}")
        ref = match_neurons(ref_in, ref_out, w_in, w_out)
        if torch.equal(got, ref):
            continue
        c = ref_in.T @ w_in + ref_out @ w_out.T
        if torch.equal(got, _lap(c, maximize=False)):
            raise CheckFailed(f"you minimised the similarity: linear_sum_assignment(C, maximize=True) pairs the MOST "
                              f"similar neurons {desc}")
        if torch.equal(got, _lap(ref_in.T @ w_in, maximize=True)):
            raise CheckFailed(f"you matched with the input weights only: add ref_out @ w_out.T to the cost, both "
                              f"layers of the expert carry the neuron's identity {desc}")
        if torch.equal(got, _lap(ref_out @ w_out.T, maximize=True)):
            raise CheckFailed(f"you matched with the output weights only: add ref_in.T @ w_in to the cost {desc}")
        if torch.equal(got, torch.argsort(ref)):
            raise CheckFailed(f"you returned the inverse permutation: w_in[:, perm] must line up with ref_in "
                              f"(perm[a] = the neuron of w that matches reference neuron a) {desc}")
        raise CheckFailed(f"the permutation does not maximise the matched similarity "
                          f"sum_a C[a, perm[a]] with C = ref_in.T @ w_in + ref_out @ w_out.T {desc}")


# --------------------------------------------------------------------------------------------
# Exercise 8.2: frequency-weighted merge
# --------------------------------------------------------------------------------------------
@checker("Exercise 8.2: frequency-weighted merge")
def check_frequency_weighted_merge(merge_fn) -> None:
    g = torch.Generator().manual_seed(80)
    cases = [(torch.stack([torch.ones(2, 3), 3 * torch.ones(2, 3)]), torch.tensor([1.0, 3.0])),
             (torch.randn(4, 5, 6, generator=g), torch.tensor([0.4, 0.1, 0.3, 0.2])),
             (torch.randn(3, 7, generator=g), torch.tensor([5.0, 1.0, 2.0])),          # counts, not fractions
             (torch.randn(2, 4, 4, generator=g), torch.tensor([0.05, 0.01]))]           # a group's share of tokens
    for w, f in cases:
        desc = f"(weights of shape {tuple(w.shape)}, freqs={f.tolist()})"
        out = merge_fn(w.clone(), f.clone())
        if not torch.is_tensor(out):
            raise CheckFailed(f"return a tensor, got {type(out).__name__} {desc}")
        expect(out.shape == w.shape[1:], f"the merged expert must have shape {tuple(w.shape[1:])} (one expert), "
                                         f"got {tuple(out.shape)} {desc}")
        ref = frequency_weighted_merge(w, f)
        if torch.allclose(out, ref, atol=1e-5):
            continue
        if torch.allclose(out, w.mean(0), atol=1e-5):
            raise CheckFailed(f"you took the uniform average: weight each expert by its frequency f_j {desc}")
        if torch.allclose(out, torch.tensordot(f, w, dims=1), atol=1e-5):
            raise CheckFailed(f"the frequencies are not normalised: divide by sum_j f_j inside the group "
                              f"(the weights of a merge must sum to 1) {desc}")
        if torch.allclose(out, torch.tensordot(f, w, dims=1) / w.shape[0], atol=1e-5):
            raise CheckFailed(f"you divided by the number of experts n; divide by the total frequency sum_j f_j "
                              f"so that the merge weights f_j / sum_j f_j sum to 1 {desc}")
        if torch.allclose(out, torch.tensordot(torch.softmax(f, 0), w, dims=1), atol=1e-5):
            raise CheckFailed(f"you took a softmax of the frequencies: the merge weights are proportional to the "
                              f"frequencies themselves, f_j / sum_j f_j {desc}")
        raise CheckFailed(f"expected sum_j f_j W_j / sum_j f_j {desc}")
    w = torch.randn(3, 4, generator=g)
    out = merge_fn(w.clone(), torch.zeros(3))
    expect(torch.is_tensor(out) and torch.allclose(out, w.mean(0), atol=1e-5) and not torch.isnan(out).any(),
           "when every frequency is 0 (a group no token used), fall back to the uniform average instead of 0/0")


# ============================================================================================
# The exercises as the notebook asks them now: matching by activations (a variant the chapter does
# not show) and one real expert group merged by the learner and compared with merge_experts.
# ============================================================================================
def _standardise(a: torch.Tensor) -> torch.Tensor:
    a = a.double()
    a = a - a.mean(0, keepdim=True)
    std = a.pow(2).mean(0, keepdim=True).sqrt()
    return a / torch.where(std > 0, std, torch.ones_like(std))


def _reference_act_match(ref_act: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    c = _standardise(ref_act).T @ _standardise(act) / ref_act.shape[0]
    return _lap(c, maximize=True)


def _act_variants(ref_act, act) -> dict[str, torch.Tensor]:
    r, a = ref_act.double(), act.double()
    rc, ac = r - r.mean(0), a - a.mean(0)
    cos = (r / r.norm(dim=0).clamp_min(1e-12)).T @ (a / a.norm(dim=0).clamp_min(1e-12))
    corr = _standardise(r).T @ _standardise(a)
    return {
        "covariance": _lap(rc.T @ ac, True),
        "raw": _lap(r.T @ a, True),
        "uncentred": _lap(cos, True),
        "minimised": _lap(corr, False),
        "inverse": torch.argsort(_lap(corr, True)),
        "distance": _lap(torch.cdist(r.T, a.T), True),
    }


_ACT_HINTS = {
    "covariance": "you matched by COVARIANCE: divide by each neuron's standard deviation too (correlation), or a "
                  "neuron with large activations wins every pairing",
    "raw": "you matched by raw dot products of the activations: centre each neuron (subtract its mean over the tokens) "
           "and divide by its standard deviation first, i.e. use correlations",
    "uncentred": "you used the cosine of the raw activations: centre each neuron first (subtract its mean over the "
                 "tokens); a neuron with a large constant offset looks similar to everything",
    "minimised": "you minimised the correlation: linear_sum_assignment(C, maximize=True) pairs the MOST correlated "
                 "neurons",
    "inverse": "you returned the inverse permutation: act[:, perm] must line up with ref_act (perm[a] = the neuron "
               "of the other expert paired with reference neuron a)",
    "distance": "you MAXIMISED a distance: correlations are similarities (maximise them); distances must be minimised",
}


def _act_cases():
    g = torch.Generator().manual_seed(81)
    out = []
    for t, h, noise, mixing in ((200, 6, 0.0, 0.0), (400, 16, 0.4, 0.8), (500, 24, 0.5, 0.9), (300, 12, 0.6, 1.0)):
        latent = torch.randn(t, h, generator=g)
        mix = torch.eye(h) + mixing * torch.randn(h, h, generator=g) / h ** 0.5  # neurons that share features
        ref = (latent @ mix) * torch.exp(torch.randn(1, h, generator=g) * 1.5) + torch.randn(1, h, generator=g) * 3.0
        p = torch.randperm(h, generator=g)
        scale = torch.exp(torch.randn(1, h, generator=g) * 1.5)  # neurons on very different scales
        offset = torch.randn(1, h, generator=g) * 6.0              # and with large constant offsets
        act = (ref[:, p] + noise * torch.randn(t, h, generator=g)) * scale + offset
        out.append((ref, act))
    # Hand-made: neurons 0 and 1 are correlated (0.8); the reference stores neuron 0 large and the other expert
    # stores neuron 1 large. Correlation pairs 0-0 and 1-1; covariance (10*10*0.8 > 10*1 + 1*10) swaps them.
    z1, e, rest = torch.randn(400, 1, generator=g), torch.randn(400, 1, generator=g), torch.randn(400, 2, generator=g)
    z2 = 0.8 * z1 + 0.6 * e
    ref = torch.cat([10 * z1, z2, rest], 1)
    act = torch.cat([z1, 10 * z2, rest], 1) + 0.05 * torch.randn(400, 4, generator=g)
    out.insert(1, (ref, act[:, [2, 0, 3, 1]]))
    return out


@checker("Exercise 8.1: match neurons by their activations")
def check_match_by_activations(match_fn) -> None:
    """``match_by_activations(ref_act [T, h], act [T, h]) -> perm`` maximising the summed correlation."""
    pending = None
    for ref, act in _act_cases():
        t, h = ref.shape
        desc = f"(T={t}, h={h})"
        got = match_fn(ref.clone(), act.clone())
        got = torch.as_tensor(np.asarray(got) if not torch.is_tensor(got) else got).reshape(-1)
        expect(not got.is_floating_point(), f"return integer indices (a LongTensor), got {got.dtype} {desc}")
        got = got.long()
        expect(got.numel() == h and sorted(got.tolist()) == list(range(h)),
               f"return a permutation of range(h={h}) (one entry per hidden neuron, no repeats) {desc}")
        want = _reference_act_match(ref, act)
        if torch.equal(got, want):
            continue
        names = [name for name, v in _act_variants(ref, act).items() if not torch.equal(v, want) and torch.equal(got, v)]
        if len(names) == 1:
            raise CheckFailed(f"{_ACT_HINTS[names[0]]} {desc}")
        if names:  # several mistakes give this permutation: a later case tells them apart
            pending = pending or f"{_ACT_HINTS[names[0]]} {desc}"
            continue
        raise CheckFailed(f"the permutation does not maximise the summed correlation sum_a corr(ref_act[:, a], "
                          f"act[:, perm[a]]) {desc}")
    if pending:
        raise CheckFailed(pending)
    ref = torch.randn(50, 5)
    act = ref[:, [2, 0, 4, 1, 3]].clone()
    ref[:, 1] = 0.0  # a dead neuron: standard deviation 0
    got = match_fn(ref.clone(), act.clone())
    got = torch.as_tensor(np.asarray(got) if not torch.is_tensor(got) else got).reshape(-1)
    expect(not got.is_floating_point() and sorted(got.long().tolist()) == list(range(5)),
           "with a neuron whose activation never changes (standard deviation 0) you did not return a permutation "
           "(NaN correlations?): guard the division by the standard deviation")


# --------------------------------------------------------------------------------------------
# Exercise 8.2 (use it): merge one real expert group and compare with merge_experts
# --------------------------------------------------------------------------------------------
_GROUP: dict = {}


def real_group() -> dict:
    """Group 0 of layer 0 when ``merge_experts`` halves the ``shakespeare-moe`` model (8 -> 4 experts), with the
    calibration of chapter 8 (32 training blocks): the members' stacked weights, their routing frequencies, and
    the merged expert ``merge_experts`` builds."""
    if not _GROUP:
        from moe_course import zoo
        from moe_course.compress import merging
        from moe_course.calib import layer_inputs
        from moe_course.layers import moe_layers
        lm = zoo.pretrained("shakespeare-moe", progress=False).cpu().eval()
        calib = zoo.data("shakespeare-moe")["train"].shuffle(seed=0).select(range(32))
        merged = moe_layers(merging.merge_experts(lm, 4, calib=calib))[0]
        layer = moe_layers(lm)[0]
        with torch.no_grad():
            x = layer_inputs(lm, calib)[0]
            idx = layer.router(x).indices
            freq = torch.bincount(idx.reshape(-1), minlength=layer.num_experts).double() / idx.numel()
        members = merged.merged_groups[0]
        ex = layer.experts
        _GROUP.update(members=list(members), freqs=freq[members].float().clone(),
                      w_in=ex.w_in[members].detach().clone(), w_gate=ex.w_gate[members].detach().clone(),
                      w_out=ex.w_out[members].detach().clone(),
                      merged=tuple(getattr(merged.experts, n)[0].detach().clone() for n in ("w_in", "w_gate", "w_out")))
    return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in _GROUP.items()}


def _reference_merge(w_in, w_gate, w_out, freqs, *, gate=True, align=True, weighting="frequency", ref_rule="max",
                     inverse=False, permute_out=True):
    n = w_in.shape[0]
    f = freqs.double()
    ref = max(range(n), key=lambda i: (float(f[i]), -i)) if ref_rule == "max" else 0
    ins, gates, outs = [], [], []
    for j in range(n):
        a, gt, o = w_in[j], w_gate[j], w_out[j]
        if align and j != ref:
            perm = match_neurons(w_in[ref], w_out[ref], a, o, w_gate[ref] if gate else None, gt if gate else None)
            if inverse:
                perm = torch.argsort(perm)
            a, gt = a[:, perm], gt[:, perm]
            o = o[perm] if permute_out else o
        ins.append(a)
        gates.append(gt)
        outs.append(o)
    weights = f if weighting == "frequency" else torch.ones(n, dtype=torch.float64)
    if weighting == "frequency" and float(weights.sum()) <= 0:
        weights = torch.ones(n, dtype=torch.float64)
    if weighting == "raw":
        weights = f
    else:
        weights = weights / weights.sum()
    return tuple(torch.tensordot(weights.to(w_in.dtype), torch.stack(m), dims=1) for m in (ins, gates, outs))


_MERGE_VARIANTS = {
    "no_gate": dict(gate=False),
    "no_align": dict(align=False),
    "first_ref": dict(ref_rule="first"),
    "uniform": dict(weighting="uniform"),
    "raw": dict(weighting="raw"),
    "inverse": dict(inverse=True),
    "out_not_permuted": dict(permute_out=False),
}

_MERGE_HINTS = {
    "no_gate": "your alignment ignores the gate weights: a SwiGLU neuron is column a of w_in AND of w_gate and row a "
               "of w_out, so pass the gates to match_neurons (ref_gate=..., w_gate=...) as merge_experts does",
    "no_align": "you averaged without aligning: permute each member's hidden neurons to match the dominant expert "
                "(match_neurons, then w_in[:, perm], w_gate[:, perm], w_out[perm]) before averaging",
    "first_ref": "you aligned to the FIRST member: align to the group's dominant expert, the one with the largest "
                 "frequency (the first of them on a tie)",
    "uniform": "you took the uniform average: weight each aligned member by its frequency, f_j / sum_j f_j",
    "raw": "the frequencies are not normalised: divide by their sum inside the group (the merge weights sum to 1)",
    "inverse": "you applied the inverse permutation: match_neurons returns perm with w_in[:, perm] lined up with the "
               "reference (perm[a] = the member's neuron paired with reference neuron a)",
    "out_not_permuted": "you permuted w_in and w_gate but not w_out: a hidden neuron is a column of w_in and w_gate "
                        "AND a row of w_out; permute all three (w_out[perm])",
}


def _merge_cases():
    g = torch.Generator().manual_seed(82)
    out = []
    for n, d, h, noise, gate_clean in ((3, 8, 10, 0.3, True), (2, 6, 12, 0.5, True), (4, 10, 16, 0.6, True)):
        base = [torch.randn(d, h, generator=g), torch.randn(d, h, generator=g), torch.randn(h, d, generator=g)]
        w_in, w_gate, w_out = [], [], []
        for _ in range(n):
            p = torch.randperm(h, generator=g)
            w_in.append(base[0][:, p] + noise * 3 * torch.randn(d, h, generator=g))   # noisy up projections:
            w_gate.append(base[1][:, p] + noise * 0.1 * torch.randn(d, h, generator=g))  # the gate identifies a neuron
            w_out.append(base[2][p] + noise * 3 * torch.randn(h, d, generator=g))
        freqs = torch.rand(n, generator=g) * 0.2
        freqs[n - 1] += 0.3  # the dominant expert is not the first member
        out.append((torch.stack(w_in), torch.stack(w_gate), torch.stack(w_out), freqs))
    return out


def _merge_output(fn, w_in, w_gate, w_out, freqs, desc):
    out = fn(w_in.clone(), w_gate.clone(), w_out.clone(), freqs.clone())
    expect(isinstance(out, (tuple, list)) and len(out) == 3 and all(torch.is_tensor(t) for t in out),
           f"merge_group must return three tensors (merged w_in, w_gate, w_out), got {describe(out)} {desc}")
    for t, ref, name in zip(out, (w_in[0], w_gate[0], w_out[0]), ("w_in", "w_gate", "w_out")):
        expect(tuple(t.shape) == tuple(ref.shape), f"the merged {name} must have one member's shape "
                                                   f"{tuple(ref.shape)}, got {tuple(t.shape)} {desc}")
    return out


def _same(a, b, atol=1e-5):
    return all(torch.allclose(x.float(), y.float(), atol=atol) for x, y in zip(a, b))


@checker("Exercise 8.2: merge one real expert group", timeout=180)
def check_merge_group(merge_fn) -> None:
    """``merge_group(w_in [n,d,h], w_gate [n,d,h], w_out [n,h,d], freqs [n]) -> merged (w_in, w_gate, w_out)``:
    align every member to the dominant one (with the gate term), frequency-weighted average; then group 0 of
    layer 0 of shakespeare-moe against ``merge_experts`` (tolerance 1e-4)."""
    for w_in, w_gate, w_out, freqs in _merge_cases():
        desc = f"(a group of {w_in.shape[0]} experts, d={w_in.shape[1]}, h={w_in.shape[2]}, freqs={[round(float(f), 3) for f in freqs]})"
        got = _merge_output(merge_fn, w_in, w_gate, w_out, freqs, desc)
        want = _reference_merge(w_in, w_gate, w_out, freqs)
        if _same(got, want):
            continue
        for name, opts in _MERGE_VARIANTS.items():
            v = _reference_merge(w_in, w_gate, w_out, freqs, **opts)
            if not _same(v, want, 1e-6) and _same(got, v):
                raise CheckFailed(f"{_MERGE_HINTS[name]} {desc}")
        raise CheckFailed(f"the merged expert differs from the reference: align each member to the most frequent one "
                          f"with match_neurons(ref_in, ref_out, w_in, w_out, ref_gate, w_gate), permute it, then "
                          f"average with weights f_j / sum_j f_j {desc}")
    w_in, w_gate, w_out, _ = _merge_cases()[0]
    got = _merge_output(merge_fn, w_in, w_gate, w_out, torch.zeros(3), "(every frequency 0)")
    expect(all(torch.isfinite(t).all() for t in got) and _same(got, _reference_merge(w_in, w_gate, w_out, torch.zeros(3))),
           "when every frequency is 0 (a group no calibration token used), fall back to uniform weights (and the "
           "first member as the dominant one) instead of dividing 0 by 0")
    grp = real_group()
    got = _merge_output(merge_fn, grp["w_in"], grp["w_gate"], grp["w_out"], grp["freqs"], "(the real group)")
    gap = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, grp["merged"]))
    expect(gap <= 1e-4, f"on the real group {grp['members']} of shakespeare-moe's layer 0 your merged expert differs "
                        f"from merge_experts' by up to {gap:.3g} (tolerance 1e-4)")
    dist = [float((got[0] - grp["w_in"][j]).norm() / grp["w_in"][j].norm()) for j in range(len(grp["members"]))]
    print(f"shakespeare-moe layer 0, group {grp['members']} (freqs {[round(float(f), 3) for f in grp['freqs']]}): "
          f"max |yours - merge_experts| = {gap:.2e}; relative distance of the merged w_in to each member (before "
          f"alignment): {[round(d, 3) for d in dist]}")



# --------------------------------------------------------------------------------------------
# Exercise 8.3 (whole method): merge every layer, beat frequency pruning at equal experts
# --------------------------------------------------------------------------------------------
_LM: dict = {}
VAL_SEQUENCES = 128
TARGET = 0.95   # at most 95 % of frequency pruning's perplexity
GROUPS = 4      # of 8 experts per layer


def shakespeare():
    """``(model, calib, val)``: a fresh copy of the trained ``shakespeare-moe`` model (CPU, eval), the
    chapter's calibration set (32 training sequences, seed 0) and the first ``VAL_SEQUENCES``
    validation sequences."""
    import copy

    if not _LM:
        from moe_course import zoo

        data = zoo.data("shakespeare-moe")
        _LM.update(model=zoo.pretrained("shakespeare-moe", progress=False).cpu().eval(),
                   calib=data["train"].shuffle(seed=0).select(range(32)),
                   val=data["validation"].select(range(VAL_SEQUENCES)))
    return copy.deepcopy(_LM["model"]), _LM["calib"], _LM["val"]


_MODEL_REF: dict = {}


def _cached(key, make):
    if key not in _MODEL_REF:
        _MODEL_REF[key] = make()
    return _MODEL_REF[key]


def _ppl(model, val) -> float:
    from moe_course.train import evaluate

    return float(evaluate(model, val, batch_size=128)["perplexity"])


def _logits(model, val):
    with torch.no_grad():
        return model(val[:4]["input_ids"][:, :-1])


_MODEL_HINTS = {
    "plain": "your merge behaves like plain averaging (no alignment, uniform weights): align each member to its "
             "group's dominant expert (your merge_group of exercise 8.2 does) and weight by frequency",
    "no_align": "your merge averages the members without aligning their hidden neurons first: permute each member "
                "to match the dominant expert (match_neurons with the gate term) before averaging",
    "pruning": "that is frequency pruning (the G most used experts kept, the others thrown away): MERGE the other "
               "experts into the kept ones instead of dropping them",
}


@checker("Exercise 8.3: a whole merging method", timeout=600,
         forbid=("moe_course.compress.merging.merge_experts", "moe_course.compress.merging.hc_smoe",
                 "moe_course.compress.merging.mc_smoe", "moe_course.compress.merging._merge_layer",
                 "moe_course.compress.pruning.prune_experts"))
def check_merge_model(merge_fn) -> None:
    """``merge_model(model, calib, G) -> model``: every MoE layer of the returned model stores ``G`` experts
    (a router over the ``N`` original slots may map them to groups); the given model stays whole. Graded
    on shakespeare-moe at G = 4 of 8: validation perplexity at most TARGET times frequency pruning's."""
    import torch.nn as nn

    from moe_course.compress import merging as M
    from moe_course.compress import pruning as P
    from moe_course.layers import moe_layers

    model, calib, val = shakespeare()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    desc = f"(shakespeare-moe, G = {GROUPS} of 8 experts per layer, {VAL_SEQUENCES} validation sequences)"
    out = merge_fn(model, calib, GROUPS)
    now = model.state_dict()
    expect(set(now) == set(before) and all(now[k].shape == v.shape and torch.equal(now[k], v)
                                           for k, v in before.items()),
           f"your function changed the model it was given: merge a copy (copy.deepcopy(model)) {desc}")
    expect(isinstance(out, nn.Module), f"return the merged model (an nn.Module), got {describe(out)} {desc}")
    layers = moe_layers(out)
    expect(len(layers) == len(moe_layers(model)), f"the merged model must keep all {len(moe_layers(model))} "
                                                  f"MoE layers, got {len(layers)} {desc}")
    stored = [getattr(layer.experts, "num_experts", None) for layer in layers]
    expect(all(n == GROUPS for n in stored),
           f"every layer must STORE G = {GROUPS} experts (one merged expert per group; slots that point to "
           f"shared copies do not make the model smaller), got {stored} {desc}")
    routes = [getattr(layer.router, "num_groups", layer.router.gate.weight.shape[0]) for layer in layers]
    expect(routes == stored, f"the routers route to {routes} experts while the layers store {stored}: keep the "
                             f"router's N slots and map them to groups with M.MergedRouter(router, "
                             f"slot_to_group) {desc}")
    try:
        got_logits = _logits(out, val)
    except Exception as exc:  # noqa: BLE001 - the learner's model, any failure is the hint
        raise CheckFailed(f"your merged model fails on a forward pass ({type(exc).__name__}: {exc}) {desc}")
    variants = {
        "plain": lambda: M.merge_experts(model, GROUPS, calib=calib, align=False, weighting="uniform"),
        "no_align": lambda: M.merge_experts(model, GROUPS, calib=calib, align=False),
        "pruning": lambda: P.prune_experts(model, GROUPS, calib=calib, method="frequency"),
    }
    for name, make in variants.items():
        ref_logits = _cached(("logits", name), lambda: _logits(make(), val))
        if got_logits.shape == ref_logits.shape and torch.allclose(got_logits, ref_logits, atol=1e-4):
            raise CheckFailed(f"{_MODEL_HINTS[name]} {desc}")
    got = _ppl(out, val)
    base = _cached("pruning ppl", lambda: _ppl(P.prune_experts(model, GROUPS, calib=calib, method="frequency"), val))
    full = _cached("full ppl", lambda: _ppl(model, val))
    print(f"G = {GROUPS} of 8 experts per layer: your merged model's validation perplexity {got:.3f}; frequency "
          f"pruning {base:.3f} (target <= {TARGET * base:.3f}); the whole model {full:.3f}")
    expect(got <= TARGET * base,
           f"perplexity {got:.3f} does not beat frequency pruning ({base:.3f}) by 5 %: group experts the router "
           f"treats alike around the most used ones, align each group to its dominant expert and average with "
           f"frequency weights {desc}")
