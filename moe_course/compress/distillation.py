"""Knowledge distillation of an MoE teacher into a smaller student (chapter 6; Hinton et al., 2015).

The student matches the teacher's temperature-softened distribution as well as the labels:

    L = alpha * T^2 * KL( softmax(z_t / T) || softmax(z_s / T) ) + (1 - alpha) * CE(z_s, y)

The ``T^2`` factor keeps the soft term's gradients on the same scale as the hard term's when ``T``
changes (the gradient of the KL w.r.t. ``z_s`` scales as ``1/T^2``; Hinton et al. 2015, sec. 2).
Switch Transformers (Fedus et al., 2022, sec. 5) distil sparse teachers into dense students and
initialise the student's non-expert weights (embeddings, attention) from the teacher:
:func:`init_from_teacher` does that where shapes match.

:func:`train_student` is training, not a compression transform: it trains the student it is given
(in place) and returns it. It reuses :func:`moe_course.train.fit` unchanged: it wraps student and teacher in a
small module whose ``compute_loss`` is the KD loss plus the student's own aux losses. The teacher
is *not* a submodule of the wrapper, so the optimizer never sees its parameters and ``fit``'s
``model.train()`` never switches it out of eval mode.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from moe_course.models import model_from_config
from moe_course.train import TrainConfig, fit

__all__ = ["kd_loss", "soft_targets", "train_student", "recover_routers", "init_from_teacher", "make_student",
           "gain_preserved"]


def _check_temperature(temperature: Any) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def soft_targets(logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """The teacher's softened distribution ``softmax(logits / T)`` over the last dimension (float32)."""
    t = _check_temperature(temperature)
    if not torch.is_tensor(logits):
        raise TypeError(f"logits must be a tensor, got {type(logits).__name__}")
    return torch.softmax(logits.float() / t, dim=-1)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """Hinton et al. (2015) distillation loss, averaged over every predicted position.

    ``alpha * T^2 * KL(p_t^T || p_s^T) + (1 - alpha) * CE(student_logits, labels)`` with
    ``p^T = softmax(z / T)``. Logits are ``[..., V]``: ``[B, C]`` for a classifier, ``[B, T, V]``
    for a language model (the KL and CE are means over the ``B*T`` positions). Without ``labels``
    the loss is the soft term alone (``alpha`` is then ignored). The teacher side is detached.
    """
    t = _check_temperature(temperature)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if not (torch.is_tensor(student_logits) and torch.is_tensor(teacher_logits)):
        raise TypeError("student_logits and teacher_logits must be tensors")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} must match student_logits shape "
                         f"{tuple(student_logits.shape)}")
    if student_logits.dim() < 2:
        raise ValueError(f"student_logits must be [..., num_classes], got shape {tuple(student_logits.shape)}")
    v = student_logits.shape[-1]
    s = student_logits.reshape(-1, v).float()
    te = teacher_logits.detach().reshape(-1, v).float()
    # KL(p_t || p_s) = sum p_t (log p_t - log p_s): log_softmax on both sides for stability.
    soft = F.kl_div(F.log_softmax(s / t, dim=-1), F.log_softmax(te / t, dim=-1),
                    reduction="batchmean", log_target=True) * (t * t)
    if labels is None:
        return soft
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must be student_logits shape without the last "
                         f"dimension, {tuple(student_logits.shape[:-1])}")
    hard = F.cross_entropy(s, labels.reshape(-1).long())
    return alpha * soft + (1.0 - alpha) * hard


