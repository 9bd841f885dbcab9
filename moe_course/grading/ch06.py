"""Checkers for chapter 6, knowledge distillation.

* 6.1 ``topk_kd_loss``: the distillation loss of Hinton et al. (2015) when only the teacher's
  top-k logits per position are kept (what a cache of teacher outputs stores), a variant of the
  chapter's full loss;
* 6.2 (use it) ``soft_loss_by_k``: that loss between the ``shakespeare-moe`` zoo model and a
  low-rank copy of it, for several k;
* 6.3 (whole method) ``heal_lowrank``: a low-rank copy of the Shakespeare model (experts 4.8x
  smaller) trained back towards its teacher by distillation, graded on a perplexity target.

Each checker compares the student's function with a reference written here on fixed and random
cases, and recognises the usual wrong answers so that the hint names the mistake.
"""

from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F

from .core import CheckFailed, checker, describe, expect

__all__ = ["check_topk_kd_loss", "check_soft_loss_by_k", "check_heal_lowrank"]


# --------------------------------------------------------------------------------------------
# Exercise 6.1: the top-k distillation loss
# --------------------------------------------------------------------------------------------
def _topk_kd(s, t, y, k, tau, alpha, *, renorm_student=False, renorm_teacher=True, student_topk=False,
             t2=True, flatten=True, swap_alpha=False, temp=True):
    v = s.shape[-1]
    if flatten:
        s2, t2_, y2 = s.reshape(-1, v).double(), t.reshape(-1, v).double(), y.reshape(-1)
    else:
        s2, t2_, y2 = s.double(), t.double(), y
    ts = tau if temp else 1.0
    idx = (s2 if student_topk else t2_).topk(k, dim=-1).indices
    vals = t2_.gather(-1, idx)
    if renorm_teacher:
        log_p = F.log_softmax(vals / ts, -1)
    else:
        log_p = F.log_softmax(t2_ / ts, -1).gather(-1, idx)
    if renorm_student:
        log_q = F.log_softmax(s2.gather(-1, idx) / ts, -1)
    else:
        log_q = F.log_softmax(s2 / ts, -1).gather(-1, idx)
    per = (log_p.exp() * (log_p - log_q)).sum(-1)
    soft = per.sum() / per.shape[0] if per.dim() == 1 else per.sum() / s.shape[0]  # batchmean
    if t2:
        soft = soft * tau * tau
    hard = F.cross_entropy(s.reshape(-1, v).double(), y.reshape(-1))
    a_soft, a_hard = (1 - alpha, alpha) if swap_alpha else (alpha, 1 - alpha)
    return a_soft * soft + a_hard * hard


def reference_topk_kd(student_logits, teacher_logits, labels, k, temperature=2.0, alpha=0.5):
    return _topk_kd(student_logits, teacher_logits, labels, k, temperature, alpha).float()


_VARIANTS = {
    "renorm_student": dict(renorm_student=True),
    "teacher_not_renormalised": dict(renorm_teacher=False),
    "student_topk": dict(student_topk=True),
    "no_t2": dict(t2=False),
    "not_flattened": dict(flatten=False),
    "swapped_alpha": dict(swap_alpha=True),
    "no_temperature": dict(temp=False),
}
_HINTS = {
    "renorm_student": "the student's log-probabilities come from its softmax over ALL V classes "
                      "(log_softmax(s / T) first, then gather the k classes); renormalising the student over "
                      "the k classes hides the mass it puts elsewhere",
    "teacher_not_renormalised": "renormalise the teacher's k kept logits: its soft target is softmax(top-k "
                                "logits / T) over those k classes, summing to 1 (the rest of the teacher's "
                                "distribution was not stored)",
    "student_topk": "the k classes are the TEACHER's largest logits (teacher_logits.topk), not the student's",
    "no_t2": "the soft term must be multiplied by T**2 (Hinton et al. 2015), as in the chapter's loss",
    "not_flattened": "flatten the logits to [N, V] first: averaging [B, T, V] logits per sequence divides by B "
                     "only, not by the B * T positions",
    "swapped_alpha": "alpha weights the soft (teacher) term and 1 - alpha the hard (label) term",
    "no_temperature": "divide the teacher's kept logits and the student's logits by the temperature T before "
                      "the softmax",
}


