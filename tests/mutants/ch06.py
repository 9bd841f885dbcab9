"""Chapter 6: the top-k distillation loss, that loss on the zoo model, healing a low-rank copy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import Chapter

M = Chapter("ch06")


# ------------------------------------------------------------------ 6.1 top-k kd
def _topk(s, z, y, k, tau, alpha, *, renorm_student=False, renorm_teacher=True, student_topk=False, t2=True,
          flatten=True, swap_alpha=False, temp=True):
    v = s.shape[-1]
    s2, z2 = (s.reshape(-1, v), z.reshape(-1, v)) if flatten else (s, z)
    ts = tau if temp else 1.0
    idx = (s2 if student_topk else z2).topk(k, dim=-1).indices
    if renorm_teacher:
        log_p = F.log_softmax(z2.gather(-1, idx) / ts, -1)
    else:
        log_p = F.log_softmax(z2 / ts, -1).gather(-1, idx)
    if renorm_student:
        log_q = F.log_softmax(s2.gather(-1, idx) / ts, -1)
    else:
        log_q = F.log_softmax(s2 / ts, -1).gather(-1, idx)
    per = (log_p.exp() * (log_p - log_q)).sum(-1)
    soft = per.sum() / (per.shape[0] if flatten else s.shape[0])
    if t2:
        soft = soft * tau ** 2
    hard = F.cross_entropy(s.reshape(-1, v), y.reshape(-1))
    a_soft, a_hard = (1 - alpha, alpha) if swap_alpha else (alpha, 1 - alpha)
    return a_soft * soft + a_hard * hard


@M.right("check_topk_kd_loss")
def topk_with_mask(student_logits, teacher_logits, labels, k, temperature=2.0, alpha=0.5):
    """Masks the dropped teacher logits to -inf instead of gathering."""
    v = student_logits.shape[-1]
    s, z = student_logits.reshape(-1, v), teacher_logits.reshape(-1, v)
    kth = z.topk(k, dim=-1).values[:, -1:]
    masked = z.masked_fill(z < kth, float("-inf"))
    p = torch.softmax(masked / temperature, -1)
    log_p = torch.log_softmax(masked / temperature, -1).nan_to_num(neginf=0.0)
    log_q = torch.log_softmax(s / temperature, -1)
    soft = (p * (log_p - log_q)).sum(-1).mean() * temperature ** 2
    return alpha * soft + (1 - alpha) * F.cross_entropy(s, labels.reshape(-1))


@M.wrong("check_topk_kd_loss", "over all")
def topk_student_renormalised(student_logits, teacher_logits, labels, k, temperature=2.0, alpha=0.5):
    """Student softmax over the k classes only."""
    return _topk(student_logits, teacher_logits, labels, k, temperature, alpha, renorm_student=True)


@M.wrong("check_topk_kd_loss", "renormalise the teacher")
def topk_teacher_not_renormalised(student_logits, teacher_logits, labels, k, temperature=2.0, alpha=0.5):
    """Teacher's full softmax probabilities at the k classes, not renormalised."""
    return _topk(student_logits, teacher_logits, labels, k, temperature, alpha, renorm_teacher=False)


@M.wrong("check_topk_kd_loss", "teacher's largest")
def topk_from_student(student_logits, teacher_logits, labels, k, temperature=2.0, alpha=0.5):
    """Top-k classes taken from the student's logits."""
    return _topk(student_logits, teacher_logits, labels, k, temperature, alpha, student_topk=True)


@M.wrong("check_topk_kd_loss", "t**2")
def topk_no_t2(student_logits, teacher_logits, labels, k, temperature=2.0, alpha=0.5):
    """No T**2."""
    return _topk(student_logits, teacher_logits, labels, k, temperature, alpha, t2=False)


@M.wrong("check_topk_kd_loss", "flatten")
def topk_not_flattened(student_logits, teacher_logits, labels, k, temperature=2.0, alpha=0.5):
    """Averages over the batch dimension only."""
    return _topk(student_logits, teacher_logits, labels, k, temperature, alpha, flatten=False)


@M.wrong("check_topk_kd_loss", "alpha weights the soft")
def topk_swapped_alpha(student_logits, teacher_logits, labels, k, temperature=2.0, alpha=0.5):
    """alpha on the label term."""
    return _topk(student_logits, teacher_logits, labels, k, temperature, alpha, swap_alpha=True)


@M.wrong("check_topk_kd_loss", "temperature")
def topk_no_temperature(student_logits, teacher_logits, labels, k, temperature=2.0, alpha=0.5):
    """Logits not divided by T."""
    return _topk(student_logits, teacher_logits, labels, k, temperature, alpha, temp=False)


@M.wrong("check_topk_kd_loss", "differentiable")
def topk_item(student_logits, teacher_logits, labels, k, temperature=2.0, alpha=0.5):
    """Returns torch.tensor(loss.item())."""
    return torch.tensor(_topk(student_logits, teacher_logits, labels, k, temperature, alpha).item())


@M.wrong("check_topk_kd_loss", "package's own")
def topk_calls_package(student_logits, teacher_logits, labels, k, temperature=2.0, alpha=0.5):
    """Calls the package's kd_loss (forbidden)."""
    from moe_course.compress.distillation import kd_loss
    return kd_loss(student_logits, teacher_logits, labels, temperature, alpha)


