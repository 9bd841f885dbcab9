"""Checkers for chapter 4, pruning: an n:m semi-structured mask, NAEE's restricted router, the
2:4 mask on the Shakespeare model (use it), and a global expert pruning under one budget
(build a method, graded on a perplexity target).

The function checkers compare the student's function with a reference on a hand-made case,
random cases and edge cases, and recognise the usual wrong answers so that the hint names the
mistake. The two model checkers run the student's function on the zoo's ``shakespeare-moe``.
(``check_magnitude_mask`` is the earlier exercise 4.1, kept for old notebooks.)
"""

from __future__ import annotations

import torch

from moe_course.compress.pruning import magnitude_mask, restrict_router

from .core import CheckFailed, checker, describe, expect

__all__ = ["check_nm_mask", "check_restrict_router", "check_nm_prune", "check_global_prune",
           "check_magnitude_mask", "zoo_model"]


# --------------------------------------------------------------------------------------------
# Exercise 4.1: magnitude-pruning mask
# --------------------------------------------------------------------------------------------
def _mask_variants(w: torch.Tensor, s: float) -> dict[str, torch.Tensor]:
    n = int(round(s * w.numel()))
    flat = w.reshape(-1)

    def drop(order):
        m = torch.ones(w.numel(), dtype=torch.bool)
        m[order[:n]] = False
        return m.view(w.shape)

    out = {
        "signed": drop(flat.argsort()),
        "inverted": ~magnitude_mask(w, s),
        "largest": drop(flat.abs().argsort(descending=True)),
    }
    if w.dim() == 2:
        out["per_row"] = torch.cat([magnitude_mask(r, s) for r in w]).view(w.shape)
    return out


_MASK_HINTS = {
    "signed": "you ranked the signed weights: a large negative weight is important too, rank by |w| (w.abs())",
    "largest": "you removed the LARGEST weights: magnitude pruning removes the smallest |w|",
    "inverted": ("your mask is inverted (or prunes the LARGEST |w|): True must mean 'keep' and the pruned "
                 "(False) entries must be the smallest |w|"),
    "per_row": "you pruned each row separately: the exercise asks for one threshold over the whole tensor",
}


@checker("Exercise 4.1: magnitude-pruning mask")
def check_magnitude_mask(magnitude_mask_fn) -> None:
    hand = torch.tensor([[0.5, -2.0, 0.1, 1.0], [-0.05, 3.0, -0.7, 0.2]])
    cases = [(hand, 0.5), (hand, 0.25), (torch.randn(16, 12), 0.3),
             (torch.randn(8, 32) * torch.linspace(0.1, 3, 8)[:, None], 0.6), (torch.randn(3, 5, 7), 0.9),
             (torch.randn(10, 10), 0.123)]  # s * n = 12.3: round() prunes 12, an interpolated quantile 13
    for w, s in cases:
        desc = f"(weight of shape {tuple(w.shape)}, sparsity={s})"
        out = magnitude_mask_fn(w.clone(), s)
        if not torch.is_tensor(out):
            raise CheckFailed(f"return a bool tensor (True = keep), got {type(out).__name__} {desc}")
        expect(out.shape == w.shape, f"the mask must have the weight's shape {tuple(w.shape)}, got {tuple(out.shape)} {desc}")
        if out.dtype != torch.bool:
            raise CheckFailed(f"return a bool mask (e.g. |w| > threshold), got dtype {out.dtype} {desc}")
        ref = magnitude_mask(w, s)
        if not torch.equal(out, ref):
            for name, v in _mask_variants(w, s).items():
                if torch.equal(out, v):
                    raise CheckFailed(f"{_MASK_HINTS[name]} {desc}")
            n = int(round(s * w.numel()))
            got = int((~out).sum())
            if got != n:
                raise CheckFailed(f"prune exactly round(sparsity * numel) = {n} weights, your mask prunes {got} "
                                  f"(an off-by-one at the threshold?) {desc}")
            raise CheckFailed(f"the pruned weights are not the {n} smallest in |w| {desc}")
    w = torch.randn(4, 4)
    out = magnitude_mask_fn(w.clone(), 0.0)
    expect(torch.is_tensor(out) and bool(out.all()), "sparsity 0 must keep every weight (an all-True mask)")


