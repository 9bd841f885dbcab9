"""Checkers for chapter 9, trimming: the best contiguous run of blocks (9.1), the perplexity after
dropping it on the trained Shakespeare model (9.2, "use it"), and a whole method, global expert
drop under one budget of kept experts, graded on the same model against uniform per-layer drop
(9.3). The layer-drop similarity checker (an earlier exercise) stays available.

Each checker compares the student's function with the package's reference
(:mod:`moe_course.compress.trimming`) on hand-made, random and edge cases or on the zoo model, and
recognises the usual wrong answers so that the hint names the mistake.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_course.compress.trimming import best_contiguous_run, residual_similarity

from .core import CheckFailed, checker, describe, expect

__all__ = ["check_residual_similarity", "check_best_contiguous_run", "check_run_drop_perplexity",
           "check_global_expert_drop", "shakespeare"]


# --------------------------------------------------------------------------------------------
# The layer-drop similarity of an MoE sub-layer (an earlier exercise, still available)
# --------------------------------------------------------------------------------------------
def _sim_variants(h: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    h, out = h.double(), out.double()
    return {
        "no_residual": float(F.cosine_similarity(h, out, dim=-1).mean()),
        "wrong_dim": float(F.cosine_similarity(h, h + out, dim=0).mean()),
        "flattened": float(F.cosine_similarity(h.reshape(1, -1), (h + out).reshape(1, -1), dim=-1).mean()),
        "distance": 1.0 - float(F.cosine_similarity(h, h + out, dim=-1).mean()),
        "minus": float(F.cosine_similarity(h, h - out, dim=-1).mean()),
    }


_SIM_HINTS = {
    "no_residual": "you compared h with the layer's OUTPUT: compare h with h + out (the hidden state after the "
                   "residual update); a layer that outputs zero must have similarity 1",
    "wrong_dim": "you took the cosine along the token dimension (dim=0): take it per token along the feature "
                 "dimension (dim=-1), then average over tokens",
    "flattened": "you took one cosine between the flattened matrices: take one cosine per token (dim=-1), then the mean",
    "distance": "that is 1 - similarity (a cosine distance): return the mean cosine SIMILARITY, which is 1 for a "
                "layer that changes nothing",
    "minus": "the residual update ADDS the layer's output: compare h with h + out, not h - out",
}


def _as_float(v, desc):
    if torch.is_tensor(v):
        if v.numel() != 1:
            raise CheckFailed(f"return one number (the MEAN over tokens), got a tensor of shape {tuple(v.shape)} "
                              f"(did you forget .mean()?) {desc}")
        v = v.item()
    if not isinstance(v, (int, float)):
        raise CheckFailed(f"return a float, got {type(v).__name__} {desc}")
    return float(v)


@checker("Layer drop: residual similarity")
def check_residual_similarity(residual_similarity_fn) -> None:
    g = torch.Generator().manual_seed(9)
    h0 = torch.randn(12, 6, generator=g)
    cases = [(h0, 0.3 * torch.randn(12, 6, generator=g), "small output"),
             (h0, torch.randn(12, 6, generator=g) * torch.linspace(0.1, 3, 12)[:, None], "mixed sizes"),
             (torch.randn(40, 16, generator=g), torch.randn(40, 16, generator=g), "random"),
             (h0, torch.zeros_like(h0), "zero output")]
    for h, out, what in cases:
        desc = f"(h and out of shape {tuple(h.shape)}, {what})"
        got = _as_float(residual_similarity_fn(h.clone(), out.clone()), desc)
        ref = residual_similarity(h, out)
        if not math.isclose(got, ref, rel_tol=1e-4, abs_tol=1e-5):
            for name, v in _sim_variants(h, out).items():
                if math.isclose(got, v, rel_tol=1e-4, abs_tol=1e-5):
                    raise CheckFailed(f"{_SIM_HINTS[name]} {desc}")
            raise CheckFailed(f"expected mean_t cos(h_t, h_t + out_t) = {ref:.5f}, got {got:.5f} {desc}")
    got = _as_float(residual_similarity_fn(h0, torch.zeros_like(h0)), "(zero output)")
    expect(math.isclose(got, 1.0, abs_tol=1e-5), "a layer whose output is zero leaves h unchanged: similarity 1")


# --------------------------------------------------------------------------------------------
# Exercise 9.1: best contiguous run of blocks to drop
# --------------------------------------------------------------------------------------------
def _mean_cos(a, b):
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).mean())


def _hidden_cases():
    g = torch.Generator().manual_seed(19)
    h = torch.randn(16, 8, generator=g)
    # blocks 2 and 3 barely change h: the best run of 2 starts at 2, of 1 at 2 or 3
    planted = [torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g), h,
               h + 0.01 * torch.randn(16, 8, generator=g), h + 0.02 * torch.randn(16, 8, generator=g),
               torch.randn(16, 8, generator=g)]
    cases = [(planted, 2), (planted, 1), (planted, 3)]
    base = torch.randn(16, 8, generator=g)
    walk = [base]
    for i in range(6):  # a random walk: steps of different sizes
        walk.append(walk[-1] + (0.2 + i % 3) * torch.randn(16, 8, generator=g))
    cases += [(walk, 1), (walk, 2), (walk, 4), (walk, 6)]
    # A run that drifts away and comes back: block 0 moves h far away, block 1 brings it back, so the run
    # 0..1 leaves h unchanged although each of its blocks changes it a lot; blocks 3..5 each change h a
    # little, but add up to a larger change. The endpoints decide.
    a = torch.randn(16, 8, generator=g)
    drift = [torch.randn(16, 8, generator=g)]
    for _ in range(3):
        drift.append(drift[-1] + 0.45 * torch.randn(16, 8, generator=g))
    back = [a, torch.randn(16, 8, generator=g), a + 0.01 * torch.randn(16, 8, generator=g)] + drift
    cases += [(back, 2)]
    # The best run is the LAST one (start L - n), again one that comes back.
    d = torch.randn(16, 8, generator=g)
    last = [torch.randn(16, 8, generator=g) for _ in range(3)] + [d, torch.randn(16, 8, generator=g),
                                                                  d + 0.01 * torch.randn(16, 8, generator=g)]
    cases += [(last, 2)]
    return cases


def _tie_case():
    """Every block is the identity: all runs tie exactly, and the earliest (b = 0) wins."""
    h = torch.randn(16, 8, generator=torch.Generator().manual_seed(29))
    return [h.clone() for _ in range(5)], 2


@checker("Exercise 9.1: best contiguous run of blocks",
         forbid=("moe_course.compress.trimming.best_contiguous_run",))
def check_best_contiguous_run(best_run_fn) -> None:
    tie_hidden, tie_n = _tie_case()
    for hidden, n in _hidden_cases() + [(tie_hidden, tie_n)]:
        L = len(hidden) - 1
        desc = f"({L} blocks, n={n})"
        got = best_run_fn([x.clone() for x in hidden], n)
        if torch.is_tensor(got):
            got = got.item()
        if isinstance(got, tuple):
            raise CheckFailed(f"return only the start index b (an int), got a tuple {desc}")
        if not isinstance(got, int):
            raise CheckFailed(f"return the start index b as an int, got {type(got).__name__} {desc}")
        ref, _ = best_contiguous_run(hidden, n)
        sims = [_mean_cos(hidden[b], hidden[b + n]) for b in range(L - n + 1)]
        if 0 <= got < len(sims) and got > ref and sims[got] == sims[ref]:
            raise CheckFailed(f"b = {got} and b = {ref} are equally good (similarity {sims[ref]:.4f}): ties go to the "
                              f"EARLIEST run, b = {ref} (max() and torch.argmax return the first maximum; a loop "
                              f"needs >, not >=) {desc}")
        if got == ref or (0 <= got < len(sims) and math.isclose(sims[got], sims[ref], abs_tol=1e-9)):
            continue
        if not 0 <= got <= L - n:
            raise CheckFailed(f"b = {got} is not a valid start: a run of n blocks starts at 0 .. L - n = {L - n} {desc}")
        if ref == L - n and got == max(range(L - n), key=lambda b: sims[b]):
            raise CheckFailed(f"the last run, starting at b = L - n = {L - n}, is a candidate too (and the best here): "
                              f"try b in range(L - n + 1) {desc}")
        steps = [_mean_cos(hidden[b], hidden[b + 1]) for b in range(L)]
        for pool in (sum, min):
            score = [pool(steps[b:b + n]) for b in range(L - n + 1)]
            if n > 1 and got == max(range(len(score)), key=lambda b: score[b]):
                raise CheckFailed(f"you scored the run by its blocks one at a time ({pool.__name__} of the "
                                  f"per-block similarities); a run is judged by its endpoints, mean_t "
                                  f"cos(h_b, h_(b+n)): the blocks of a run may move h away and back {desc}")
        off = [_mean_cos(hidden[b], hidden[b + n - 1]) for b in range(L - n + 2)]
        if got == max(range(len(off)), key=lambda b: off[b]) and (n > 1 or got == 0):
            raise CheckFailed(f"off by one: a run of n blocks b .. b+n-1 takes h_b to h_(b+n), compare hidden[b] "
                              f"with hidden[b + n], not hidden[b + n - 1] {desc}")
        worst = min(range(len(sims)), key=lambda b: sims[b])
        if got == worst:
            raise CheckFailed(f"you picked the run with the LOWEST similarity: drop the run whose input and output "
                              f"are MOST similar (argmax) {desc}")
        raise CheckFailed(f"expected b = {ref} (similarity {sims[ref]:.4f}), got b = {got} "
                          f"(similarity {sims[got]:.4f}) {desc}")


# --------------------------------------------------------------------------------------------
# The trained Shakespeare model, its calibration and a validation subset (9.2 and 9.3)
# --------------------------------------------------------------------------------------------
_LM: dict = {}
VAL_SEQUENCES = 128


def shakespeare() -> tuple[nn.Module, object, object]:
    """``(model, calib, val)``: a fresh copy of the trained ``shakespeare-moe`` model (CPU, eval),
    the chapter's calibration set (32 training sequences, seed 0) and the first
    ``VAL_SEQUENCES`` validation sequences (the exercises' quality set)."""
    if not _LM:
        from moe_course import zoo

        data = zoo.data("shakespeare-moe")
        _LM.update(model=zoo.pretrained("shakespeare-moe", progress=False).cpu().eval(),
                   calib=data["train"].shuffle(seed=0).select(range(32)),
                   val=data["validation"].select(range(VAL_SEQUENCES)))
    return copy.deepcopy(_LM["model"]), _LM["calib"], _LM["val"]


def _ppl(model, val) -> float:
    from moe_course.train import evaluate

    return float(evaluate(model, val, batch_size=128)["perplexity"])


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model, before) -> bool:
    now = model.state_dict()
    return set(now) == set(before) and all(now[k].shape == v.shape and torch.equal(now[k], v)
                                           for k, v in before.items())