def _diagnose(out, s, t, y, k, tau, alpha) -> str:
    for name, kw in _VARIANTS.items():
        if kw.get("flatten") is False and s.dim() < 3:
            continue
        v = _topk_kd(s, t, y, k, tau, alpha, **kw)
        if torch.allclose(out.double(), v, rtol=1e-4, atol=1e-6):
            return _HINTS[name]
    return ("compare with alpha * T**2 * mean over positions of sum_{i in top-k} p_i (log p_i - log q_i) + "
            "(1 - alpha) * CE, with p the softmax of the teacher's k largest logits / T and q the student's "
            "softmax over all classes")


def _cases():
    g = torch.Generator().manual_seed(0)
    hand_s = torch.tensor([[2.0, 0.5, -1.0, 0.3], [0.0, 1.0, 0.2, -0.4]])
    hand_t = torch.tensor([[3.0, 0.0, -2.0, 1.0], [-1.0, 2.0, 1.5, 0.1]])
    cases = [(hand_s, hand_t, torch.tensor([0, 1]), 2, 2.0, 0.5)]
    cases.append((torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g) * 3,
                  torch.randint(0, 10, (8,), generator=g), 3, 4.0, 0.7))
    cases.append((torch.randn(2, 5, 12, generator=g), torch.randn(2, 5, 12, generator=g) * 2,
                  torch.randint(0, 12, (2, 5), generator=g), 4, 3.0, 0.9))  # LM logits [B, T, V]
    cases.append((torch.randn(6, 7, generator=g), torch.randn(6, 7, generator=g), torch.randint(0, 7, (6,), generator=g),
                  1, 1.5, 0.3))
    return cases


def _call_loss(fn, s, t, y, k, tau, alpha, desc):
    out = fn(s.clone(), t.clone(), y.clone(), k, tau, alpha)
    if not torch.is_tensor(out):
        raise CheckFailed(f"return a scalar tensor, got {describe(out)} {desc}")
    expect(out.numel() == 1, f"return a scalar (one number), got shape {tuple(out.shape)} {desc}")
    return out.reshape(())


@checker("Exercise 6.1: the distillation loss from the teacher's top-k logits",
         forbid=("moe_course.compress.distillation.kd_loss",))
def check_topk_kd_loss(topk_kd_loss) -> None:
    for s, t, y, k, tau, a in _cases():
        desc = f"(logits of shape {tuple(s.shape)}, k={k}, temperature={tau}, alpha={a})"
        out = _call_loss(topk_kd_loss, s, t, y, k, tau, a, desc)
        ref = _topk_kd(s, t, y, k, tau, a)
        if not torch.allclose(out.double(), ref, rtol=1e-4, atol=1e-6):
            raise CheckFailed(f"{_diagnose(out, s, t, y, k, tau, a)} {desc}")
    # with k = V nothing is dropped: the chapter's full loss
    g = torch.Generator().manual_seed(1)
    s, t, y = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g) * 2, torch.randint(0, 6, (5,), generator=g)
    from moe_course.compress.distillation import kd_loss
    full = kd_loss(s, t, y, 2.0, 0.6)
    out = _call_loss(topk_kd_loss, s, t, y, 6, 2.0, 0.6, "(k = V = 6)")
    expect(torch.allclose(out.float(), full, rtol=1e-4, atol=1e-6),
           f"with k = V (every class kept) the loss must equal the chapter's full kd_loss {float(full):.5f}, got "
           f"{float(out):.5f}")
    x = torch.randn(5, 6, generator=g, requires_grad=True)
    out = topk_kd_loss(x, t, y, 3, 2.0, 0.5)
    expect(torch.is_tensor(out) and out.requires_grad,
           "the loss must stay differentiable w.r.t. student_logits (no .detach(), .item() or torch.tensor(...))")


# --------------------------------------------------------------------------------------------
# Exercise 6.2 (use it): the top-k loss between the Shakespeare model and a low-rank copy
# --------------------------------------------------------------------------------------------
ZOO_KS = (1, 4, 16, 65)
ZOO_TAU = 2.0
ZOO_BLOCKS = 8
ZOO_RANK = 8
REL_TOLERANCE = 1e-3
_ZOO: dict = {}