def gain_preserved(student: float, baseline: float, teacher: float) -> float:
    """Fraction of the teacher-over-baseline gain that the distilled student keeps.

    ``(student - baseline) / (teacher - baseline)`` for any metric (loss, perplexity, accuracy):
    1 means the student is as good as the teacher, 0 means distillation did nothing over training
    the same student on labels alone, < 0 means it hurt.
    """
    for name, v in (("student", student), ("baseline", baseline), ("teacher", teacher)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if teacher == baseline:
        raise ValueError(f"teacher ({teacher}) equals baseline ({baseline}): there is no gain to preserve")
    return (student - baseline) / (teacher - baseline)


def _split(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if "input_ids" in batch:
        ids = batch["input_ids"]
        return ids[:, :-1], ids[:, 1:]
    if "x" in batch and "y" in batch:
        return batch["x"], batch["y"].long()
    raise KeyError(f"batch must have 'input_ids' (LM) or 'x' and 'y' (classifier), got keys {sorted(batch)}")


class _Distiller(nn.Module):
    """``compute_loss`` = KD loss + the student's aux losses, for :func:`moe_course.train.fit`."""

    def __init__(self, teacher: nn.Module, student: nn.Module, temperature: float, alpha: float) -> None:
        super().__init__()
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # not registered: not optimised, not put in train mode
        self.temperature, self.alpha = temperature, alpha

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.student(*args, **kwargs)

    def compute_loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        inputs, labels = _split(batch)
        with torch.no_grad():
            t_logits = self.teacher(inputs)
        s_logits = self.student(inputs)
        loss = kd_loss(s_logits, t_logits, labels, self.temperature, self.alpha)
        aux_fn = getattr(self.student, "aux_loss", None)
        aux = aux_fn() if callable(aux_fn) else s_logits.new_zeros(())
        ce = F.cross_entropy(s_logits.reshape(-1, s_logits.shape[-1]).float(), labels.reshape(-1))
        return loss + aux, {"kd": float(loss.detach()), "ce": float(ce.detach()), "aux": float(aux.detach())}


def train_student(
    student: nn.Module,
    teacher: nn.Module,
    data: Any,
    *,
    cfg: TrainConfig | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    device: torch.device | str | None = None,
    progress: bool = True,
    val_data: Any = None,
) -> nn.Module:
    """Knowledge distillation is training: TRAIN ``student`` in place to match ``teacher`` with
    :func:`kd_loss`, and return it (the same object, trained; ``student.kd_history`` holds the
    :class:`~moe_course.train.History`).

    Unlike the compression transforms it does not copy: make the student first (:func:`make_student`,
    or a compressed copy of the teacher to recover). ``data`` is a training ``Dataset`` or a dict
    with ``"train"`` (and optionally ``"validation"``, used for evaluation unless ``val_data`` is
    given), e.g. ``moe_course.zoo.data(name)``. The teacher is frozen in eval mode (no gradients, no
    dropout, its mode restored afterwards); the student's router aux losses are added with its
    config's weights. Optimisation is :func:`moe_course.train.fit`'s (AdamW, warmup + cosine,
    gradient clipping, progress bar); the student ends in the train/eval mode it started in.
    """
    _check_temperature(temperature)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if not isinstance(teacher, nn.Module) or not isinstance(student, nn.Module):
        raise TypeError("teacher and student must be torch.nn.Module instances")
    if teacher is student:
        raise ValueError("student must be a different model from teacher (build a new, smaller one)")
    t_cfg, s_cfg = getattr(teacher, "config", None), getattr(student, "config", None)
    for field in ("vocab_size", "num_classes", "input_length"):
        tv, sv = getattr(t_cfg, field, None), getattr(s_cfg, field, None)
        if tv is not None and sv is not None and tv != sv:
            raise ValueError(f"student: its config.{field}={sv} differs from the teacher's {field}={tv}; "
                             "the logits must match (build it with make_student)")
    if isinstance(data, Mapping):
        if "train" not in data:
            raise ValueError(f"data as a dict needs a 'train' split, got keys {sorted(data)}")
        train, val = data["train"], data.get("validation") if val_data is None else val_data
    else:
        train, val = data, val_data
    if device is not None:
        student.to(device)
    dev = next(student.parameters()).device
    teacher_was_training = teacher.training
    teacher_grad = [p.requires_grad for p in teacher.parameters()]
    teacher.to(dev).eval().requires_grad_(False)
    try:
        student.kd_history = fit(_Distiller(teacher, student, float(temperature), float(alpha)), train, val, cfg=cfg,
                                 progress=progress)
        return student
    finally:
        teacher.train(teacher_was_training)
        for p, g in zip(teacher.parameters(), teacher_grad):
            p.requires_grad_(g)


def recover_routers(
    student: nn.Module,
    teacher: nn.Module,
    data: Any,
    *,
    cfg: TrainConfig | None = None,
    temperature: float = 1.0,
    progress: bool = True,
    val_data: Any = None,
) -> nn.Module:
    """Router-only distillation: after pruning or merging, train **only the routers** of
    ``student`` (in place) to match ``teacher``'s output distribution on ``data``, with the pure
    soft-target loss (``alpha = 1``: the labels are never used, so unlabeled text works). Every
    other weight stays frozen and is restored to trainable afterwards. Cheap: the routers are a
    tiny share of the parameters. Returns ``student`` (``student.kd_history`` has the curve).
    """
    from moe_course.layers import require_moe_layers

    layers = require_moe_layers(student, "recover")
    router_params = {id(p) for layer in layers for p in layer.router.parameters()}
    if not router_params:
        raise ValueError("student: its MoE layers have no router parameters to train")
    flags = [(p, p.requires_grad) for p in student.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in router_params)
        return train_student(student, teacher, data, cfg=cfg, temperature=temperature, alpha=1.0,
                             progress=progress, val_data=val_data)
    finally:
        for p, g in flags:
            p.requires_grad_(g)


def make_student(teacher: nn.Module, **changes: Any) -> nn.Module:
    """A freshly initialised model with the teacher's config ``.replace(**changes)``.

    E.g. ``make_student(t, num_experts=4)`` (fewer experts), ``make_student(t, d_hidden=32)`` (narrower
    experts) or ``make_student(t, ffn="dense", d_hidden=t.config.k * t.config.d_hidden)`` (a dense
    model with the teacher's active FFN parameters per token). The LM's tokenizer is carried over.
    """
    cfg = getattr(teacher, "config", None)
    if cfg is None or not hasattr(cfg, "replace"):
        raise TypeError(f"teacher must be a course model with a .config, got {type(teacher).__name__}")
    student = model_from_config(cfg.replace(**changes))
    if hasattr(teacher, "tokenizer"):
        student.tokenizer = teacher.tokenizer
    p = next(teacher.parameters(), None)
    return student.to(p.device) if p is not None else student


@torch.no_grad()
def init_from_teacher(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Copy the teacher's non-FFN weights (embeddings, attention, norms, head) into ``student`` where
    names and shapes match (Switch Transformers' distillation recipe); return the copied names.

    Feed-forward weights (experts, routers, dense MLPs) are left as initialised: their shapes and
    roles differ between teacher and student.
    """
    for name, m in (("student", student), ("teacher", teacher)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{name}: expected an nn.Module, got {type(m).__name__}")
    t_params = dict(teacher.named_parameters())
    copied = []
    for name, p in student.named_parameters():
        if ".ffn." in f".{name}":
            continue
        src = t_params.get(name)
        if src is not None and src.shape == p.shape:
            p.copy_(src.to(p.device, p.dtype))
            copied.append(name)
    return copied
