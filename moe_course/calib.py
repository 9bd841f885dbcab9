r"""Calibration: the data and the hooks every compression technique shares (chapters 4 to 9).

Techniques that look at data (expert pruning, merging, trimming, data-aware quantizers) all need the
same plumbing: a few batches of the *training* split, the model run over them in eval mode, and what
each MoE layer, or each expert, saw. This module is that plumbing, written once:

* :func:`iter_batches` / :func:`calib_batches`: batches from a ``datasets.Dataset``, a tensor, a
  dict of tensors or an iterable of batches; the checked list every technique starts from.
* :func:`count_tokens`: the one definition of the tokens in a batch (token ids count one each, a
  row of float features counts one).
* :func:`forward`, :func:`evaluating`, :func:`run`: one batch through a model in the package's
  formats; eval mode with every module's mode (and the device) restored afterwards; a hooked run
  that always removes its hooks.
* :func:`layer_inputs`: the input tokens ``[T, d_model]`` of every MoE layer.
* :func:`capture_experts`: per expert, the tokens routed to it, its outputs and its gate weights.
  It reads the router's decision and runs each expert itself, so it sees the same tokens under
  every dispatch strategy. Hooks on ``nn.Linear`` / ``F.linear``, what general calibration tools
  use, see nothing of stacked experts run by one grouped matmul, and an expert that received no
  token silently gets no statistics. ``every_expert=True`` runs every expert on every token (the
  calibration mode that gives rare experts statistics too).
* :func:`coverage`: the tokens each expert saw, with the experts under a threshold flagged.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from moe_course import _validate
from moe_course.data import batches as dataset_batches
from moe_course.device import model_device, to_device
from moe_course.layers import MoELayer, moe_layers, require_moe_layers

__all__ = ["iter_batches", "calib_batches", "count_tokens", "forward", "evaluating", "run", "layer_inputs",
           "LayerCapture", "capture_experts", "Coverage", "coverage"]


# --------------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------------
def _is_dataset(data: Any) -> bool:
    return hasattr(data, "column_names") and hasattr(data, "__len__") and hasattr(data, "__getitem__")


def iter_batches(data: Any, batch_size: int = 64) -> Iterator[Any]:
    """Batches of ``data`` in order: a ``datasets.Dataset`` (through :func:`moe_course.data.batches`),
    a tensor or a dict of tensors (chunked by rows), or an iterable of ready batches (as they are)."""
    if isinstance(data, Mapping) and data and all(_is_dataset(v) for v in data.values()):
        raise TypeError(f"data: got a DatasetDict with splits {list(data)}; pass one split, e.g. data['validation']")
    if _is_dataset(data):
        if not any(c in data.column_names for c in ("input_ids", "x")):
            raise ValueError(f"data: expected a column 'input_ids' or 'x', got columns {data.column_names}")
        if len(data):
            yield from dataset_batches(data, batch_size, shuffle=False, drop_last=False)
    elif torch.is_tensor(data):
        yield from data.split(batch_size)
    elif isinstance(data, Mapping):
        tensors = {k: torch.as_tensor(v) for k, v in data.items() if torch.is_tensor(v) or isinstance(v, list)}
        n = len(next(iter(tensors.values()))) if tensors else 0
        for start in range(0, n, batch_size):
            yield {k: v[start:start + batch_size] for k, v in tensors.items()}
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        yield from data
    else:
        raise TypeError(f"data: expected a datasets.Dataset, a tensor, a dict of tensors or an iterable "
                        f"of batches, got {type(data).__name__}")


def count_tokens(batch: Any) -> int:
    """Tokens in one batch: token ids count one each (``input_ids [B, T+1]`` predicts ``B*T``), a
    row of float features counts one (an MNIST-1D signal is one example); 0 for anything else."""
    if torch.is_tensor(batch):
        floating = batch.is_floating_point() or batch.is_complex()
        return int(batch.shape[0]) if floating and batch.dim() else int(batch.numel())
    if isinstance(batch, Mapping):
        if "input_ids" in batch:
            ids = torch.as_tensor(batch["input_ids"])
            return int(ids[:, :-1].numel()) if ids.dim() == 2 else int(ids.numel())
        for value in batch.values():
            if torch.is_tensor(value):
                return count_tokens(value)
    return 0


def calib_batches(calib: Any, model: nn.Module | None = None, batch_size: int = 64, name: str = "calib") -> list:
    """The calibration data as a checked list of batches (an already checked list passes through).

    Refused, naming ``name``: ``None``, no batches, a batch without tokens, NaN/inf features,
    negative token ids and, when ``model`` has a ``config.vocab_size``, ids outside its vocabulary.
    """
    if calib is None:
        raise ValueError(f"{name}: expected calibration data (a training-split Dataset or batches), got None")
    try:
        batches = list(iter_batches(calib, batch_size))
    except (TypeError, ValueError) as err:
        msg = str(err)
        raise type(err)(f"{name}: {msg[len('data: '):] if msg.startswith('data: ') else msg}") from None
    if not batches:
        raise ValueError(f"{name}: the calibration data is empty; pass a few batches of the training split")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    for j, b in enumerate(batches):
        _check_batch(b, j, vocab if isinstance(vocab, int) else None, name)
    return batches


def _check_batch(b: Any, j: int, vocab: int | None, name: str) -> None:
    if count_tokens(b) == 0:
        shapes = ({k: tuple(torch.as_tensor(v).shape) for k, v in b.items()} if isinstance(b, Mapping)
                  else tuple(getattr(b, "shape", ())))
        raise ValueError(f"{name}: batch {j} has no tokens (shapes {shapes}); expected input_ids [B, T+1] "
                         "with T >= 1, or x [B, ...] with B >= 1")
    for v in (b.values() if isinstance(b, Mapping) else [b]):
        if not torch.is_tensor(v):
            continue
        _validate.finite(f"{name} (batch {j})", v)
        if v.is_floating_point() or v.dtype == torch.bool or not v.numel():
            continue
        if int(v.min()) < 0:
            raise ValueError(f"{name}: batch {j} has negative token ids (min {int(v.min())}); "
                             "expected ids in [0, vocab_size)")
    ids = b.get("input_ids") if isinstance(b, Mapping) else b
    if vocab is not None and torch.is_tensor(ids) and not ids.is_floating_point() and ids.numel() \
            and int(ids.max()) >= vocab:
        raise ValueError(f"{name}: batch {j} has token id {int(ids.max())}; expected ids in "
                         f"[0, vocab_size={vocab}) (tokenized with this model's tokenizer?)")


# --------------------------------------------------------------------------------------------
# running a model
# --------------------------------------------------------------------------------------------
def forward(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on one batch in the package's formats.

    A tensor is passed as is. A dict follows the training format: ``{"input_ids": [B, T+1]}``
    feeds ``input_ids[:, :-1]``, ``{"x": ...}`` feeds ``x``; any other dict is ``model(**batch)``.
    """
    if torch.is_tensor(batch):
        return model(batch)
    if isinstance(batch, Mapping):
        if "input_ids" in batch:
            return model(torch.as_tensor(batch["input_ids"])[:, :-1])
        if "x" in batch:
            return model(torch.as_tensor(batch["x"]))
        return model(**batch)
    raise TypeError(f"batch: expected a tensor or a dict of tensors, got {type(batch).__name__}")