# --------------------------------------------------------------------------------------------
# Exercise 4.2: router restricted to the kept experts
# --------------------------------------------------------------------------------------------
def _router_variants(logits: torch.Tensor, kept: list[int], k: int) -> dict[str, tuple]:
    kept_t = torch.tensor(kept)
    p = torch.softmax(logits, -1)
    mask = torch.zeros_like(p, dtype=torch.bool)
    mask[:, kept_t] = True
    w, i = (p * mask).topk(k, -1)  # softmax over ALL experts, then masking, no renormalisation
    sub_w, sub_i = torch.softmax(logits[:, kept_t], -1).topk(k, -1)
    sub_w = sub_w / sub_w.sum(-1, keepdim=True)
    masked = logits.masked_fill(~mask, float("-inf"))
    nr_w, nr_i = torch.softmax(masked, -1).topk(k, -1)
    return {
        "no_renorm_after_mask": (w, i),
        "renorm_after_mask": (w / w.sum(-1, keepdim=True), i),
        "local_ids": (sub_w, sub_i),
        "no_renorm": (nr_w, nr_i),
    }


_ROUTER_HINTS = {
    "no_renorm_after_mask": "you took the softmax over all experts and then dropped the removed ones: mask the "
                            "removed experts' LOGITS to -inf BEFORE the softmax, then top-k and renormalise",
    "renorm_after_mask": "your indices are right but the weights come from a softmax over all experts; mask the logits "
                         "to -inf before the softmax (the kept experts then share the whole probability mass)",
    "local_ids": "your indices are positions in the kept list (0..len(kept)-1): return the ORIGINAL expert ids "
                 "(e.g. kept[j]), as the router of the unpruned layer would",
    "no_renorm": "the top-k weights must be renormalised to sum to 1 over the k chosen experts",
}


@checker("Exercise 4.2: router restricted to the kept experts")
def check_restrict_router(restrict_router_fn) -> None:
    hand = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, 1.0, 2.0]])
    cases = [(hand, [0, 2, 3], 2), (hand, [1, 2], 1), (torch.randn(32, 8) * 2, [0, 2, 3, 5, 6, 7], 2),
             (torch.randn(16, 8), [1, 4, 6, 7], 2), (torch.randn(10, 6), [0, 1, 2, 3, 4, 5], 2),
             (torch.randn(12, 8), [2, 3, 5], 3)]
    for logits, kept, k in cases:
        desc = f"(logits of shape {tuple(logits.shape)}, kept={kept}, k={k})"
        out = restrict_router_fn(logits.clone(), list(kept), k)
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(torch.is_tensor(t) for t in out)):
            raise CheckFailed(f"return a pair (weights [T, k], indices [T, k]) of tensors {desc}")
        w, i = out
        expect(w.shape == (logits.shape[0], k) and i.shape == (logits.shape[0], k),
               f"weights and indices must have shape [T, k] = [{logits.shape[0]}, {k}], got "
               f"{tuple(w.shape)} and {tuple(i.shape)} {desc}")
        ref_w, ref_i = restrict_router(logits, kept, k)
        if torch.equal(i.long(), ref_i) and torch.allclose(w.float(), ref_w, atol=1e-5):
            continue
        for name, (vw, vi) in _router_variants(logits, kept, k).items():
            if torch.equal(i.long(), vi) and torch.allclose(w.float(), vw, atol=1e-5):
                raise CheckFailed(f"{_ROUTER_HINTS[name]} {desc}")
        if not set(i.reshape(-1).tolist()) <= set(kept):
            raise CheckFailed(f"a removed expert was chosen: only experts in kept={kept} may be routed to {desc}")
        if torch.equal(i.long().sort(-1).values, ref_i.sort(-1).values):
            raise CheckFailed(f"the right experts, but order them by decreasing weight (as topk does) {desc}")
        raise CheckFailed(f"weights/indices differ from the reference (first row: {ref_w[0].tolist()}, "
                          f"{ref_i[0].tolist()}) {desc}")



