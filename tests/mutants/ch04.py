"""Chapter 4: n:m mask, router restricted to the kept experts, 2:4 on the Shakespeare model,
global expert pruning under one budget."""

from __future__ import annotations

import copy

import torch

from . import Chapter

M = Chapter("ch04")


# ------------------------------------------------------------------ 4.2 restrict_router
@M.right("check_restrict_router")
def router_on_kept_columns(logits, kept, k):
    """softmax over the kept columns only, indices mapped back through `kept`."""
    kept_t = torch.tensor(kept)
    w, local = torch.softmax(logits[:, kept_t], dim=-1).topk(k, dim=-1)
    return w / w.sum(-1, keepdim=True), kept_t[local]


@M.right("check_restrict_router")
def router_large_negative(logits, kept, k):
    """masked_fill with a large negative number instead of -inf."""
    removed = torch.ones(logits.shape[-1], dtype=torch.bool)
    removed[kept] = False
    w, i = torch.softmax(logits.masked_fill(removed, -1e9), dim=-1).topk(k, dim=-1)
    return w / w.sum(-1, keepdim=True), i


def _masked(logits, kept):
    out = torch.full_like(logits, float("-inf"))
    out[:, kept] = logits[:, kept]
    return out


@M.wrong("check_restrict_router", "before the softmax")
def router_mask_after_softmax(logits, kept, k):
    """softmax over all experts, then the removed experts zeroed, no renormalisation."""
    p = torch.softmax(logits, -1)
    keep = torch.zeros_like(p)
    keep[:, kept] = 1
    return (p * keep).topk(k, -1)


@M.right("check_restrict_router")
def router_renorm_after_mask(logits, kept, k):
    """softmax over all experts, removed ones zeroed, top-k renormalised (the normaliser cancels)."""
    p = torch.softmax(logits, -1)
    keep = torch.zeros_like(p)
    keep[:, kept] = 1
    w, i = (p * keep).topk(k, -1)
    return w / w.sum(-1, keepdim=True), i


@M.wrong("check_restrict_router", "original")
def router_local_ids(logits, kept, k):
    """Indices are positions in `kept`."""
    w, i = torch.softmax(logits[:, kept], -1).topk(k, -1)
    return w / w.sum(-1, keepdim=True), i


@M.wrong("check_restrict_router", "renormalised")
def router_no_renorm(logits, kept, k):
    """The top-k weights are not renormalised."""
    return torch.softmax(_masked(logits, kept), -1).topk(k, -1)


@M.wrong("check_restrict_router", "removed expert")
def router_mask_with_zero(logits, kept, k):
    """Removed experts' logits set to 0 instead of -inf (they can still win)."""
    z = torch.zeros_like(logits)
    z[:, kept] = logits[:, kept]
    w, i = torch.softmax(z, -1).topk(k, -1)
    return w / w.sum(-1, keepdim=True), i


@M.wrong("check_restrict_router", "decreasing weight")
def router_indices_sorted(logits, kept, k):
    """The k choices sorted by expert id."""
    w, i = torch.softmax(_masked(logits, kept), -1).topk(k, -1)
    i, order = i.sort(-1)
    w = w.gather(-1, order)
    return w / w.sum(-1, keepdim=True), i


@M.wrong("check_restrict_router", "removed expert")
def router_masks_the_kept(logits, kept, k):
    """The kept experts' logits set to -inf (the mask inverted)."""
    masked = logits.clone()
    masked[:, kept] = float("-inf")
    w, i = torch.softmax(masked, -1).topk(k, -1)
    return w / w.sum(-1, keepdim=True), i



# ------------------------------------------------------------------ 4.1 nm_mask
def _keep_top(scores, n, largest=True):
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(1, scores.topk(n, dim=1, largest=largest).indices, True)
    return keep


@M.right("check_nm_mask")
def nm_by_group_threshold(weight, n, m):
    """|w| >= the n-th largest |w| of its group (no ties in the checker's weights)."""
    groups = weight.abs().reshape(-1, m)
    nth = groups.sort(dim=1, descending=True).values[:, n - 1:n]
    return (groups >= nth).view(weight.shape)


@M.wrong("check_nm_mask", "smallest")
def nm_keeps_smallest(weight, n, m):
    """Keeps the n smallest |w| of each group."""
    return _keep_top(weight.abs().reshape(-1, m), n, largest=False).view(weight.shape)


@M.wrong("check_nm_mask", "signed")
def nm_signed(weight, n, m):
    """Ranks the signed weights."""
    return _keep_top(weight.reshape(-1, m), n).view(weight.shape)


@M.wrong("check_nm_mask", "keep n")
def nm_prunes_n(weight, n, m):
    """Prunes n per group (keeps m - n)."""
    groups = weight.abs().reshape(-1, m)
    return ~_keep_top(groups, n, largest=False).view(weight.shape)


