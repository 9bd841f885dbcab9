"""Training and evaluation loops for the course's models (chapter 3; reused by chapters 6 and 10).

:func:`fit` is AdamW (Loshchilov & Hutter 2019) with linear warmup and cosine decay (Loshchilov &
Hutter 2017), gradient clipping, and the model's own ``compute_loss`` (so the aux-loss weights of
its config apply). :func:`evaluate` reports the task metric alone: perplexity ``exp(mean token
cross-entropy)`` for a language model, accuracy for a classifier.

Determinism: ``fit`` seeds the data order and every random op during training (dropout, noisy
routing) from ``cfg.seed`` inside a forked RNG, so the caller's global RNG is left untouched.
The model's *initialisation* is the caller's business: call
``moe_course.device.seed_everything(seed)`` before building it. Two runs with the same seed, the
same initial weights and the same number of threads give identical weights on CPU.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from moe_course.device import model_device, to_device
from moe_course.progress import progress as _progress


@dataclass
class TrainConfig:
    """Optimisation settings for :func:`fit` (the LM's block size is the model's ``context_length``).

    ``eval_every=0`` evaluates only at the end; ``eval_batches`` caps each evaluation
    (``None`` = the whole validation set).
    """

    steps: int = 500
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    eval_every: int = 100
    eval_batches: int | None = 16
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first bad field."""
        for name, lo in (("steps", 1), ("batch_size", 1), ("warmup_steps", 0), ("eval_every", 0), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
            if v < lo:
                raise ValueError(f"{name} must be >= {lo}, got {v}")
        if self.eval_batches is not None and (not isinstance(self.eval_batches, int) or self.eval_batches < 1):
            raise ValueError(f"eval_batches must be a positive int or None, got {self.eval_batches!r}")
        for name in ("lr", "min_lr_ratio", "weight_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("lr", "weight_decay"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {getattr(self, name)}")
        if self.min_lr_ratio > 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**dict(d))


