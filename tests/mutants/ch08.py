"""Chapter 8: matching hidden neurons by activations, one real expert group merged by hand, a whole
merging method graded on perplexity."""

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


# ------------------------------------------------------------------ 8.3 merge_model (whole method)
def _merge_model(model, calib, G, *, merge=None, store_slots=False, keep_router=False, prune=False,
                 in_place=False, group_by_weights=False, **merge_opts):
    import copy

    from moe_course.calib import layer_inputs
    from moe_course.compress.merging import MergedRouter
    from moe_course.compress.pruning import keep_experts
    from moe_course.layers import Experts, moe_layers

    out = model if in_place else copy.deepcopy(model)
    xs = layer_inputs(model, calib)
    for layer, x in zip(moe_layers(out), xs):
        n = layer.num_experts
        with torch.no_grad():
            r = layer.router(x)
            freq = torch.bincount(r.indices.reshape(-1), minlength=n).float() / r.indices.numel()
            order = freq.argsort(descending=True, stable=True).tolist()
            dominant = order[:G]
            if group_by_weights:
                h = layer.experts.w_in.detach().reshape(n, -1).double()
            else:
                h = r.logits.double().T
            h = h / h.norm(dim=1, keepdim=True)
            sim = h @ h.T
        if prune:
            keep_experts(layer, sorted(dominant))
            continue
        labels = [0] * n
        for grp, i in enumerate(dominant):
            labels[i] = grp
        for i in order[G:]:
            labels[i] = int(sim[i, dominant].argmax())
        old = layer.experts
        new = Experts(n if store_slots else G, old.d_model, old.d_hidden, old.activation)
        with torch.no_grad():
            for grp in range(G):
                m = [i for i in range(n) if labels[i] == grp]
                w = (merge or _merge)(old.w_in[m], old.w_gate[m], old.w_out[m], freq[m], **merge_opts)
                for slot in (m if store_slots else [grp]):
                    for name, t in zip(("w_in", "w_gate", "w_out"), w):
                        getattr(new, name)[slot] = t
        layer.experts = new
        if not (keep_router or store_slots):
            layer.router = MergedRouter(layer.router, torch.tensor(labels))
    return out


@M.right("check_merge_model")
def merge_model_uniform_aligned(model, calib, G):
    """Aligned, but uniform weights inside each group (a valid variant that also clears the target)."""
    return _merge_model(model, calib, G, uniform=True)


@M.wrong("check_merge_model", "plain averaging")
def merge_model_plain(model, calib, G):
    """No alignment, uniform weights."""
    return _merge_model(model, calib, G, align=False, uniform=True)


@M.wrong("check_merge_model", "without aligning")
def merge_model_no_align(model, calib, G):
    """Frequency weights, no alignment."""
    return _merge_model(model, calib, G, align=False)


@M.wrong("check_merge_model", "frequency pruning", "MERGE")
def merge_model_prunes(model, calib, G):
    """Keeps the G most frequent experts, drops the rest."""
    return _merge_model(model, calib, G, prune=True)


@M.wrong("check_merge_model", "STORE")
def merge_model_slot_copies(model, calib, G):
    """Every slot gets its group's merged expert: N stored experts, router unchanged."""
    return _merge_model(model, calib, G, store_slots=True)


@M.wrong("check_merge_model", "MergedRouter")
def merge_model_keeps_router(model, calib, G):
    """G stored experts, the router still picks among N."""
    return _merge_model(model, calib, G, keep_router=True)


@M.wrong("check_merge_model", "changed the model")
def merge_model_in_place(model, calib, G):
    """Merges the model it was given."""
    return _merge_model(model, calib, G, in_place=True)


@M.wrong("check_merge_model", "package's own")
def merge_model_by_package(model, calib, G):
    """Calls merge_experts."""
    from moe_course.compress import merging
    return merging.merge_experts(model, G, calib=calib)