def zoo_models():
    """(teacher, low-rank rank-8 copy, first 8 validation blocks' input_ids) of ``shakespeare-moe``."""
    if not _ZOO:
        from moe_course import zoo
        from moe_course.compress.lowrank import lowrank_experts
        lm = zoo.pretrained("shakespeare-moe", progress=False).cpu().eval()
        data = zoo.data("shakespeare-moe")
        _ZOO["teacher"] = lm
        _ZOO["student"] = lowrank_experts(lm, keep=ZOO_RANK).eval()
        _ZOO["ids"] = data["validation"][:ZOO_BLOCKS]["input_ids"]
        _ZOO["data"] = data
    return _ZOO["teacher"], _ZOO["student"], _ZOO["ids"]


def reference_soft_losses(teacher, student, input_ids, ks, tau, *, alpha=1.0, swap=False, shift=True):
    x = input_ids[:, :-1] if shift else input_ids[:, 1:]
    with torch.no_grad():
        zt, zs = teacher(x), student(x)
    if swap:
        zt, zs = zs, zt
    y = input_ids[:, 1:]
    return [float(_topk_kd(zs, zt, y, k, tau, alpha)) for k in ks]


@checker("Exercise 6.2: the top-k loss between the Shakespeare model and its low-rank copy", timeout=600)
def check_soft_loss_by_k(soft_loss_by_k) -> None:
    teacher, student, ids = zoo_models()
    t_copy, s_copy = copy.deepcopy(teacher), copy.deepcopy(student)
    out = soft_loss_by_k(t_copy, s_copy, ids.clone(), ZOO_KS, ZOO_TAU)
    if torch.is_tensor(out):
        out = out.tolist()
    if not isinstance(out, (list, tuple)) or len(out) != len(ZOO_KS):
        raise CheckFailed(f"return one loss per k, a list of {len(ZOO_KS)} numbers for ks={ZOO_KS}, got "
                          f"{describe(out)}")
    try:
        got = [float(v) for v in out]
    except (TypeError, ValueError):
        raise CheckFailed(f"return plain numbers (float(loss)), got {describe(out)}") from None
    ref = reference_soft_losses(teacher, student, ids, ZOO_KS, ZOO_TAU)
    desc = f"(shakespeare-moe against its rank-{ZOO_RANK} copy, {ZOO_BLOCKS} validation blocks, ks={ZOO_KS})"
    if all(math.isclose(a, b, rel_tol=REL_TOLERANCE) for a, b in zip(got, ref)):
        full = ref[-1]
        parts = ", ".join(f"k={k}: {v:.4f} ({100 * (v / full - 1):+.1f} %)" for k, v in zip(ZOO_KS, got))
        print(f"soft loss (alpha=1, T={ZOO_TAU:g}) of the rank-{ZOO_RANK} copy against the original, relative to "
              f"k = V = {ZOO_KS[-1]}: {parts}")
        return
    checks = [
        (dict(alpha=0.5), "pass alpha=1.0: the question is about the soft term alone (alpha=0.5 adds the label "
                          "cross-entropy)"),
        (dict(swap=True), "the teacher is the ORIGINAL model and the student the low-rank copy: pass the "
                          "student's logits first and the teacher's second, as in your topk_kd_loss"),
        (dict(shift=False), "run the models on input_ids[:, :-1] (the context), not on input_ids[:, 1:]: "
                            "the labels input_ids[:, 1:] are what they predict"),
    ]
    for kw, hint in checks:
        alt = reference_soft_losses(teacher, student, ids, ZOO_KS, ZOO_TAU, **kw)
        if all(math.isclose(a, b, rel_tol=REL_TOLERANCE) for a, b in zip(got, alt)):
            raise CheckFailed(f"{hint} {desc}")
    t1 = reference_soft_losses(teacher, student, ids, ZOO_KS, 1.0)
    if all(math.isclose(a, b, rel_tol=REL_TOLERANCE) for a, b in zip(got, t1)):
        raise CheckFailed(f"pass the temperature given (tau={ZOO_TAU:g}) to your topk_kd_loss {desc}")
    raise CheckFailed(f"expected losses {[round(v, 4) for v in ref]}, got {[round(v, 4) for v in got]}: run both "
                      f"models under torch.no_grad() on input_ids[:, :-1], then topk_kd_loss(student_logits, "
                      f"teacher_logits, input_ids[:, 1:], k, tau, alpha=1.0) for each k {desc}")


