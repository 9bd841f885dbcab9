"""Chapter 8: matching hidden neurons by activations, one real expert group merged by hand."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from . import Chapter

M = Chapter("ch08")


def _lap(c, maximize=True):
    rows, cols = linear_sum_assignment(c.detach().double().numpy(), maximize=maximize)
    return torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)


# ------------------------------------------------------------------ 8.1 match_by_activations
def _z(a):
    a = a.double() - a.double().mean(0)
    return a / a.std(0, unbiased=False).clamp_min(1e-12)


@M.right("check_match_by_activations")
def act_match_corrcoef(ref_act, act):
    """torch.corrcoef on the stacked columns, minimise the negated block; returns a numpy array."""
    h = ref_act.shape[1]
    corr = torch.corrcoef(torch.cat([ref_act, act], 1).double().T)[:h, h:]
    rows, cols = linear_sum_assignment(-corr.nan_to_num(0.0).numpy())
    return cols


@M.wrong("check_match_by_activations", "covariance")
def act_match_covariance(ref_act, act):
    """Centred but not scaled (covariance)."""
    r, a = ref_act.double() - ref_act.double().mean(0), act.double() - act.double().mean(0)
    return _lap(r.T @ a)


@M.wrong("check_match_by_activations", "centre each neuron")
def act_match_raw(ref_act, act):
    """Raw dot products of the activations."""
    return _lap(ref_act.double().T @ act.double())


@M.wrong("check_match_by_activations", "cosine")
def act_match_cosine(ref_act, act):
    """Cosine similarity of the uncentred activations."""
    r = ref_act / ref_act.norm(dim=0)
    a = act / act.norm(dim=0)
    return _lap(r.T @ a)


@M.wrong("check_match_by_activations", "minimised")
def act_match_minimise(ref_act, act):
    """linear_sum_assignment without maximize=True."""
    return _lap(_z(ref_act).T @ _z(act), maximize=False)


@M.wrong("check_match_by_activations", "inverse permutation")
def act_match_inverse(ref_act, act):
    """Rows are the other expert's neurons (the inverse permutation)."""
    return _lap(_z(act).T @ _z(ref_act))


@M.wrong("check_match_by_activations", "permutation of range")
def act_match_argmax(ref_act, act):
    """Row-wise argmax: not a permutation."""
    return (_z(ref_act).T @ _z(act)).argmax(1)


# ------------------------------------------------------------------ 8.2 merge_group (use it)
def _merge(w_in, w_gate, w_out, freqs, *, gate=True, align=True, ref_first=False, uniform=False, raw=False,
           inverse=False, permute_out=True):
    from moe_course.compress.merging import match_neurons
    n = w_in.shape[0]
    f = freqs.double()
    ref = 0 if ref_first else max(range(n), key=lambda i: (float(f[i]), -i))
    ins, gates, outs = [], [], []
    for j in range(n):
        a, g, o = w_in[j], w_gate[j], w_out[j]
        if align and j != ref:
            perm = match_neurons(w_in[ref], w_out[ref], a, o, w_gate[ref] if gate else None, g if gate else None)
            if inverse:
                perm = torch.argsort(perm)
            a, g = a[:, perm], g[:, perm]
            o = o[perm] if permute_out else o
        ins.append(a)
        gates.append(g)
        outs.append(o)
    wts = torch.ones(n, dtype=torch.float64) if uniform or float(f.sum()) <= 0 else f
    wts = wts if raw else wts / wts.sum()
    return tuple(torch.tensordot(wts.to(w_in.dtype), torch.stack(m), dims=1) for m in (ins, gates, outs))


@M.right("check_merge_group")
def merge_group_via_experts(w_in, w_gate, w_out, freqs):
    """Through an Experts module: permute_expert in place, then the package's frequency_weighted_merge."""
    from moe_course.compress.merging import frequency_weighted_merge, match_neurons, permute_expert
    from moe_course.layers import Experts
    n, d, h = w_in.shape
    ex = Experts(n, d, h, "swiglu")
    with torch.no_grad():
        ex.w_in.copy_(w_in); ex.w_gate.copy_(w_gate); ex.w_out.copy_(w_out)
    order = sorted(range(n), key=lambda i: (-float(freqs[i]), i))
    ref = order[0]
    for j in range(n):
        if j != ref:
            permute_expert(ex, j, match_neurons(ex.w_in[ref], ex.w_out[ref], ex.w_in[j], ex.w_out[j],
                                                ex.w_gate[ref], ex.w_gate[j]))
    return tuple(frequency_weighted_merge(t.detach(), freqs) for t in (ex.w_in, ex.w_gate, ex.w_out))


@M.wrong("check_merge_group", "gate")
def merge_group_no_gate(w_in, w_gate, w_out, freqs):
    """Aligned without the gate term (the old exercise's matching)."""
    return _merge(w_in, w_gate, w_out, freqs, gate=False)


@M.wrong("check_merge_group", "without aligning")
def merge_group_no_align(w_in, w_gate, w_out, freqs):
    """Averaged without alignment."""
    return _merge(w_in, w_gate, w_out, freqs, align=False)


@M.wrong("check_merge_group", "first member")
def merge_group_first_ref(w_in, w_gate, w_out, freqs):
    """Aligned to member 0 instead of the dominant one."""
    return _merge(w_in, w_gate, w_out, freqs, ref_first=True)


@M.wrong("check_merge_group", "uniform average")
def merge_group_uniform(w_in, w_gate, w_out, freqs):
    """Uniform weights."""
    return _merge(w_in, w_gate, w_out, freqs, uniform=True)


@M.wrong("check_merge_group", "not normalised")
def merge_group_raw(w_in, w_gate, w_out, freqs):
    """Frequencies not normalised."""
    return _merge(w_in, w_gate, w_out, freqs, raw=True)


@M.wrong("check_merge_group", "inverse permutation")
def merge_group_inverse(w_in, w_gate, w_out, freqs):
    """The inverse permutation applied."""
    return _merge(w_in, w_gate, w_out, freqs, inverse=True)


@M.wrong("check_merge_group", "w_out[perm]")
def merge_group_out_unpermuted(w_in, w_gate, w_out, freqs):
    """w_out left unpermuted."""
    return _merge(w_in, w_gate, w_out, freqs, permute_out=False)


@M.wrong("check_merge_group", "every frequency is 0")
def merge_group_nan_on_zero(w_in, w_gate, w_out, freqs):
    """No fallback: 0/0 when every frequency is 0."""
    n = w_in.shape[0]
    if float(freqs.sum()) <= 0:
        w = freqs.double() / freqs.double().sum()
        return tuple(torch.tensordot(w.to(t.dtype), t, dims=1) for t in (w_in, w_gate, w_out))
    return _merge(w_in, w_gate, w_out, freqs)
