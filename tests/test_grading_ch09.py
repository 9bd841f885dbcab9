"""Chapter 9 checkers: the reference passes, typical mistakes are caught (stubs: test_grading_scaffold.py;
more mutants: tests/mutants/ch09.py). Exercises 9.2 and 9.3 are graded on the trained Shakespeare model:
both ways, the reference passes and a weak attempt fails."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from conftest import run

from moe_course.grading import ch09
from moe_course.grading.core import ERROR, FAIL, PASS


# ---------------------------------------------------------------- layer-drop similarity (kept checker)
def residual_similarity(h, out):
    return F.cosine_similarity(h, h + out, dim=-1).mean().item()


def test_similarity_reference_passes():
    assert run(ch09.check_residual_similarity, residual_similarity).status == PASS


def test_similarity_mistakes_caught():
    no_residual = lambda h, out: F.cosine_similarity(h, out, dim=-1).mean().item()
    no_mean = lambda h, out: F.cosine_similarity(h, h + out, dim=-1)
    wrong_dim = lambda h, out: F.cosine_similarity(h, h + out, dim=0).mean().item()
    for fn, word in ((no_residual, "h + out"), (no_mean, "MEAN"), (wrong_dim, "dim=0")):
        r = run(ch09.check_residual_similarity, fn)
        assert r.status in (FAIL, ERROR)
        assert word in r.message


# ---------------------------------------------------------------- Exercise 9.1
def _cos(a, b):
    return F.cosine_similarity(a, b, dim=-1).mean().item()


def best_run(hidden, n):
    L = len(hidden) - 1
    sims = [_cos(hidden[b], hidden[b + n]) for b in range(L - n + 1)]
    return max(range(len(sims)), key=lambda b: sims[b])


def test_run_reference_passes():
    assert run(ch09.check_best_contiguous_run, best_run).status == PASS


def test_run_mistakes_caught():
    def lowest(hidden, n):
        L = len(hidden) - 1
        sims = [_cos(hidden[b], hidden[b + n]) for b in range(L - n + 1)]
        return min(range(len(sims)), key=lambda b: sims[b])

    def off_by_one(hidden, n):
        L = len(hidden) - 1
        sims = [_cos(hidden[b], hidden[b + n - 1]) for b in range(L - n + 2)]
        return max(range(len(sims)), key=lambda b: sims[b])

    for fn, word in ((lowest, "LOWEST"), (off_by_one, "off by one")):
        r = run(ch09.check_best_contiguous_run, fn)
        assert r.status in (FAIL, ERROR)
        assert word in r.message


# ---------------------------------------------------------------- Exercise 9.2 (use it)
def run_drop_perplexity(model, calib, val, n):
    from moe_course.compress import trimming as T
    from moe_course.train import evaluate

    b = best_run(T.block_hidden_states(model, calib), n)
    m = copy.deepcopy(model)
    del m.blocks[b:b + n]
    return float(evaluate(m, val, batch_size=128)["perplexity"])


def test_run_drop_reference_passes():
    assert run(ch09.check_run_drop_perplexity, run_drop_perplexity).status == PASS


def test_run_drop_without_dropping_fails():
    from moe_course.train import evaluate

    r = run(ch09.check_run_drop_perplexity,
            lambda model, calib, val, n: float(evaluate(model, val, batch_size=128)["perplexity"]))
    assert r.status == FAIL and "ORIGINAL" in r.message


# ---------------------------------------------------------------- Exercise 9.3 (whole method)
def global_expert_drop(model, calib, budget):
    from moe_course.compress import trimming as T
    from moe_course.compress.pruning import keep_experts
    from moe_course.layers import moe_layers

    from moe_course.calib import layer_inputs

    scores = []
    with torch.no_grad():
        for layer, x in zip(moe_layers(model), layer_inputs(model, calib)):
            p = torch.softmax(layer.router(x).logits, -1)
            y = torch.stack([layer.experts.expert_forward(i, x).norm(dim=-1) for i in range(8)], 1)
            scores.append((p * y).mean(0))
    kept = [s.argsort(descending=True)[:l.k].tolist() for s, l in zip(scores, moe_layers(model))]
    rest = sorted(((float(s[e]), li, e) for li, s in enumerate(scores) for e in range(len(s))
                   if e not in kept[li]), reverse=True)
    for _, li, e in rest[:budget - sum(map(len, kept))]:
        kept[li].append(e)
    out = copy.deepcopy(model)
    for layer, ids in zip(moe_layers(out), kept):
        keep_experts(layer, sorted(ids))
    return out


def test_global_drop_reference_reaches_the_target():
    r = run(ch09.check_global_expert_drop, global_expert_drop)
    assert r.status == PASS, r.message


def test_global_drop_weak_attempt_misses_the_target():
    """A score that ignores the router (random, fixed seed) spends the same budget globally: it keeps
    the right number of experts but not the right ones, and misses the perplexity target."""
    from moe_course.compress.pruning import keep_experts
    from moe_course.layers import moe_layers

    def random_global(model, calib, budget):
        g = torch.Generator().manual_seed(0)
        layers = moe_layers(model)
        scores = [torch.rand(l.num_experts, generator=g) for l in layers]
        kept = [s.argsort(descending=True)[:l.k].tolist() for s, l in zip(scores, layers)]
        rest = sorted(((float(s[e]), li, e) for li, s in enumerate(scores) for e in range(len(s))
                       if e not in kept[li]), reverse=True)
        for _, li, e in rest[:budget - sum(map(len, kept))]:
            kept[li].append(e)
        out = copy.deepcopy(model)
        for layer, ids in zip(moe_layers(out), kept):
            keep_experts(layer, sorted(ids))
        return out

    r = run(ch09.check_global_expert_drop, random_global)
    assert r.status == FAIL and "does not beat" in r.message, r.message


def test_global_drop_calling_the_package_is_refused():
    """The rule the exercise states: drop_experts is unavailable while the learner's function runs."""
    from moe_course.compress import trimming as T

    r = run(ch09.check_global_expert_drop,
            lambda model, calib, budget: T.drop_experts(model, budget, calib=calib, scope="global"))
    assert r.status == FAIL and "package's own" in r.message, r.message