_REF: dict = {}


def _reference(key, make):
    if key not in _REF:
        _REF[key] = make()
    return _REF[key]


# --------------------------------------------------------------------------------------------
# Exercise 9.2 (use it): perplexity after dropping the best contiguous run of blocks
# --------------------------------------------------------------------------------------------
def _run_variants(model, calib, val, n) -> dict[str, float]:
    """Perplexities of the usual wrong answers (kept separate from the right one)."""
    from moe_course.compress import trimming as T

    hidden = T.block_hidden_states(model, calib)
    L = len(model.blocks)
    sims = [T.block_similarity(hidden[b], hidden[b + n]) for b in range(L - n + 1)]
    best = max(range(len(sims)), key=sims.__getitem__)
    worst = min(range(len(sims)), key=sims.__getitem__)

    def without(start, count):
        m = copy.deepcopy(model)
        del m.blocks[start:start + count]
        return _ppl(m, val)

    out = {"original": _ppl(model, val), "log": math.log(without(best, n))}
    if best + n + 1 <= L:
        out["n_plus_one"] = without(best, n + 1)
    if worst != best:
        out["worst"] = without(worst, n)
    return out


_RUN_HINTS = {
    "original": "that is the perplexity of the ORIGINAL model: remove the blocks b .. b+n-1 from a copy "
                "(`m = copy.deepcopy(model); del m.blocks[b:b + n]`) before evaluating it",
    "log": "that is the mean cross-entropy LOSS (log perplexity): return the perplexity, exp(loss), as "
           "evaluate(...)['perplexity'] gives it",
    "n_plus_one": "you removed n + 1 blocks: `del m.blocks[b:b + n]` removes exactly blocks b .. b+n-1",
    "worst": "you removed the run whose input and output are LEAST alike: drop the run your "
             "best_contiguous_run picks (the largest similarity)",
}