@dataclass
class History:
    """What :func:`fit` records: per-step loss, lr and model metrics, periodic evaluations, wall time."""

    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    train_metrics: list[dict[str, float]] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_metrics: list[dict[str, float]] = field(default_factory=list)
    wall_time: float = 0.0

    @property
    def final_eval(self) -> dict[str, float] | None:
        """The last evaluation's metrics (``None`` without validation data)."""
        return self.eval_metrics[-1] if self.eval_metrics else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> dict[str, Any]:
        """Small JSON-able digest: steps, first/last train loss, evaluations, wall time."""
        return {
            "steps": len(self.steps),
            "first_train_loss": self.train_loss[0] if self.train_loss else None,
            "final_train_loss": self.train_loss[-1] if self.train_loss else None,
            "eval_steps": list(self.eval_steps),
            "eval_metrics": list(self.eval_metrics),
            "wall_time": self.wall_time,
        }


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``cfg.lr`` over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr``."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected an int >= 0, got {step!r}")
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg: expected a TrainConfig, got {type(cfg).__name__}")
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and expert tensors; not biases, norms or embeddings (GPT-2 / nanoGPT practice)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not 0 <= weight_decay < math.inf:
        raise ValueError(f"weight_decay: expected a finite number >= 0, got {weight_decay!r}")
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.LayerNorm, nn.RMSNorm)):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    decay, rest, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (rest if p.dim() < 2 or id(p) in no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _check_dataset(data: Any, name: str) -> None:
    try:
        n = len(data)
    except TypeError:
        raise TypeError(
            f"{name} must be a datasets.Dataset (or sized sequence of rows), got {type(data).__name__}"
        ) from None
    if n == 0:
        raise ValueError(f"{name} is empty: nothing to train or evaluate on")


def _batch_stream(data: Any, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches: epoch ``e`` is shuffled with seed ``seed + e``; short datasets keep their last batch."""
    from moe_course.data import batches

    drop_last = len(data) >= batch_size
    epoch = 0
    while True:
        for batch in batches(data, batch_size, shuffle=True, seed=seed + epoch, drop_last=drop_last):
            yield batch
        epoch += 1


def fit(
    model: nn.Module,
    train_data: Any,
    val_data: Any = None,
    cfg: TrainConfig | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    callback: Callable[[int, dict[str, float]], bool | None] | None = None,
) -> History:
    """Train ``model`` on ``train_data`` with AdamW + warmup/cosine, return a :class:`History`.

    Args:
        model: anything with ``compute_loss(batch) -> (loss, metrics)`` (the course's models).
        train_data / val_data: ``datasets.Dataset`` in torch format (LM blocks or MNIST-1D rows).
        cfg: :class:`TrainConfig` (defaults if ``None``).
        device: where to train; ``None`` keeps the model where it is (an explicit device moves it).
        progress: show a tqdm bar with the running loss.
        callback: ``callback(step, metrics)`` after every step (``metrics`` has ``loss``, ``lr``, the
            model's metrics and, on evaluation steps, ``val_*``); returning ``True`` stops early.

    The model ends in the train/eval mode it started in.
    """
    cfg = TrainConfig() if cfg is None else cfg
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    if not hasattr(model, "compute_loss"):
        raise TypeError(f"model must define compute_loss(batch), got {type(model).__name__}")
    _check_dataset(train_data, "train_data")
    if val_data is not None:
        _check_dataset(val_data, "val_data")
    if device is not None:
        model.to(device)
    device = model_device(model)

    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    history = History()
    was_training = model.training
    rng_devices = [device] if device.type == "cuda" else []
    start = time.perf_counter()
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(cfg.seed)
        stream = _batch_stream(train_data, cfg.batch_size, cfg.seed)
        bar = _progress(range(cfg.steps), disable=not progress, desc="train", leave=False)
        model.train()
        try:
            for step in bar:
                lr = lr_at(step, cfg)
                for group in opt.param_groups:
                    group["lr"] = lr
                loss, metrics = model.compute_loss(to_device(next(stream), device))
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"training loss became {loss.item()} at step {step}; lower lr (now {lr:.3g})"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()

                loss_value = float(loss.detach())
                history.steps.append(step)
                history.train_loss.append(loss_value)
                history.lr.append(lr)
                history.train_metrics.append(dict(metrics))
                info = {"loss": loss_value, "lr": lr, **metrics}

                last = step == cfg.steps - 1
                if val_data is not None and (last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
                    ev = evaluate(model, val_data, batch_size=cfg.batch_size, max_batches=cfg.eval_batches)
                    history.eval_steps.append(step)
                    history.eval_metrics.append(ev)
                    info.update({f"val_{k}": v for k, v in ev.items()})
                if step % 10 == 0 or last:
                    shown = {k: f"{v:.3f}" for k, v in info.items() if k in ("loss", "val_loss")}
                    bar.set_postfix(shown, refresh=False)
                if callback is not None and callback(step, info):
                    break
        finally:
            bar.close()
            model.train(was_training)
    history.wall_time = time.perf_counter() - start
    return history


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Any,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Task metrics of ``model`` on ``data`` (no aux losses), in eval mode, in a fixed order.

    Language model (rows with ``input_ids`` of length ``T+1``): ``{"loss", "perplexity"}``, the mean
    next-token cross-entropy over all predicted tokens and ``exp`` of it. Classifier (rows with
    ``x``, ``y``): ``{"loss", "accuracy"}``. ``device=None`` evaluates where the model is.
    """
    from moe_course.data import batches

    _check_dataset(data, "data")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    if device is not None:
        model.to(device)
    device = model_device(model)
    was_training = model.training
    model.eval()
    total, correct, count, kind = 0.0, 0, 0, None
    try:
        for i, batch in enumerate(batches(data, batch_size, shuffle=False, seed=0, drop_last=False)):
            if max_batches is not None and i >= max_batches:
                break
            batch = to_device(batch, device)
            if "input_ids" in batch:
                kind = "lm"
                ids = batch["input_ids"]
                logits = model(ids[:, :-1]).float()
                total += float(torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
                count += ids[:, 1:].numel()
            elif "x" in batch and "y" in batch:
                kind = "cls"
                logits = model(batch["x"]).float()
                y = batch["y"].long()
                total += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(-1) == y).sum())
                count += y.numel()
            else:
                raise KeyError(f"data rows must have 'input_ids' (LM) or 'x' and 'y' (classifier), got {sorted(batch)}")
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("data produced no batches to evaluate")
    loss = total / count
    if kind == "lm":
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
    return {"loss": loss, "accuracy": correct / count}


__all__ = ["TrainConfig", "History", "fit", "evaluate", "lr_at", "param_groups"]
