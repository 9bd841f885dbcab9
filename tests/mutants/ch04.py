"""Chapter 4: magnitude-pruning mask, router restricted to the kept experts."""

from __future__ import annotations

import torch

from . import Chapter

M = Chapter("ch04")


# ------------------------------------------------------------------ 4.1 magnitude_mask
@M.right("check_magnitude_mask")
def mask_by_kthvalue(weight, sparsity):
    """Threshold at the n-th smallest |w| (no ties in the checker's weights)."""
    n = int(round(sparsity * weight.numel()))
    if n == 0:
        return torch.ones_like(weight, dtype=torch.bool)
    threshold = weight.abs().flatten().kthvalue(n).values
    return weight.abs() > threshold


def _drop(order, weight, n):
    mask = torch.ones(weight.numel(), dtype=torch.bool)
    mask[order[:n]] = False
    return mask.view(weight.shape)


@M.wrong("check_magnitude_mask", "signed weights")
def mask_signed(weight, sparsity):
    """Ranks the signed weights."""
    return _drop(weight.reshape(-1).argsort(), weight, int(round(sparsity * weight.numel())))


@M.wrong("check_magnitude_mask", "inverted")
def mask_inverted(weight, sparsity):
    """True marks the pruned weights."""
    return ~_drop(weight.abs().reshape(-1).argsort(), weight, int(round(sparsity * weight.numel())))


@M.wrong("check_magnitude_mask", "largest")
def mask_largest(weight, sparsity):
    """Prunes the largest |w|."""
    return _drop(weight.abs().reshape(-1).argsort(descending=True), weight, int(round(sparsity * weight.numel())))


@M.wrong("check_magnitude_mask", "each row separately")
def mask_per_row(weight, sparsity):
    """One threshold per row."""
    rows = weight.reshape(-1, weight.shape[-1])
    return torch.stack([_drop(r.abs().argsort(), r, int(round(sparsity * r.numel()))) for r in rows]).view(weight.shape)


@M.wrong("check_magnitude_mask", "exactly round")
def mask_int_truncates(weight, sparsity):
    """int() instead of round(): one weight too few."""
    return _drop(weight.abs().reshape(-1).argsort(), weight, int(sparsity * weight.numel()))


@M.wrong("check_magnitude_mask", "exactly round")
def mask_inclusive_threshold(weight, sparsity):
    """|w| >= the n-th smallest: keeps the weight at the threshold."""
    n = int(round(sparsity * weight.numel()))
    if n == 0:
        return torch.ones_like(weight, dtype=torch.bool)
    return weight.abs() >= weight.abs().flatten().kthvalue(n).values


@M.wrong("check_magnitude_mask", "exactly round")
def mask_quantile(weight, sparsity):
    """|w| > quantile(|w|, sparsity) (interpolated: not exactly round(s n) weights)."""
    return weight.abs() > weight.abs().flatten().quantile(sparsity)


@M.wrong("check_magnitude_mask", "bool mask")
def mask_float(weight, sparsity):
    """A 0/1 float mask."""
    return _drop(weight.abs().reshape(-1).argsort(), weight, int(round(sparsity * weight.numel()))).float()


@M.wrong("check_magnitude_mask", "modified its input")
def mask_prunes_in_place(weight, sparsity):
    """Zeroes the pruned weights in place and returns weight != 0."""
    n = int(round(sparsity * weight.numel()))
    weight.view(-1)[weight.abs().reshape(-1).argsort()[:n]] = 0
    return weight != 0


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