@M.wrong("check_nm_mask", "one threshold")
def nm_unstructured(weight, n, m):
    """One magnitude threshold over the whole tensor at sparsity 1 - n/m."""
    k = int(round((1 - n / m) * weight.numel()))
    keep = torch.ones(weight.numel(), dtype=torch.bool)
    keep[weight.abs().reshape(-1).argsort()[:k]] = False
    return keep.view(weight.shape)


@M.wrong("check_nm_mask", "columns")
def nm_along_columns(weight, n, m):
    """Groups of m down the second-to-last dimension."""
    t = weight.transpose(-1, -2).contiguous()
    return _keep_top(t.abs().reshape(-1, m), n).view(t.shape).transpose(-1, -2)


@M.wrong("check_nm_mask", "bool")
def nm_float(weight, n, m):
    """A 0/1 float mask."""
    return _keep_top(weight.abs().reshape(-1, m), n).view(weight.shape).float()


@M.wrong("check_nm_mask", "exactly")
def nm_one_too_many(weight, n, m):
    """topk(n + 1) (clipped to m): one weight too many per group."""
    return _keep_top(weight.abs().reshape(-1, m), min(n + 1, m)).view(weight.shape)


@M.wrong("check_nm_mask", "modified its input")
def nm_zeroes_in_place(weight, n, m):
    """Zeroes the dropped weights in place and returns weight != 0."""
    keep = _keep_top(weight.abs().reshape(-1, m), n).view(weight.shape)
    weight.mul_(keep)
    return keep


# ------------------------------------------------------------------ 4.3 nm_prune
def _ref_nm(weight, n, m):
    return _keep_top(weight.abs().reshape(-1, m), n).view(weight.shape)


def _nm_prune(model, n, m, names=("w_in", "w_gate", "w_out"), axis="input", copy_model=True,
              router=False):
    from moe_course.layers import moe_layers
    out = copy.deepcopy(model) if copy_model else model
    with torch.no_grad():
        for layer in moe_layers(out):
            for name in names:
                w = getattr(layer.experts, name, None)
                if w is None:
                    continue
                if axis == "input":
                    w.mul_(_ref_nm(w.transpose(1, 2), n, m).transpose(1, 2))
                else:
                    w.mul_(_ref_nm(w, n, m))
            if router:
                g = layer.router.gate.weight
                g.mul_(_ref_nm(g, n, m))
    return out


@M.right("check_nm_prune")
def nm_prune_with_where(model, n, m):
    """Builds new tensors with torch.where instead of multiplying in place."""
    from moe_course.layers import moe_layers
    out = copy.deepcopy(model)
    with torch.no_grad():
        for layer in moe_layers(out):
            for name in ("w_in", "w_gate", "w_out"):
                w = getattr(layer.experts, name, None)
                if w is not None:
                    keep = _ref_nm(w.transpose(1, 2).contiguous(), n, m).transpose(1, 2)
                    w.copy_(torch.where(keep, w, torch.zeros_like(w)))
    return out


@M.wrong("check_nm_prune", "wrong axis")
def nm_prune_output_axis(model, n, m):
    """Groups along the last dimension of the stored tensors (the output side of w_in)."""
    return _nm_prune(model, n, m, axis="output")


@M.wrong("check_nm_prune", "unchanged", "w_out")
def nm_prune_only_w_in(model, n, m):
    """Masks w_in only."""
    return _nm_prune(model, n, m, names=("w_in",))


@M.wrong("check_nm_prune", "modified its input")
def nm_prune_in_place(model, n, m):
    """Masks the input model and returns it."""
    return _nm_prune(model, n, m, copy_model=False)


@M.wrong("check_nm_prune", "changed", "only the experts")
def nm_prune_router_too(model, n, m):
    """Also masks the router gates."""
    return _nm_prune(model, n, m, router=True)


@M.wrong("check_nm_prune", "differ", "transpose")
def nm_prune_unstructured(model, n, m):
    """Unstructured: one threshold per expert matrix at sparsity 1 - n/m."""
    from moe_course.compress.pruning import magnitude_mask
    from moe_course.layers import moe_layers
    out = copy.deepcopy(model)
    with torch.no_grad():
        for layer in moe_layers(out):
            for name in ("w_in", "w_gate", "w_out"):
                w = getattr(layer.experts, name, None)
                if w is not None:
                    w.mul_(magnitude_mask(w, 1 - n / m))
    return out


@M.wrong("check_nm_prune", "modified its input")
def nm_prune_copies_too_late(model, n, m):
    """Masks the input model, then returns a copy of it."""
    return copy.deepcopy(_nm_prune(model, n, m, copy_model=False))