@checker("Exercise 9.2 (use it): perplexity after a block drop", timeout=300)
def check_run_drop_perplexity(run_drop_fn) -> None:
    """``run_drop_perplexity(model, calib, val, n) -> float``: choose the run of ``n`` blocks with the
    student's best_contiguous_run on the hidden states of ``calib``, remove it from a copy of the
    model, return the validation perplexity. Graded on shakespeare-moe, n = 2 then n = 1, against
    ``drop_blocks(..., contiguous=True)`` (relative tolerance 0.5 %)."""
    from moe_course.compress import trimming as T

    model, calib, val = shakespeare()
    L = len(model.blocks)
    for n in (2, 1):
        before = _state(model)
        got = run_drop_fn(model, calib, val, n)
        desc = f"(shakespeare-moe, n = {n}, {VAL_SEQUENCES} validation sequences)"
        expect(_unchanged(model, before) and len(model.blocks) == L,
               f"your function changed the model it was given: remove the blocks from a copy "
               f"(copy.deepcopy(model)) and leave the original whole {desc}")
        if torch.is_tensor(got) and got.numel() == 1:
            got = got.item()
        expect(isinstance(got, (int, float)) and not isinstance(got, bool),
               f"return the perplexity as a float, got {describe(got)} {desc}")
        want = _reference(("run", n), lambda: _ppl(T.drop_blocks(model, keep=L - n, calib=calib,
                                                                  contiguous=True), val))
        if math.isclose(got, want, rel_tol=5e-3):
            if n == 2:
                print(f"shakespeare-moe without its best run of 2 blocks: perplexity {got:.3f} "
                      f"(reference {want:.3f}; the whole model: "
                      f"{_reference('full', lambda: _ppl(model, val)):.3f})")
            continue
        variants = _reference(("run variants", n), lambda: _run_variants(model, calib, val, n))
        for name, v in variants.items():
            if math.isclose(got, v, rel_tol=5e-3):
                raise CheckFailed(f"{_RUN_HINTS[name]} {desc}")
        raise CheckFailed(f"expected a perplexity of {want:.3f} after dropping the best run, got {got:.4g}: "
                          f"use hidden = T.block_hidden_states(model, calib), your best_contiguous_run(hidden, "
                          f"n), then evaluate(m, val, batch_size=128)['perplexity'] {desc}")