# ------------------------------------------------------------------ 6.2 on the zoo model
def _zoo_losses(teacher, student, input_ids, ks, tau, *, alpha=1.0, swap=False, shift=True, use_tau=True):
    x = input_ids[:, :-1] if shift else input_ids[:, 1:]
    y = input_ids[:, 1:]
    with torch.no_grad():
        z, s = teacher.eval()(x), student.eval()(x)
    if swap:
        z, s = s, z
    return [float(_topk(s, z, y, k, tau if use_tau else 1.0, alpha)) for k in ks]


@M.right("check_soft_loss_by_k")
def zoo_losses_inference_mode(teacher, student, input_ids, ks, tau):
    """Under torch.inference_mode, one forward per model."""
    with torch.inference_mode():
        return _zoo_losses(teacher, student, input_ids, ks, tau)


@M.wrong("check_soft_loss_by_k", "alpha=1.0")
def zoo_losses_with_labels(teacher, student, input_ids, ks, tau):
    """alpha=0.5: the label term is mixed in."""
    return _zoo_losses(teacher, student, input_ids, ks, tau, alpha=0.5)


@M.wrong("check_soft_loss_by_k", "teacher is the original")
def zoo_losses_swapped(teacher, student, input_ids, ks, tau):
    """Teacher and student swapped."""
    return _zoo_losses(teacher, student, input_ids, ks, tau, swap=True)


@M.wrong("check_soft_loss_by_k", "input_ids[:, :-1]")
def zoo_losses_no_shift(teacher, student, input_ids, ks, tau):
    """Runs the models on input_ids[:, 1:] (the labels) instead of input_ids[:, :-1]."""
    return _zoo_losses(teacher, student, input_ids, ks, tau, shift=False)


@M.wrong("check_soft_loss_by_k", "temperature")
def zoo_losses_tau_one(teacher, student, input_ids, ks, tau):
    """Ignores tau (uses 1)."""
    return _zoo_losses(teacher, student, input_ids, ks, tau, use_tau=False)


@M.wrong("check_soft_loss_by_k", "one loss per k")
def zoo_losses_only_full(teacher, student, input_ids, ks, tau):
    """Returns only the loss of the last k."""
    return _zoo_losses(teacher, student, input_ids, ks, tau)[-1]


# ------------------------------------------------------------------ 6.3 heal
def _heal(student, teacher, train_data, *, steps=60, alpha=0.5, lr=1e-3, train_teacher=False, frozen=False,
          k=None, labels_only=False):
    from moe_course.data import batches
    teacher.eval()
    student.train()
    params = list(teacher.parameters()) if frozen else [p for p in student.parameters() if p.requires_grad]
    if train_teacher:
        params += list(teacher.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for _, batch in zip(range(steps), batches(train_data, 32, shuffle=True, seed=0)):
        ids = batch["input_ids"]
        x, y = ids[:, :-1], ids[:, 1:]
        if labels_only:
            s = student(x)
            loss = F.cross_entropy(s.reshape(-1, s.shape[-1]), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            continue
        if train_teacher:
            z = teacher(x)
        else:
            with torch.no_grad():
                z = teacher(x)
        s = student(x)
        loss = _topk(s, z.detach() if not train_teacher else z, y, k or s.shape[-1], 2.0, alpha)
        if train_teacher:
            loss = loss + F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return student.eval()


@M.right("check_heal_lowrank")
def heal_top64_teacher(student, teacher, train_data):
    """Distils through the top-k code path with k = 64 of the 65 characters (top-16 alone misses
    the target: +14.3 %)."""
    return _heal(student, teacher, train_data, k=64)


@M.wrong("check_heal_lowrank", "got no better")
def heal_optimises_teacher_params(student, teacher, train_data):
    """The optimizer holds the teacher's parameters (which get no gradient): nothing moves."""
    return _heal(student, teacher, train_data, frozen=True, steps=5)


@M.wrong("check_heal_lowrank", "teacher's weights changed")
def heal_trains_teacher(student, teacher, train_data):
    """Teacher's parameters in the optimizer with a gradient."""
    return _heal(student, teacher, train_data, train_teacher=True, steps=3)


@M.wrong("check_heal_lowrank", "never ran the teacher")
def heal_labels_only(student, teacher, train_data):
    """Fine-tunes on the labels alone, never asking the teacher."""
    return _heal(student, teacher, train_data, labels_only=True, steps=3)


@M.wrong("check_heal_lowrank", "train longer")
def heal_too_short(student, teacher, train_data):
    """Five steps only."""
    return _heal(student, teacher, train_data, steps=5)


@M.wrong("check_heal_lowrank", "4.8x")
def heal_back_to_full_rank(student, teacher, train_data):
    """Returns a copy of the teacher (full-rank experts)."""
    import copy
    return copy.deepcopy(teacher)


@M.wrong("check_heal_lowrank", "nn.module")
def heal_returns_loss(student, teacher, train_data):
    """Returns the final loss instead of the model."""
    _heal(student, teacher, train_data, steps=2)
    return 0.0


@M.wrong("check_heal_lowrank", "package's own")
def heal_with_train_student(student, teacher, train_data):
    """Calls the package's train_student instead of writing the loop."""
    from moe_course.compress.distillation import train_student
    from moe_course.train import TrainConfig
    return train_student(student, teacher, {"train": train_data}, cfg=TrainConfig(steps=60), progress=False)
