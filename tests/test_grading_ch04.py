"""Chapter 4 checkers: the reference passes, typical mistakes are caught (stubs: test_grading_scaffold.py)."""

from __future__ import annotations

import torch
from conftest import run

from moe_course.grading import ch04
from moe_course.grading.core import ERROR, FAIL, PASS


# ---------------------------------------------------------------- Exercise 4.1
def magnitude_mask(weight, sparsity):
    n = int(round(sparsity * weight.numel()))
    mask = torch.ones(weight.numel(), dtype=torch.bool)
    mask[weight.abs().reshape(-1).argsort()[:n]] = False
    return mask.view(weight.shape)


def test_mask_reference_passes():
    assert run(ch04.check_magnitude_mask, magnitude_mask).status == PASS


def test_mask_package_passes():
    from moe_course.compress.pruning import magnitude_mask as ref

    assert run(ch04.check_magnitude_mask, ref).status == PASS


def test_mask_signed_caught():
    def signed(w, s):
        n = int(round(s * w.numel()))
        m = torch.ones(w.numel(), dtype=torch.bool)
        m[w.reshape(-1).argsort()[:n]] = False
        return m.view(w.shape)

    r = run(ch04.check_magnitude_mask, signed)
    assert r.status == FAIL and "|w|" in r.message


def test_mask_inverted_caught():
    r = run(ch04.check_magnitude_mask, lambda w, s: ~magnitude_mask(w, s))
    assert r.status == FAIL and "inverted" in r.message


def test_mask_float_and_threshold_off_by_one_caught():
    r = run(ch04.check_magnitude_mask, lambda w, s: magnitude_mask(w, s).float())
    assert r.status == FAIL and "bool" in r.message

    def quantile(w, s):  # threshold at a quantile: counts are off by interpolation
        return w.abs() > torch.quantile(w.abs().reshape(-1), s)

    assert run(ch04.check_magnitude_mask, quantile).status in (FAIL, ERROR)


# ---------------------------------------------------------------- Exercise 4.2
def restrict_router(logits, kept, k):
    masked = torch.full_like(logits, float("-inf"))
    masked[:, kept] = logits[:, kept]
    w, i = torch.softmax(masked, -1).topk(k, -1)
    return w / w.sum(-1, keepdim=True), i


def test_router_reference_passes():
    assert run(ch04.check_restrict_router, restrict_router).status == PASS


def test_router_softmax_before_mask_caught():
    def wrong(logits, kept, k):
        p = torch.softmax(logits, -1)
        m = torch.zeros_like(p)
        m[:, kept] = 1
        return (p * m).topk(k, -1)

    r = run(ch04.check_restrict_router, wrong)
    assert r.status == FAIL and "-inf" in r.message


def test_router_local_ids_caught():
    def wrong(logits, kept, k):
        w, i = torch.softmax(logits[:, kept], -1).topk(k, -1)
        return w / w.sum(-1, keepdim=True), i

    r = run(ch04.check_restrict_router, wrong)
    assert r.status == FAIL and "ORIGINAL" in r.message


def test_router_no_renorm_and_crash_caught():
    def no_renorm(logits, kept, k):
        masked = torch.full_like(logits, float("-inf"))
        masked[:, kept] = logits[:, kept]
        return torch.softmax(masked, -1).topk(k, -1)

    r = run(ch04.check_restrict_router, no_renorm)
    assert r.status == FAIL and "renormalised" in r.message
    assert run(ch04.check_restrict_router, lambda logits, kept, k: logits.topk(k)[5]).status == ERROR


# ---------------------------------------------------------------- Exercise 4.1 (n:m mask)
def nm_mask(weight, n, m):
    groups = weight.abs().reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.argsort(dim=1, descending=True)[:, :n], True)
    return keep.view(weight.shape)


def test_nm_mask_reference_passes():
    assert run(ch04.check_nm_mask, nm_mask).status == PASS


def test_nm_mask_smallest_and_unstructured_caught():
    r = run(ch04.check_nm_mask, lambda w, n, m: ~nm_mask(w, m - n, m) if m > n else nm_mask(w, n, m))
    assert r.status == FAIL and "smallest" in r.message.lower()
    from moe_course.compress.pruning import magnitude_mask

    r = run(ch04.check_nm_mask, lambda w, n, m: magnitude_mask(w, 1 - n / m))
    assert r.status == FAIL and "every group" in r.message.lower()


# ---------------------------------------------------------------- Exercise 4.4 (build a method)
def _global_prune(model, calib, total):
    """The solution's method: rank every expert of every layer by gate weight x output norm."""
    import copy

    from moe_course.calib import layer_inputs
    from moe_course.compress.pruning import keep_experts
    from moe_course.layers import moe_layers

    model = copy.deepcopy(model)
    layers = moe_layers(model)
    scores = []
    with torch.no_grad():
        for layer, x in zip(layers, layer_inputs(model, calib)):
            r = layer.router(x)
            gate = torch.zeros(len(x), layer.num_experts).scatter(1, r.indices, r.weights)
            scores.append((gate.T * layer.experts.forward_all(x).norm(dim=-1)).mean(1))
    kept = ch04.global_kept(scores, total, layers[0].k)
    for layer, ids in zip(layers, kept):
        keep_experts(layer, ids)
    return model


def test_global_prune_reference_meets_the_target():
    assert run(ch04.check_global_prune, _global_prune).status == PASS


def test_global_prune_weak_attempt_misses_the_target():
    """Per-layer frequency pruning (the chapter's method) keeps the budget but not the target."""
    from moe_course.compress.pruning import prune_experts

    r = run(ch04.check_global_prune, lambda m, c, t: prune_experts(m, t // 4, calib=c, method="frequency"))
    assert r.status == FAIL and "same number" in r.message


def test_global_prune_may_not_call_the_trimming_chapter():
    from moe_course.compress import trimming

    r = run(ch04.check_global_prune, lambda m, c, t: trimming.drop_experts(m, t, calib=c, scope="global"))
    assert r.status == FAIL and "package's own" in r.message