@contextmanager
def evaluating(model: nn.Module, device: torch.device | str | None = None):
    """Eval mode (and ``device``) inside; every module's own mode and the model's device restored after."""
    modes = [(m, m.training) for m in model.modules()]
    home = model_device(model)
    target = torch.device(device) if device is not None else home
    try:
        if target != home:
            model.to(target)
        model.eval()
        yield target
    finally:
        for m, mode in modes:
            m.training = mode
        if target != home:
            model.to(home)


@torch.no_grad()
def run(model: nn.Module, batches: Iterable[Any], hooks: Iterable[Any] = ()) -> None:
    """Run ``model`` over ``batches`` in eval mode without gradients, then remove ``hooks`` (the
    handles of forward hooks registered for this run) and restore the modes, even on error."""
    try:
        with evaluating(model) as dev:
            for b in batches:
                forward(model, to_device(b, dev))
    finally:
        for h in hooks:
            h.remove()


def layer_inputs(model: nn.Module, calib: Any) -> list[torch.Tensor]:
    """Per MoE layer of ``model``, its input tokens ``[T, d_model]`` on the calibration data.

    A layer module called several times per forward (weights shared across depth) collects all calls.
    """
    layers = require_moe_layers(model, "calibrate")
    batches = calib_batches(calib, model)
    store: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: store[i].append(a[0].reshape(-1, a[0].shape[-1])))
             for i, layer in enumerate(layers)]
    run(model, batches, hooks)
    return [torch.cat(s) for s in store]