# --------------------------------------------------------------------------------------------
# Exercise 9.3 (whole method): global expert drop under one budget of kept experts
# --------------------------------------------------------------------------------------------
TARGET = 0.8    # the global drop must reach at most 80 % of uniform per-layer drop's perplexity
BUDGET = 16     # of 32 experts: the uniform drop keeps 4 per layer


def _kept_ids(original, dropped) -> list[list[int] | None]:
    """Per MoE layer, which original experts the dropped model kept (matched by their weights)."""
    from moe_course.layers import moe_layers

    out = []
    for lo, ld in zip(moe_layers(original), moe_layers(dropped)):
        w0, w1 = lo.experts.w_in.detach(), getattr(ld.experts, "w_in", None)
        if w1 is None:
            out.append(None)
            continue
        ids = []
        for e in range(w1.shape[0]):
            hit = [i for i in range(w0.shape[0]) if w0[i].shape == w1[e].shape and torch.equal(w0[i], w1[e].detach())]
            ids.append(hit[0] if hit else None)
        out.append(None if None in ids else sorted(ids))
    return out


def _global_plans(scores, budget, k):
    """Kept ids per layer for the usual methods, from the mean router probabilities."""
    L = len(scores)
    order = [s.argsort(descending=True, stable=True).tolist() for s in scores]
    uniform = [sorted(o[:budget // L]) for o in order]

    def ranked_global(sign, min_k):
        kept = [[e for e in sorted(range(len(s)), key=lambda e: -sign * float(s[e]))[:k]] if min_k else []
                for s in scores]
        rest = sorted(((sign * float(s[e]), l, e) for l, s in enumerate(scores) for e in range(len(s))
                       if e not in kept[l]), reverse=True)
        for _, l, e in rest[:budget - sum(len(x) for x in kept)]:
            kept[l].append(e)
        return [sorted(x) for x in kept]

    return {"uniform": uniform, "lowest": ranked_global(-1.0, True), "no_min_k": ranked_global(1.0, False),
            "mean_prob": ranked_global(1.0, True)}


_GLOBAL_HINTS = {
    "uniform": "you kept the same number of experts (budget / L) in every layer: that is the uniform "
               "per-layer drop this exercise must beat; rank the experts of ALL layers together and give "
               "the budget to the best ones wherever they are (each layer keeping at least k)",
    "lowest": "you kept the experts with the LOWEST scores: keep the most used ones (largest mean router "
              "probability), drop the rest",
    "no_min_k": "a layer kept fewer than k experts: first keep the k best experts of every layer, then "
                "share the rest of the budget globally",
    "mean_prob": "you reproduced the global drop by mean router probability (the package's scope='global'): "
                 "the allocation is right, but on this load-balanced model every mean probability is close "
                 "to 1/N, so the score says little; score each expert by how much it contributes to the "
                 "layer's output as well (its output norm on the tokens, weighted by the router)",
}


@checker("Exercise 9.3: global expert drop under one budget", timeout=600,
         forbid=("moe_course.compress.trimming.drop_experts", "moe_course.compress.pruning.prune_experts"))
def check_global_expert_drop(drop_fn) -> None:
    """``global_expert_drop(model, calib, budget) -> model``: keep ``budget`` experts in total over all
    MoE layers (at least ``k`` per layer), removed physically, router rows included. Graded on
    shakespeare-moe: budget = L * k must keep exactly k per layer; at budget 16 of 32 the validation
    perplexity must be at most TARGET times that of uniform per-layer drop (4 per layer)."""
    from moe_course.compress import trimming as T
    from moe_course.layers import moe_layers

    model, calib, val = shakespeare()
    layers = moe_layers(model)
    L, N, k = len(layers), layers[0].num_experts, layers[0].k
    scores = _reference("scores", lambda: T.expert_scores(model, calib))
    for budget in (L * k, BUDGET):
        desc = f"(shakespeare-moe, budget {budget} of {L * N} experts)"
        before = _state(model)
        out = drop_fn(model, calib, budget)
        expect(_unchanged(model, before),
               f"your function changed the model it was given: work on copy.deepcopy(model) {desc}")
        expect(isinstance(out, nn.Module), f"return the trimmed model (an nn.Module), got {describe(out)} {desc}")
        got_layers = moe_layers(out)
        expect(len(got_layers) == L, f"the trimmed model must keep all {L} MoE layers, got {len(got_layers)} {desc}")
        counts = [layer.experts.num_experts for layer in got_layers]
        rows = [layer.router.gate.weight.shape[0] for layer in got_layers]
        kept = _kept_ids(model, out)
        plans = _global_plans(scores, budget, k)
        if any(c < k for c in counts):
            raise CheckFailed(f"{_GLOBAL_HINTS['no_min_k']}: your layers keep {counts} {desc}")
        expect(rows == counts, f"the routers still score {rows} experts while the layers store {counts}: "
                               f"remove the dropped experts' router rows too (keep_experts does both) {desc}")
        expect(sum(counts) == budget, f"the budget counts the experts kept over ALL layers: you kept {counts}, "
                                      f"{sum(counts)} in total, not {budget} {desc}")
        if budget == L * k:
            expect(counts == [k] * L, f"a budget of L * k = {budget} leaves exactly k = {k} experts per layer, "
                                      f"you kept {counts} {desc}")
            continue
        for name in ("lowest", "uniform", "mean_prob"):
            if kept == plans[name]:
                raise CheckFailed(f"{_GLOBAL_HINTS[name]} {desc}")
        got = _ppl(out, val)
        uniform = _reference("uniform ppl", lambda: _ppl(T.drop_experts(model, budget // L, calib=calib), val))
        print(f"budget {budget} of {L * N} experts: your layers keep {counts}; validation perplexity {got:.3f} "
              f"vs uniform per-layer drop {uniform:.3f} (target <= {TARGET * uniform:.3f})")
        expect(got <= TARGET * uniform,
               f"perplexity {got:.3f} does not beat uniform per-layer drop ({uniform:.3f}) by 20 %: keep the "
               f"k best experts of each layer, then the best of the rest across layers, with a score that "
               f"measures what each expert contributes to the layer's output {desc}")