# --------------------------------------------------------------------------------------------
# Exercise 6.3 (whole method): heal a low-rank copy by distillation
# --------------------------------------------------------------------------------------------
HEAL_MAX_PPL_INCREASE = 0.12
HEAL_EVAL_BLOCKS = 32


def _ppl(model, val) -> float:
    from moe_course.train import evaluate
    return float(evaluate(model, val, batch_size=128)["perplexity"])


@checker("Exercise 6.3: heal a low-rank copy of the Shakespeare model by distillation", timeout=3000,
         check_mutation=False, forbid=("moe_course.compress.distillation.train_student",
                                       "moe_course.compress.distillation.kd_loss"))
def check_heal_lowrank(heal_lowrank) -> None:
    from moe_course import metrics
    teacher, student0, _ = zoo_models()
    data = _ZOO["data"]
    val = data["validation"].select(range(HEAL_EVAL_BLOCKS))
    teacher_copy, start = copy.deepcopy(teacher), copy.deepcopy(student0)
    before = {k: v.detach().clone() for k, v in teacher_copy.state_dict().items()}
    teacher_calls = [0]
    hook = teacher_copy.register_forward_hook(lambda *_: teacher_calls.__setitem__(0, teacher_calls[0] + 1))
    t0 = time.perf_counter()
    try:
        out = heal_lowrank(start, teacher_copy, data["train"])
    finally:
        hook.remove()
    seconds = time.perf_counter() - t0
    expect(isinstance(out, torch.nn.Module), f"return the trained student (an nn.Module), got {describe(out)}")
    moved = [k for k, v in teacher_copy.state_dict().items() if not torch.equal(v, before[k])]
    expect(not moved, f"the teacher's weights changed ({moved[0] if moved else ''}): keep the teacher frozen "
                      f"(eval mode, torch.no_grad() for its logits, only the student's parameters in the optimizer)")
    size_t, size_s = metrics.size_report(teacher), metrics.size_report(out)
    smaller = size_t.expert_bytes / max(size_s.expert_bytes, 1)
    expect(smaller >= 4.8 - 1e-6, f"the student's experts are {smaller:.2f}x smaller than the teacher's; keep the "
                                  f"rank-8 factors (4.8x): train them, do not grow them back")
    expect(teacher_calls[0] > 0, "your loop never ran the teacher: distillation trains the student against the "
                                 "teacher's logits on each batch (training on the labels alone is fine-tuning, "
                                 "not distillation)")
    base, start_ppl, got = _ppl(teacher, val), _ppl(student0, val), _ppl(out.eval(), val)
    increase = got / base - 1
    print(f"shakespeare-moe, {HEAL_EVAL_BLOCKS} validation blocks: teacher {base:.3f}, rank-{ZOO_RANK} copy before "
          f"{start_ppl:.3f}, after your training {got:.3f} ({100 * increase:+.1f} % over the teacher), experts "
          f"{smaller:.2f}x smaller, {seconds:.0f} s")
    if got >= start_ppl:
        raise CheckFailed(f"the student got no better ({start_ppl:.3f} -> {got:.3f}): check that the optimizer holds "
                          f"the STUDENT's parameters, that the loss is computed on the student's logits with "
                          f"gradients, and that the learning rate is not too high for a model that starts close")
    if increase > HEAL_MAX_PPL_INCREASE:
        raise CheckFailed(f"perplexity {got:.3f} is {100 * increase:.1f} % above the teacher's {base:.3f} (target "
                          f"<= {100 * HEAL_MAX_PPL_INCREASE:.0f} %): train longer, or use the teacher's soft targets "
                          f"(alpha > 0, T around 2) rather than the labels alone")