# --------------------------------------------------------------------------------------------
# per-expert capture
# --------------------------------------------------------------------------------------------
@dataclass
class LayerCapture:
    """What the experts of one MoE layer saw on the calibration data.

    Per expert ``e``: ``tokens[e] [n_e]`` the positions of its tokens among the layer's ``num_tokens``
    calibration tokens, ``inputs[e] [n_e, d_model]`` those tokens, ``gates[e] [n_e]`` their gate weights
    (0 for a token the router did not send to ``e``, in ``every_expert`` mode) and ``outputs[e]
    [n_e, d_model]`` the expert's outputs before the gate. The layer's routed output is
    ``y[tokens[e]] += gates[e, :, None] * outputs[e]`` summed over experts.
    """

    index: int
    num_tokens: int
    every_expert: bool
    tokens: list[torch.Tensor]
    inputs: list[torch.Tensor]
    gates: list[torch.Tensor]
    outputs: list[torch.Tensor] | None

    @property
    def num_experts(self) -> int:
        return len(self.tokens)


def _routing(layer: MoELayer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(expert [T, k], gate [T, k])`` of the layer's last forward; dropped assignments get expert -1."""
    r = layer.last_routing
    if r is None:
        raise RuntimeError(f"{type(layer).__name__} ran but recorded no routing (last_routing)")
    idx = r.indices.reshape(-1, r.indices.shape[-1])
    if r.keep is not None:
        idx = torch.where(r.keep.reshape(idx.shape), idx, torch.full_like(idx, -1))
    return idx, r.weights.reshape(idx.shape)


class _Recorder:
    """Forward hook: one layer's inputs and routing decisions over the calibration run."""

    def __init__(self) -> None:
        self.x: list[torch.Tensor] = []
        self.idx: list[torch.Tensor] = []
        self.gate: list[torch.Tensor] = []

    def __call__(self, layer: nn.Module, args: Any, output: Any) -> None:
        idx, gate = _routing(layer)
        self.x.append(args[0].reshape(-1, args[0].shape[-1]))
        self.idx.append(idx)
        self.gate.append(gate)


def _record(model: nn.Module, calib: Any) -> tuple[list[MoELayer], list[_Recorder]]:
    layers = require_moe_layers(model, "calibrate")
    batches = calib_batches(calib, model)
    recorders = [_Recorder() for _ in layers]
    run(model, batches, [layer.register_forward_hook(rec) for layer, rec in zip(layers, recorders)])
    return layers, recorders


@torch.no_grad()
def capture_experts(model: nn.Module, calib: Any, *, every_expert: bool = False,
                    outputs: bool = True) -> list[LayerCapture]:
    """Per MoE layer, what each expert saw on ``calib``: its tokens, gate weights and outputs.

    The capture reads each layer's routing decision (``layer.last_routing``, capacity drops
    included) and runs the experts itself on the recorded inputs, so the same tokens are captured
    whichever dispatch strategy (``naive``, ``loop``, ``grouped``) the layer uses.

    Args:
        model: a model with MoE layers (:class:`~moe_course.layers.MoELayer`).
        calib: calibration data (:func:`calib_batches`), a slice of the training split.
        every_expert: run every expert on every token (gate 0 where the router did not choose it),
            so that rarely chosen experts get as many calibration tokens as the others.
        outputs: also compute the experts' outputs (one extra expert pass); ``False`` keeps inputs only.
    """
    if not isinstance(every_expert, bool) or not isinstance(outputs, bool):
        raise TypeError(f"every_expert, outputs: expected bools, got {every_expert!r}, {outputs!r}")
    layers, recorders = _record(model, calib)
    result = []
    for i, (layer, rec) in enumerate(zip(layers, recorders)):
        x, idx, gate = torch.cat(rec.x), torch.cat(rec.idx), torch.cat(rec.gate)
        everything = torch.arange(x.shape[0], device=x.device)
        tokens, gates = [], []
        for e in range(layer.num_experts):
            chose = idx == e                                                   # [T, k]
            if every_expert:
                tokens.append(everything)
                gates.append((gate * chose).sum(-1))
            else:
                rows = chose.any(-1).nonzero().squeeze(1)
                tokens.append(rows)
                gates.append((gate[rows] * chose[rows]).sum(-1))
        inputs = [x[t] for t in tokens]
        outs = None
        if outputs:
            outs = (list(layer.experts.forward_all(x).unbind(0)) if every_expert
                    else [layer.experts.expert_forward(e, xe) for e, xe in enumerate(inputs)])
        result.append(LayerCapture(i, x.shape[0], every_expert, tokens, inputs, gates, outs))
    return result


# --------------------------------------------------------------------------------------------
# coverage
# --------------------------------------------------------------------------------------------
@dataclass
class Coverage:
    """Tokens each expert saw on the calibration data, and the experts that saw too few.

    ``tokens[l] [E_l]`` counts the tokens layer ``l``'s router sent to each expert (assignments
    dropped by capacity excluded), out of ``num_tokens[l]``. ``min_tokens[l]`` is the threshold:
    an expert below it is in :attr:`flagged` (by default ``d_model``: statistics of an expert's
    inputs, such as the ``d x d`` input covariance of GPTQ-style quantizers, need at least ``d``
    tokens to be full rank).
    """

    tokens: list[torch.Tensor]
    num_tokens: list[int]
    min_tokens: list[int]

    @property
    def flagged(self) -> list[tuple[int, int]]:
        """``(layer, expert)`` pairs with fewer than ``min_tokens`` calibration tokens."""
        return [(i, e) for i, (t, lo) in enumerate(zip(self.tokens, self.min_tokens))
                for e in range(len(t)) if int(t[e]) < lo]

    def _rows(self) -> list[tuple[str, str, str]]:
        rows = []
        for i, (t, n, lo) in enumerate(zip(self.tokens, self.num_tokens, self.min_tokens)):
            low = [e for e in range(len(t)) if int(t[e]) < lo]
            rows.append((f"layer {i}", f"{int(t.min())} .. {int(t.max())} of {n}",
                         ", ".join(f"{e} ({int(t[e])})" for e in low) or "-"))
        return rows

    def __str__(self) -> str:
        head = ("MoE layer", "tokens per expert", f"under the threshold (min_tokens {sorted(set(self.min_tokens))})")
        rows = [head, *self._rows()]
        widths = [max(len(r[c]) for r in rows) for c in range(3)]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)

    def _repr_html_(self) -> str:
        body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{html.escape(c)}</td>" for c in r) + "</tr>"
                       for r in self._rows())
        return ("<table><tr><th>MoE layer</th><th>tokens per expert</th><th>under the threshold</th></tr>"
                f"{body}</table>")


def coverage(model: nn.Module, calib: Any, *, min_tokens: int | None = None) -> Coverage:
    """How many calibration tokens each expert of each MoE layer saw, with the starved ones flagged.

    ``min_tokens``: the threshold (default: each layer's ``d_model``). Experts under it will be
    calibrated from too little data; use more calibration data or :func:`capture_experts` with
    ``every_expert=True`` for them.
    """
    if min_tokens is not None:
        _validate.int_in("min_tokens", min_tokens, 0)
    layers, recorders = _record(model, calib)
    tokens, totals, lows = [], [], []
    for layer, rec in zip(layers, recorders):
        idx = torch.cat(rec.idx)
        chose = torch.stack([(idx == e).any(-1) for e in range(layer.num_experts)])   # [E, T]
        tokens.append(chose.sum(-1).cpu())
        totals.append(idx.shape[0])
        lows.append(layer.d_model if min_tokens is None else min_tokens)
    return Coverage(tokens, totals, lows)