# ------------------------------------------------------------------ 4.4 global_prune
def _scores(model, calib, kind):
    from moe_course.calib import layer_inputs
    from moe_course.layers import moe_layers
    out = []
    with torch.no_grad():
        for layer, x in zip(moe_layers(model), layer_inputs(model, calib)):
            r = layer.router(x)
            gate = torch.zeros(len(x), layer.num_experts).scatter(1, r.indices, r.weights)
            if kind == "contribution" or kind == "normalised":
                s = (gate.T * layer.experts.forward_all(x).norm(dim=-1)).mean(1)
                out.append(s / s.sum() if kind == "normalised" else s)
            elif kind == "frequency":
                out.append(torch.bincount(r.indices.reshape(-1), minlength=layer.num_experts).float())
            elif kind == "probability":
                out.append(torch.softmax(r.logits, -1).mean(0))
    return out


def _drop_global(scores, total, k, guard=True, slack=0):
    floor = k if guard else 1
    kept = [set(range(len(s))) for s in scores]
    n_drop = sum(len(s) for s in kept) - total - slack
    for _, layer, e in sorted((float(s[e]), l, e) for l, s in enumerate(scores) for e in range(len(s))):
        if n_drop <= 0:
            break
        if len(kept[layer]) > floor:
            kept[layer].discard(e)
            n_drop -= 1
    return [sorted(s) for s in kept]


def _global(model, calib, total, kind="contribution", guard=True, slack=0, copy_model=True):
    from moe_course.compress.pruning import keep_experts
    from moe_course.layers import moe_layers
    out = copy.deepcopy(model) if copy_model else model
    layers = moe_layers(out)
    kept = _drop_global(_scores(model, calib, kind), total, layers[0].k, guard, slack)
    for layer, ids in zip(layers, kept):
        keep_experts(layer, ids)
    return out


@M.right("check_global_prune")
def global_by_contribution_flat(model, calib, total):
    """One flat tensor of scores (torch.cat), dropped in ascending order with the k floor."""
    from moe_course.compress.pruning import keep_experts
    from moe_course.layers import moe_layers
    scores = _scores(model, calib, "contribution")
    owner = torch.cat([torch.full((len(s),), i) for i, s in enumerate(scores)])
    local = torch.cat([torch.arange(len(s)) for s in scores])
    k = moe_layers(model)[0].k
    alive = torch.ones(len(owner), dtype=torch.bool)
    for j in torch.cat(scores).argsort().tolist():
        if int(alive.sum()) == total:
            break
        if int((alive & (owner == owner[j])).sum()) > k:
            alive[j] = False
    out = copy.deepcopy(model)
    for i, layer in enumerate(moe_layers(out)):
        keep_experts(layer, local[alive & (owner == i)].tolist())
    return out


@M.wrong("check_global_prune", "same number")
def global_uniform(model, calib, total):
    """The contribution score, but the same number of experts in every layer."""
    from moe_course.compress.pruning import keep_experts
    from moe_course.layers import moe_layers
    out = copy.deepcopy(model)
    layers = moe_layers(out)
    per = total // len(layers)
    for layer, s in zip(layers, _scores(model, calib, "contribution")):
        keep_experts(layer, sorted(s.argsort(descending=True)[:per].tolist()))
    return out


@M.wrong("check_global_prune", "normalised")
def global_normalised(model, calib, total):
    """Contributions normalised to shares within each layer before the global ranking."""
    return _global(model, calib, total, "normalised")


@M.wrong("check_global_prune", "frequency")
def global_frequency(model, calib, total):
    """Global ranking by routing frequency."""
    return _global(model, calib, total, "frequency")


@M.wrong("check_global_prune", "mean router probability")
def global_probability(model, calib, total):
    """Global ranking by mean router probability."""
    return _global(model, calib, total, "probability")


@M.wrong("check_global_prune", "budget")
def global_off_by_one(model, calib, total):
    """Stops one expert early: total + 1 kept."""
    return _global(model, calib, total, slack=1)


@M.wrong("check_global_prune", "at least k")
def global_no_k_guard(model, calib, total):
    """Keeps at least one expert per layer, not k."""
    return _global(model, calib, total, guard=False)


@M.wrong("check_global_prune", "modified the input model")
def global_in_place(model, calib, total):
    """Prunes the input model itself."""
    return _global(model, calib, total, copy_model=False)


@M.wrong("check_global_prune", "shrink")
def global_zeroes_experts(model, calib, total):
    """Zeroes the dropped experts' weights instead of removing them."""
    from moe_course.layers import moe_layers
    out = copy.deepcopy(model)
    kept = _drop_global(_scores(model, calib, "contribution"), total, moe_layers(out)[0].k)
    with torch.no_grad():
        for layer, ids in zip(moe_layers(out), kept):
            for e in range(layer.num_experts):
                if e not in ids:
                    for name in ("w_in", "w_gate", "w_out"):
                        w = getattr(layer.experts, name, None)
                        if w is not None:
                            w[e].zero_()
    return out