# --------------------------------------------------------------------------------------------
# Exercise 4.1: n:m semi-structured mask
# --------------------------------------------------------------------------------------------
def nm_mask_reference(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest ``|w|`` of every group of ``m`` consecutive elements of the last dim."""
    groups = weight.abs().reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(n, dim=1).indices, True)
    return keep.view(weight.shape)


def _nm_variants(w: torch.Tensor, n: int, m: int) -> dict[str, torch.Tensor]:
    groups = w.reshape(-1, m)

    def pick(scores, k, largest=True):
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(1, scores.topk(k, dim=1, largest=largest).indices, True)
        return keep.view(w.shape)

    out = {
        "smallest": pick(groups.abs(), n, largest=False),
        "signed": pick(groups, n),
        "prune_n": pick(groups.abs(), m - n) if m - n > 0 else None,
        "global": magnitude_mask(w, 1 - n / m),
    }
    if w.dim() >= 2 and w.shape[-2] % m == 0:
        out["axis"] = nm_mask_reference(w.transpose(-1, -2).contiguous(), n, m).transpose(-1, -2)
    return out


_NM_HINTS = {
    "smallest": "you kept the n SMALLEST |w| of each group: keep the n largest (topk of w.abs())",
    "signed": "you ranked the signed weights: a large negative weight is important too, rank by |w| (w.abs())",
    "prune_n": "you kept m - n weights per group (you pruned n): n:m means KEEP n of every m",
    "global": "that is one threshold over the whole tensor (unstructured): n:m keeps exactly n in EVERY group "
              "of m consecutive weights of the last dimension",
    "axis": "your groups run down the columns: a group is m consecutive elements of the LAST dimension "
            "(reshape to [-1, m])",
}


@checker("Exercise 4.1: n:m semi-structured mask", forbid=("moe_course.compress.sparsity.nm_mask",))
def check_nm_mask(nm_mask) -> None:
    hand = torch.tensor([[0.5, -2.0, 0.1, 1.0, -0.05, 3.0, -0.7, 0.2],
                         [0.3, 0.4, -0.9, 0.05, 1.5, -1.6, 0.01, 0.02]])
    cases = [(hand, 2, 4), (hand, 1, 4), (torch.randn(16, 12), 2, 4), (torch.randn(8, 32), 1, 2),
             (torch.randn(3, 8, 16) * torch.linspace(0.1, 3, 16), 2, 8), (torch.randn(6, 8), 3, 4),
             (torch.randn(4, 8), 4, 4)]
    for w, n, m in cases:
        desc = f"(weight of shape {tuple(w.shape)}, n={n}, m={m})"
        out = nm_mask(w.clone(), n, m)
        if not torch.is_tensor(out):
            raise CheckFailed(f"return a bool tensor (True = keep), got {describe(out)} {desc}")
        expect(out.shape == w.shape, f"the mask must have the weight's shape {tuple(w.shape)}, got "
                                     f"{tuple(out.shape)} {desc}")
        if out.dtype != torch.bool:
            raise CheckFailed(f"return a bool mask, got dtype {str(out.dtype).replace('torch.', '')} {desc}")
        ref = nm_mask_reference(w, n, m)
        if torch.equal(out, ref):
            continue
        for name, v in _nm_variants(w, n, m).items():
            if v is not None and torch.equal(out, v):
                raise CheckFailed(f"{_NM_HINTS[name]} {desc}")
        if w.dim() >= 2 and bool((out.transpose(-1, -2).reshape(-1, m).sum(1) == n).all()):
            raise CheckFailed(f"{_NM_HINTS['axis']} {desc}")
        per_group = (out.reshape(-1, m)).sum(1)
        if not bool((per_group == n).all()):
            raise CheckFailed(f"every group of {m} consecutive weights must keep exactly {n}; one of yours keeps "
                              f"{int(per_group[per_group != n][0])} {desc}")
        raise CheckFailed(f"each group keeps {n}, but not the {n} largest |w| of the group {desc}")


# --------------------------------------------------------------------------------------------
# Shared: the zoo model the two model exercises run on
# --------------------------------------------------------------------------------------------
_ZOO: dict = {}
NM_VAL_BLOCKS = 32
NM_TOLERANCE = 0.01        # absolute, on perplexities around 7-8
GLOBAL_TOTAL = 24          # experts kept over the 4 layers: as many as 6 of 8 per layer
GLOBAL_VAL_BLOCKS = 128
GLOBAL_MARGIN = 0.15       # the learner's perplexity must be 15 % below frequency pruning's
_EXPERT_MATS = ("w_in", "w_gate", "w_out")


def zoo_model():
    """``shakespeare-moe``, its calibration blocks (32 shuffled training blocks, as in the chapter)
    and validation set."""
    if not _ZOO:
        from moe_course import zoo
        data = zoo.data("shakespeare-moe")
        _ZOO["lm"] = zoo.pretrained("shakespeare-moe", progress=False).cpu().eval()
        _ZOO["calib"] = data["train"].shuffle(seed=0).select(range(32))
        _ZOO["val"] = data["validation"]
    return _ZOO["lm"], _ZOO["calib"], _ZOO["val"]


def _perplexity(model, val) -> float:
    from moe_course.train import evaluate
    return float(evaluate(model, val, batch_size=128)["perplexity"])


def _masked_copy(model, n: int, m: int, axis: str = "input", names=_EXPERT_MATS):
    import copy

    from moe_course.layers import moe_layers
    out = copy.deepcopy(model)
    with torch.no_grad():
        for layer in moe_layers(out):
            for name in names:
                w = getattr(layer.experts, name, None)
                if w is None:
                    continue
                if axis == "input":
                    w.mul_(nm_mask_reference(w.transpose(1, 2), n, m).transpose(1, 2))
                else:
                    w.mul_(nm_mask_reference(w, n, m))
    return out


# --------------------------------------------------------------------------------------------
# Exercise 4.3 (use it): 2:4 sparsity on the Shakespeare model
# --------------------------------------------------------------------------------------------
@checker("Exercise 4.3: 2:4 sparsity on the Shakespeare model", timeout=180,
         forbid=("moe_course.compress.sparsity.nm_mask", "moe_course.compress.sparsity.sparsify"))
def check_nm_prune(nm_prune) -> None:
    """``nm_prune(model, n, m) -> new model``: every expert matrix masked by the learner's n:m mask
    along the input dimension; then validation perplexity at 2:4 and 1:4."""
    import copy

    from moe_course.compress.pruning import prune_magnitude
    from moe_course.layers import moe_layers
    pristine, _, val_all = zoo_model()
    val = val_all.select(range(NM_VAL_BLOCKS))
    lm = copy.deepcopy(pristine)
    before = {k: v.detach().clone() for k, v in lm.state_dict().items()}
    out = nm_prune(lm, 2, 4)
    expect(isinstance(out, torch.nn.Module), f"return the pruned model (an nn.Module), got {describe(out)}")
    expect(out is not lm, "you returned the input model itself: prune a copy (copy.deepcopy(model)) so that "
                          "the original stays as it is")
    changed = [k for k, v in lm.state_dict().items() if not torch.equal(v, before[k])]
    if changed:
        raise CheckFailed(f"your function modified the input model ({changed[0]}): prune a copy "
                          "(copy.deepcopy(model)) and leave the original as it is")
    ref = _masked_copy(pristine, 2, 4)
    wrong_axis = _masked_copy(pristine, 2, 4, axis="output")
    for i, (got_layer, ref_layer, ax_layer, orig) in enumerate(zip(moe_layers(out), moe_layers(ref),
                                                                   moe_layers(wrong_axis),
                                                                   moe_layers(pristine))):
        for name in _EXPERT_MATS:
            r = getattr(ref_layer.experts, name, None)
            if r is None:
                continue
            w = getattr(got_layer.experts, name).detach()
            where = f"(layer {i}, experts.{name}, n=2, m=4)"
            if torch.equal(w, r):
                continue
            if torch.equal(w, getattr(orig.experts, name).detach()):
                raise CheckFailed(f"experts.{name} of layer {i} is unchanged: mask every expert matrix of every "
                                  f"MoE layer, w_in, w_gate AND w_out {where}")
            if torch.equal(w, getattr(ax_layer.experts, name)):
                raise CheckFailed("your groups run along the wrong axis: a group is 4 consecutive weights that "
                                  "feed one OUTPUT, along the INPUT dimension; experts store w_in as "
                                  "[N, d_in, d_out], so mask w.transpose(1, 2) and transpose back " + where)
            zeros = float((w == 0).float().mean())
            raise CheckFailed(f"the masked weights differ from your nm_mask applied to w.transpose(1, 2) "
                              f"(the weights kept as they are, the others set to 0); {zeros:.0%} of yours are "
                              f"zero, 2:4 gives 50% {where}")
    for (name, p), (_, q) in zip(out.state_dict().items(), ref.state_dict().items()):
        if "experts" not in name and not torch.equal(p, q):
            raise CheckFailed(f"`{name}` changed: prune only the experts (routers, attention and embeddings "
                              "stay as they are)")
    lines = []
    for n in (2, 1):
        got = _perplexity(out if n == 2 else nm_prune(copy.deepcopy(pristine), n, 4), val)
        want = _perplexity(ref if n == 2 else _masked_copy(pristine, n, 4), val)
        expect(abs(got - want) <= NM_TOLERANCE, f"at {n}:4 your model's perplexity is {got:.3f}, the "
                                                f"reference's {want:.3f} (tolerance {NM_TOLERANCE})")
        unstructured = _perplexity(prune_magnitude(pristine, n / 4, scope="layer"), val)
        lines.append(f"{n}:4 -> {got:.3f} (unstructured {1 - n / 4:.0%} per layer: {unstructured:.3f})")
    print(f"shakespeare-moe, {NM_VAL_BLOCKS} validation blocks, dense perplexity "
          f"{_perplexity(pristine, val):.3f}; with your mask: " + "; ".join(lines))


# --------------------------------------------------------------------------------------------
# Exercise 4.4 (build a method): global expert pruning under one budget
# --------------------------------------------------------------------------------------------
def _layer_scores(model, calib) -> dict[str, list[torch.Tensor]]:
    """Per-layer expert scores of the usual attempts, to name the one a learner's choice matches."""
    from moe_course.calib import layer_inputs
    from moe_course.layers import moe_layers
    out: dict[str, list[torch.Tensor]] = {"contribution": [], "frequency": [], "probability": [],
                                          "gate": []}
    with torch.no_grad():
        for layer, x in zip(moe_layers(model), layer_inputs(model, calib)):
            r = layer.router(x)
            n = layer.num_experts
            gate = torch.zeros(len(x), n).scatter(1, r.indices, r.weights)
            norms = layer.experts.forward_all(x).norm(dim=-1)            # [N, T]
            out["contribution"].append((gate.T * norms).mean(1))
            out["frequency"].append(torch.bincount(r.indices.reshape(-1), minlength=n).float())
            out["probability"].append(torch.softmax(r.logits, -1).mean(0))
            out["gate"].append(gate.mean(0))
    out["normalised"] = [s / s.sum() for s in out["contribution"]]
    return out


def global_kept(scores: list[torch.Tensor], total: int, k: int) -> list[list[int]]:
    """Drop the lowest-scoring experts over all layers until ``total`` remain, keeping >= k per layer."""
    kept = [set(range(len(s))) for s in scores]
    order = sorted((float(s[e]), layer, e) for layer, s in enumerate(scores) for e in range(len(s)))
    drop = sum(len(s) for s in scores) - total
    for _, layer, e in order:
        if drop == 0:
            break
        if len(kept[layer]) > k:
            kept[layer].discard(e)
            drop -= 1
    return [sorted(s) for s in kept]


def _kept_ids(orig_layer, new_layer) -> list[int] | None:
    """Which original experts a pruned layer holds (None when its tensors are not copies of some)."""
    ids = []
    w0 = orig_layer.experts.w_in.detach()
    for w in new_layer.experts.w_in.detach():
        hits = [i for i in range(len(w0)) if w.shape == w0[i].shape and torch.equal(w, w0[i])]
        if len(hits) != 1:
            return None
        ids.append(hits[0])
    return ids


_GLOBAL_HINTS = {
    "uniform": "every layer keeps the same number of experts: that is the chapter's per-layer pruning; the "
               "exercise asks for ONE budget shared by all layers, so a layer whose experts add little can "
               "lose more of them and a sensitive layer can keep all of its experts",
    "normalised": "your scores look normalised within each layer (shares that sum to 1 per layer): those are "
                  "not comparable across layers; rank the raw contributions (gate weight times output norm, "
                  "averaged over the calibration tokens) of all layers on one list",
    "frequency": "you ranked by routing frequency: the load-balancing loss makes frequencies nearly equal in "
                 "every layer, so a global ranking by frequency cuts layers almost at random; score what an "
                 "expert ADDS to the residual stream (gate weight times the norm of its output)",
    "probability": "you ranked by mean router probability: like frequency it says how often an expert is "
                   "picked, not how much it adds; multiply the gate weight by the norm of the expert's output",
    "gate": "you ranked by the mean gate weight alone: it says how strongly an expert is picked, not how much "
            "it adds; multiply each token's gate weight by the norm of the expert's output on that token",
}


@checker("Exercise 4.4: global expert pruning under one budget", timeout=240,
         forbid=("moe_course.compress.trimming.drop_experts", "moe_course.compress.trimming.expert_scores"))
def check_global_prune(global_prune) -> None:
    """``global_prune(model, calib, total) -> new model`` with ``total`` experts kept over all layers
    (at least k per layer, experts and router rows physically removed); its validation perplexity
    must beat per-layer frequency pruning at the same total by :data:`GLOBAL_MARGIN`."""
    import copy

    from moe_course.compress.pruning import prune_experts
    from moe_course.layers import moe_layers
    pristine, calib, val_all = zoo_model()
    val = val_all.select(range(GLOBAL_VAL_BLOCKS))
    lm = copy.deepcopy(pristine)
    before = {k: v.detach().clone() for k, v in lm.state_dict().items()}
    out = global_prune(lm, calib, GLOBAL_TOTAL)
    expect(isinstance(out, torch.nn.Module), f"return the pruned model (an nn.Module), got {describe(out)}")
    changed = [k for k, v in lm.state_dict().items() if not torch.equal(v, before[k])]
    expect(out is not lm and not changed,
           "your function modified the input model" + (f" ({changed[0]})" if changed else "") +
           ": prune a copy (copy.deepcopy(model)) and leave the original as it is")
    layers, orig = moe_layers(out), moe_layers(pristine)
    expect(len(layers) == len(orig), f"the pruned model has {len(layers)} MoE layers, the original {len(orig)}")
    counts = [layer.num_experts for layer in layers]
    sizes = [int(layer.experts.w_in.shape[0]) for layer in layers]
    if sizes != counts or sizes == [o.num_experts for o in orig]:
        raise CheckFailed(f"the expert tensors must shrink: keep_experts (or your own copy of the kept slices) "
                          f"removes the experts AND their router rows; your layers hold {sizes} experts of "
                          f"{[o.num_experts for o in orig]}")
    rows = [int(layer.router.gate.weight.shape[0]) for layer in layers]
    expect(rows == counts, f"the routers must lose the removed experts' rows too: router rows {rows}, "
                           f"experts {counts}")
    expect(sum(counts) == GLOBAL_TOTAL, f"your model keeps {sum(counts)} experts in total ({counts} per layer); "
                                        f"the budget is total={GLOBAL_TOTAL}")
    k = orig[0].k
    small = [i for i, c in enumerate(counts) if c < k]
    expect(not small, f"layer {small[0] if small else 0} keeps {min(counts)} expert(s): every layer must keep at "
                      f"least k={k}, or its router cannot choose k experts")
    kept = [_kept_ids(o, n) for o, n in zip(orig, layers)]
    expect(all(ids is not None for ids in kept), "the kept experts must be copies of original experts (their "
                                                 "w_in slices unchanged)")
    got = _perplexity(out, val)
    freq = _perplexity(prune_experts(pristine, GLOBAL_TOTAL // len(orig), calib=calib, method="frequency"), val)
    target = (1 - GLOBAL_MARGIN) * freq
    print(f"shakespeare-moe, {GLOBAL_VAL_BLOCKS} validation blocks: dense {_perplexity(pristine, val):.3f}; "
          f"{GLOBAL_TOTAL} of {sum(o.num_experts for o in orig)} experts kept ({counts} per layer): yours "
          f"{got:.3f}, frequency per layer {freq:.3f}, target <= {target:.3f}")
    if got <= target:
        small_total = 10
        few = global_prune(copy.deepcopy(pristine), calib, small_total)
        expect(isinstance(few, torch.nn.Module), f"with total={small_total} your function returned {describe(few)}")
        few_counts = [layer.num_experts for layer in moe_layers(few)]
        expect(sum(few_counts) == small_total, f"with total={small_total} your model keeps {sum(few_counts)} experts "
                                               f"({few_counts} per layer); the budget is total={small_total}")
        expect(min(few_counts) >= k, f"with total={small_total} a layer keeps {min(few_counts)} expert(s) "
                                     f"({few_counts} per layer): every layer must keep at least k={k}, or its router "
                                     "cannot choose k experts; skip an expert whose layer is down to k")
        return
    if len(set(counts)) == 1:
        raise CheckFailed(_GLOBAL_HINTS["uniform"])
    scores = _layer_scores(pristine, calib)
    for name in ("normalised", "frequency", "probability", "gate"):
        if kept == global_kept(scores[name], GLOBAL_TOTAL, k):
            raise CheckFailed(_GLOBAL_HINTS[name])
    raise CheckFailed(f"perplexity {got:.3f} misses the target {target:.3f} ({GLOBAL_MARGIN:.0%} below frequency "
                      f"pruning at the same {GLOBAL_TOTAL} experts); score each expert by what it adds to the "
                      "residual stream on the calibration tokens and rank all layers on one list")
