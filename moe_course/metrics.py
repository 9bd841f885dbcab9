"""Measuring an MoE: size, true storage bytes, active parameters and FLOPs per token, latency,
routing statistics, and one table comparing compressed variants.

Conventions (chapter 3 explains them; every later chapter's numbers use them):

* **Parameters** are unique ``nn.Parameter`` objects (a tied weight counts once). An
  :class:`~moe_course.layers.Experts` that stores packed (quantized) weights as buffers still
  counts its logical ``num_experts * params_per_expert`` parameters: quantization changes bytes,
  not the number of weights.
* **Bytes** are the memory the model really holds: every parameter *and* buffer, measured from
  its tensor storage (``numel * element_size`` of the region it covers) and deduplicated by
  storage, so tied weights and views count once and packed ``uint8`` codes count 1 byte each.
* **Active parameters per token** follow Kaplan et al. (2020, sec. 2.1) "non-embedding"
  counting: every parameter outside the MoE layers except embedding tables (``nn.Embedding``
  weights and parameters whose name contains ``emb``, such as a raw ``pos_emb``; a lookup
  touches one row and does no arithmetic; an LM head tied to the token embedding shares its
  parameters and is not counted again), plus, for each MoE layer, the router and the ``k`` routed experts a token
  runs (and its shared experts), as reported by ``MoELayer.active_params_per_token()``.
* **FLOPs per token** (forward) are ``2 x`` the multiply-accumulates of the matmuls a token goes
  through: ``2 * weight.numel()`` for every ``nn.Linear`` and convolution outside the MoE
  layers (a convolution counted once per token), the output layer included even when it is tied
  to the token embedding: as a lookup the embedding costs nothing, but as the LM head it is a
  ``d x V`` matmul, ``2 V d`` FLOPs per token (a model whose head is a bare ``F.linear`` with the
  embedding weight says so with a true ``tied_lm_head`` attribute and a ``config`` with
  ``vocab_size`` and ``d_model``), ``MoELayer.flops_per_token()`` for MoE layers
  (router + ``k`` experts + shared experts), plus Kaplan's context-dependent attention term
  ``2 * n_attn_layers * n_ctx * d_model`` (Kaplan et al. 2020, Table 1: the ``QK^T`` logits with
  a full context; the ``softmax @ V`` product costs as much again and Hoffmann et al. 2022 count
  it, Kaplan does not). Element-wise work (norms, activations, softmax, biases) is ignored, as
  in Kaplan. A module called several times per forward (weight sharing across depth) is
  counted once: pass a model whose modules are distinct, or add the repeats yourself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from . import _validate
from .calib import count_tokens, evaluating, forward, iter_batches
from .device import to_device
from .layers import Experts, MoELayer, RouterOutput, moe_layers
from .losses import coefficient_of_variation_sq

__all__ = [
    "SizeReport",
    "size_report",
    "format_bytes",
    "format_count",
    "LatencyResult",
    "latency",
    "latency_race",
    "speedup_verdict",
    "timed_ms",
    "LayerRoutingStats",
    "RoutingStats",
    "routing_stats",
    "compare",
    "RoutingFlips",
    "routing_flip_rate",
    "GenerationQuality",
    "generation_quality",
    "repetition_rate",
]


# --------------------------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------------------------
def format_bytes(n: int | float, binary: bool = False) -> str:
    """``1234567 -> '1.23 MB'`` (SI, powers of 1000) or ``'1.18 MiB'`` with ``binary=True``."""
    if isinstance(n, bool) or not isinstance(n, (int, float)) or n < 0 or math.isnan(n):
        raise ValueError(f"n: expected a number of bytes >= 0, got {n!r}")
    base, units = (1024.0, ("B", "KiB", "MiB", "GiB", "TiB")) if binary else (1000.0, ("B", "kB", "MB", "GB", "TB"))
    value, unit = float(n), units[0]
    for unit in units:
        if value < base or unit == units[-1]:
            break
        value /= base
    return f"{int(value)} B" if unit == "B" else f"{value:.3g} {unit}"


def format_count(n: int | float) -> str:
    """``1234567 -> '1.23 M'``: parameter and FLOP counts with k/M/G/T suffixes."""
    if isinstance(n, bool) or not isinstance(n, (int, float)) or math.isnan(n):
        raise ValueError(f"n: expected a number, got {n!r}")
    value = float(n)
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {suffix}"
    return f"{value:.3g}" if value != int(value) else str(int(value))


# --------------------------------------------------------------------------------------------
# size
# --------------------------------------------------------------------------------------------
def _leaf_tensors(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """Plain tensors holding ``t``'s data (tensor subclasses such as torchao's are unwrapped)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from _leaf_tensors(getattr(t, name))
    else:
        yield t


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> tuple[int, dict[str, int]]:
    """Bytes covered by ``tensors``, each storage region counted once; and the split by dtype.

    The region of a tensor is ``[offset, offset + extent)`` inside its untyped storage, so tied
    weights, views and slices of one buffer are not double counted.
    """
    regions: dict[Any, list[tuple[int, int, str]]] = {}
    for t in tensors:
        for leaf in _leaf_tensors(t):
            if leaf.numel() == 0:
                continue
            size = leaf.element_size()
            extent = (1 + sum((n - 1) * s for n, s in zip(leaf.shape, leaf.stride()))) * size
            if leaf.device.type == "meta":  # meta tensors have no storage: count each once
                key, start = ("meta", id(leaf)), 0
            else:
                key = (leaf.device, leaf.untyped_storage().data_ptr())
                start = leaf.storage_offset() * size
            regions.setdefault(key, []).append((start, start + extent, str(leaf.dtype).replace("torch.", "")))
    total, by_dtype = 0, {}
    for spans in regions.values():
        spans.sort()
        end = -1
        for lo, hi, dtype in spans:  # union of intervals; overlap goes to the first dtype seen
            lo = max(lo, end)
            if hi > lo:
                total += hi - lo
                by_dtype[dtype] = by_dtype.get(dtype, 0) + hi - lo
                end = hi
    return total, dict(sorted(by_dtype.items(), key=lambda kv: -kv[1]))


def _config_value(model: Any, *names: str) -> int | None:
    cfg = getattr(model, "config", None)
    for obj in (cfg, model):
        for name in names:
            value = getattr(obj, name, None) if obj is not None else None
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def _packed_params(m: nn.Module) -> int:
    """Logical weights an :class:`Experts` keeps outside ``nn.Parameter`` (packed, quantized)."""
    if not isinstance(m, Experts):
        return 0
    return max(0, m.num_experts * m.params_per_expert - sum(p.numel() for p in m.parameters()))


def _is_embedding_name(name: str) -> bool:
    """``pos_emb``, ``embedding``, ``wte_embed``: a raw parameter used as a lookup table."""
    return any(part.startswith("emb") for part in name.lower().split("_"))


_MATMUL_MODULES = (nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)


def _is_attention(m: nn.Module) -> bool:
    return isinstance(m, nn.MultiheadAttention) or "attention" in type(m).__name__.lower()


@dataclass
class SizeReport:
    """What :func:`size_report` measures (see the module docstring for the conventions)."""

    total_params: int
    expert_params: int
    shared_expert_params: int
    router_params: int
    embedding_params: int
    bytes: int
    param_bytes: int
    buffer_bytes: int
    expert_bytes: int
    bytes_by_dtype: dict[str, int]
    active_params_per_token: int
    flops_per_token: int
    attention_flops_per_token: int
    context_length: int | None
    num_moe_layers: int
    experts_per_layer: list[int] = field(default_factory=list)
    k_per_layer: list[int] = field(default_factory=list)

    @property
    def non_expert_params(self) -> int:
        """Everything but the routed experts (attention, embeddings, routers, shared experts...)."""
        return self.total_params - self.expert_params

    @property
    def megabytes(self) -> float:
        return self.bytes / 1e6

    @property
    def active_fraction(self) -> float:
        """Active parameters per token over all non-embedding parameters."""
        denom = self.total_params - self.embedding_params
        return self.active_params_per_token / denom if denom else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(non_expert_params=self.non_expert_params, megabytes=self.megabytes)
        return d

    def _rows(self) -> list[tuple[str, str]]:
        n = self.total_params
        pct = (lambda x: f"{100 * x / n:.0f}%") if n else (lambda x: "-")
        dtypes = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.bytes_by_dtype.items()) or "-"
        rows = [
            ("parameters", f"{format_count(n)} ({n:,})"),
            ("  routed experts", f"{format_count(self.expert_params)} ({pct(self.expert_params)})"),
            ("  shared experts", format_count(self.shared_expert_params)),
            ("  routers", format_count(self.router_params)),
            ("  embeddings", format_count(self.embedding_params)),
            ("storage", f"{format_bytes(self.bytes)} ({dtypes})"),
            ("  experts", format_bytes(self.expert_bytes)),
            ("  buffers", format_bytes(self.buffer_bytes)),
            ("active params / token", f"{format_count(self.active_params_per_token)} "
                                      f"({100 * self.active_fraction:.0f}% of non-embedding)"),
        ]
        ctx = f", attention {format_count(self.attention_flops_per_token)} at context {self.context_length}" \
            if self.context_length else ""
        rows.append(("FLOPs / token (fwd)", f"{format_count(self.flops_per_token)}{ctx}"))
        if self.num_moe_layers:
            es, ks = sorted(set(self.experts_per_layer)), sorted(set(self.k_per_layer))
            rows.append(("MoE layers", f"{self.num_moe_layers} (experts {'/'.join(map(str, es))}, "
                                       f"top-{'/'.join(map(str, ks))})"))
        else:
            rows.append(("MoE layers", "0"))
        return rows

    def __str__(self) -> str:
        rows = self._rows()
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

    def _repr_html_(self) -> str:
        body = "".join(
            f"<tr><td style='text-align:left'>{html.escape(k).replace('  ', '&emsp;')}</td>"
            f"<td style='text-align:left'>{html.escape(v)}</td></tr>"
            for k, v in self._rows()
        )
        return f"<table>{body}</table>"


def size_report(model: nn.Module, context_length: int | None = None) -> SizeReport:
    """Parameters, true storage bytes, active parameters and FLOPs per token of ``model``.

    Conventions in the module docstring (Kaplan et al. 2020 non-embedding counting; FLOPs = 2 x
    multiply-accumulates, plus the attention term ``2 * n_attn_layers * n_ctx * d_model``).

    Args:
        model: any ``nn.Module``; its MoE layers are found with :func:`moe_layers`.
        context_length: ``n_ctx`` for the attention term; default ``model.config.context_length``
            (or ``num_tokens`` for the classifier). Without it the attention term is 0.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    _validate.positive_int("context_length", context_length, allow_none=True)
    layers = moe_layers(model)
    in_moe = {id(m) for layer in layers for m in layer.modules()}

    params = dict(model.named_parameters())  # deduplicated: a tied weight appears once
    by_id = {id(p): p for p in params.values()}
    routed = list({id(layer.experts): layer.experts for layer in layers}.values())
    shared = list({id(m): m for layer in layers if isinstance(m := getattr(layer, "shared", None), nn.Module)}.values())

    def count(modules: list[nn.Module]) -> int:
        ids = {id(p) for m in modules for p in m.parameters()}
        return sum(by_id[i].numel() for i in ids) + sum(_packed_params(m) for m in modules)

    expert_params, shared_params = count(routed), count(shared)
    total = sum(p.numel() for p in params.values()) + sum(_packed_params(m) for m in routed + shared)
    router_params = count([layer.router for layer in layers])

    # Outside the MoE layers: embedding tables (and a head tied to them) are excluded (Kaplan et
    # al. 2020); every other parameter is active, and every matmul weight costs 2 FLOPs/element.
    outside = [m for m in model.modules() if id(m) not in in_moe]
    embedding = {id(p) for m in outside for name, p in m.named_parameters(recurse=False)
                 if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) or _is_embedding_name(name)}
    used = {id(p) for m in outside for p in m.parameters(recurse=False)} - embedding
    flops = 0
    for m in outside:
        w = m.in_proj_weight if isinstance(m, nn.MultiheadAttention) else getattr(m, "weight", None)
        # A Linear whose weight is an embedding table is a tied output layer: free as a parameter
        # (counted with the embedding), not free as compute.
        if isinstance(m, _MATMUL_MODULES) and torch.is_tensor(w) and (id(w) not in embedding or isinstance(m, nn.Linear)):
            flops += 2 * w.numel()
    if getattr(model, "tied_lm_head", False) is True:  # head = F.linear(h, embedding.weight): no module
        vocab, width = _config_value(model, "vocab_size"), _config_value(model, "d_model")
        if vocab and width:
            flops += 2 * vocab * width
    embedding_params = sum(by_id[i].numel() for i in embedding)
    active = sum(by_id[i].numel() for i in used)
    active += sum(int(layer.active_params_per_token()) for layer in layers)
    flops += sum(int(layer.flops_per_token()) for layer in layers)

    # Innermost attention-like modules, so that a wrapper (or the model) named "...Attention..."
    # around them does not count twice.
    attn = [m for m in model.modules() if m is not model and _is_attention(m) and id(m) not in in_moe]
    attn = [m for m in attn if not any(_is_attention(sub) for sub in m.modules() if sub is not m)]
    ctx = context_length or _config_value(model, "context_length", "num_tokens", "block_size", "n_ctx")
    d_model = _config_value(model, "d_model", "n_embd", "hidden_size")
    attn_flops = 2 * len(attn) * ctx * d_model if (attn and ctx and d_model) else 0

    buffers = list(model.buffers())
    total_bytes, by_dtype = _storage_bytes([*params.values(), *buffers])
    param_bytes, _ = _storage_bytes(params.values())
    expert_bytes, _ = _storage_bytes(t for m in routed for t in (*m.parameters(), *m.buffers()))
    return SizeReport(
        total_params=total,
        expert_params=expert_params,
        shared_expert_params=shared_params,
        router_params=router_params,
        embedding_params=embedding_params,
        bytes=total_bytes,
        param_bytes=param_bytes,
        buffer_bytes=total_bytes - param_bytes,
        expert_bytes=expert_bytes,
        bytes_by_dtype=by_dtype,
        active_params_per_token=active,
        flops_per_token=flops + attn_flops,
        attention_flops_per_token=attn_flops,
        context_length=ctx if attn else None,
        num_moe_layers=len(layers),
        experts_per_layer=[layer.num_experts for layer in layers],
        k_per_layer=[layer.k for layer in layers],
    )


# --------------------------------------------------------------------------------------------
# latency
# --------------------------------------------------------------------------------------------
@dataclass
class LatencyResult:
    """Wall-clock time of one forward pass over a batch, over ``repeats`` runs after warm-up."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    tokens: int
    tokens_per_s: float
    repeats: int
    device: str
    times_ms: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        rate = f", {format_count(self.tokens_per_s)} tokens/s" if self.tokens else ""
        return (f"{self.median_ms:.3g} ms median (p10 {self.p10_ms:.3g}, p90 {self.p90_ms:.3g}) "
                f"over {self.repeats} runs on {self.device}{rate}")


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of an already sorted list."""
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def timed_ms(fn: Callable[[], Any], device: torch.device | str | None = None) -> float:
    """Wall-clock milliseconds of one call ``fn()``. On CUDA the device is synchronised before and
    after, so the clock sees the queued kernels finish (not just their launch)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return (time.perf_counter() - t0) * 1e3


def latency(
    model: nn.Module | None,
    batch: torch.Tensor | Mapping[str, torch.Tensor] | Callable[[], Any],
    repeats: int = 20,
    warmup: int = 3,
    device: torch.device | str | None = None,
    tokens: int | None = None,
) -> LatencyResult:
    """Median, p10 and p90 milliseconds of ``model`` on ``batch``, and tokens per second.

    Runs under ``torch.inference_mode`` in eval mode (modes and device restored afterwards), with
    ``torch.cuda.synchronize()`` around each run on CUDA so the clock sees the kernels finish.

    Args:
        model: the model; may be ``None`` when ``batch`` is a callable.
        batch: a tensor (``model(batch)``), a dict in the training format (``input_ids [B, T+1]``
            feeds ``[:, :-1]``, ``x`` feeds ``x``, other keys go as keyword arguments) or a
            zero-argument callable timed as is.
        repeats: timed runs (>= 1). warmup: untimed runs first (>= 0).
        device: where to run; default where the model is.
        tokens: tokens per run for ``tokens_per_s``; default from the batch (token ids count one
            each, float inputs one per row, a callable 0).
    """
    _validate.positive_int("repeats", repeats)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup: expected an int >= 0, got {warmup!r}")
    is_fn = callable(batch) and not torch.is_tensor(batch) and not isinstance(batch, nn.Module)
    if model is None and not is_fn:
        raise TypeError("model: expected an nn.Module (None is allowed only when batch is a callable)")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module or None, got {type(model).__name__}")
    if tokens is None:
        tokens = 0 if is_fn else count_tokens(batch)

    @contextmanager
    def context():
        if model is None:
            yield torch.device(device) if device is not None else torch.device("cpu")
        else:
            with evaluating(model, device) as dev:
                yield dev

    with context() as dev, torch.inference_mode():
        if is_fn:
            run = batch
        else:
            moved = to_device(batch, dev)
            run = lambda: forward(model, moved)  # noqa: E731
        for _ in range(warmup):
            run()
        times = [timed_ms(run, dev) for _ in range(repeats)]
    ordered = sorted(times)
    median = statistics.median(ordered)
    return LatencyResult(
        median_ms=median,
        p10_ms=_quantile(ordered, 0.1),
        p90_ms=_quantile(ordered, 0.9),
        mean_ms=statistics.fmean(ordered),
        tokens=int(tokens),
        tokens_per_s=tokens / (median / 1e3) if tokens and median > 0 else 0.0,
        repeats=repeats,
        device=str(dev),
        times_ms=times,
    )


def latency_race(
    models: Mapping[str, nn.Module | Callable[[], Any]],
    batch: torch.Tensor | Mapping[str, torch.Tensor] | None,
    rounds: int = 15,
    warmup: int = 2,
    device: torch.device | str | None = None,
) -> dict[str, LatencyResult]:
    """Time several models on one batch in **interleaved** rounds: each round runs every model
    once, in a rotated order, so that machine noise (another process, clock changes) hits them
    all alike. Returns ``{name: LatencyResult}`` in the given order.

    Sequential timing (all of A, then all of B) can move a result by 20 % on a shared machine;
    interleaving and reporting p10-p90 is what makes a side-by-side verdict honest (see
    :func:`speedup_verdict`). A value may be a zero-argument callable (then ``batch`` is ignored).
    """
    if not isinstance(models, Mapping) or not models:
        raise TypeError("models: expected a non-empty mapping name -> nn.Module or callable")
    _validate.positive_int("rounds", rounds)
    names = list(models)
    runs: dict[str, Callable[[], Any]] = {}
    contexts = []
    with contextlib.ExitStack() as stack, torch.inference_mode():
        for name in names:
            m = models[name]
            if isinstance(m, nn.Module):
                dev = stack.enter_context(evaluating(m, device))
                moved = to_device(batch, dev)
                runs[name] = (lambda m=m, moved=moved: forward(m, moved))
                contexts.append(dev)
            elif callable(m):
                runs[name] = m
                contexts.append(torch.device(device) if device is not None else torch.device("cpu"))
            else:
                raise TypeError(f"models[{name!r}]: expected an nn.Module or a callable, got {type(m).__name__}")
        devs = dict(zip(names, contexts))
        for _ in range(warmup):
            for name in names:
                runs[name]()
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                times[name].append(timed_ms(runs[name], devs[name]))
    out = {}
    for name in names:
        ordered = sorted(times[name])
        median = statistics.median(ordered)
        tokens = 0 if not isinstance(models[name], nn.Module) else count_tokens(batch)
        out[name] = LatencyResult(
            median_ms=median, p10_ms=_quantile(ordered, 0.1), p90_ms=_quantile(ordered, 0.9),
            mean_ms=statistics.fmean(ordered), tokens=int(tokens),
            tokens_per_s=tokens / (median / 1e3) if tokens and median > 0 else 0.0,
            repeats=rounds, device=str(devs[name]), times_ms=times[name])
    return out


def speedup_verdict(base: LatencyResult, other: LatencyResult) -> str:
    """``"1.83x faster"``, ``"1.40x slower"`` or ``"no measurable difference"``: a verdict only
    when the two p10-p90 ranges do not overlap, so that a difference inside the noise is never
    called a speed-up."""
    ratio = base.median_ms / other.median_ms if other.median_ms > 0 else float("inf")
    if other.p90_ms < base.p10_ms:
        return f"{ratio:.2f}x faster"
    if other.p10_ms > base.p90_ms:
        return f"{1 / ratio:.2f}x slower"
    return "no measurable difference"


# --------------------------------------------------------------------------------------------
# routing statistics
# --------------------------------------------------------------------------------------------
@dataclass
class LayerRoutingStats:
    """Routing of one MoE layer over a data set.

    ``counts [E]`` top-k assignments per expert (the router's choices, dropped ones included),
    ``frequency [E]`` = counts / all assignments (sums to 1), ``mean_prob [E]`` the mean full
    softmax probability (Switch's ``P_i``), ``coselection [E, E]`` tokens that chose both ``i``
    and ``j`` (diagonal: tokens that chose ``i``; ``None`` for k = 1 or more than
    ``MAX_COSELECTION_EXPERTS`` experts), ``dropped_fraction`` of assignments lost to capacity,
    ``load_cv`` the coefficient of variation std/mean of the counts (Shazeer et al. 2017),
    ``entropy`` of ``frequency`` in nats (``log E`` when balanced), ``token_entropy`` the mean
    entropy of each token's router distribution (low = confident router). ``logits [N, E]``,
    ``gate_weights [N, k]`` and ``indices [N, k]`` keep the first ``N <= max_tokens`` tokens.
    """

    index: int
    name: str
    num_experts: int
    k: int
    num_tokens: int
    counts: torch.Tensor
    frequency: torch.Tensor
    mean_prob: torch.Tensor
    dropped_fraction: float
    load_cv: float
    entropy: float
    token_entropy: float
    coselection: torch.Tensor | None = None
    logits: torch.Tensor | None = field(default=None, repr=False)
    gate_weights: torch.Tensor | None = field(default=None, repr=False)
    indices: torch.Tensor | None = field(default=None, repr=False)

    @property
    def normalized_entropy(self) -> float:
        """``entropy / log E``: 1 for perfectly balanced load, 0 when one expert takes all."""
        return self.entropy / math.log(self.num_experts) if self.num_experts > 1 else 1.0

    @property
    def coselection_frequency(self) -> torch.Tensor | None:
        """``coselection / num_tokens``: the probability that a token picks both experts."""
        return None if self.coselection is None else self.coselection.double() / max(self.num_tokens, 1)

    def summary(self) -> dict[str, Any]:
        return {
            "layer": self.index, "name": self.name, "experts": self.num_experts, "k": self.k,
            "tokens": self.num_tokens, "dropped_fraction": self.dropped_fraction,
            "load_cv": self.load_cv, "entropy": self.entropy,
            "normalized_entropy": self.normalized_entropy, "token_entropy": self.token_entropy,
            "max_frequency": float(self.frequency.max()), "min_frequency": float(self.frequency.min()),
        }


@dataclass
class RoutingStats:
    """Per-layer routing statistics of a model over a data set: ``stats.layers[i].frequency`` ..."""

    layers: list[LayerRoutingStats]
    num_batches: int

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> LayerRoutingStats:
        return self.layers[i]

    def __iter__(self) -> Iterator[LayerRoutingStats]:
        return iter(self.layers)

    @property
    def num_tokens(self) -> int:
        return self.layers[0].num_tokens if self.layers else 0

    def to_frame(self):
        """Long table, one row per (layer, expert): frequency, mean_prob, counts."""
        import pandas as pd

        rows = [
            {"layer": s.index, "expert": e, "frequency": float(s.frequency[e]),
             "mean_prob": float(s.mean_prob[e]), "counts": int(s.counts[e])}
            for s in self.layers for e in range(s.num_experts)
        ]
        return pd.DataFrame(rows, columns=["layer", "expert", "frequency", "mean_prob", "counts"])

    def summary(self):
        """One row per layer: tokens, dropped fraction, load CV, entropies, extreme frequencies."""
        import pandas as pd

        return pd.DataFrame([s.summary() for s in self.layers]).set_index("layer")

    def __repr__(self) -> str:
        parts = ", ".join(f"L{s.index}: cv={s.load_cv:.2f}" for s in self.layers)
        return f"RoutingStats({len(self.layers)} layers, {self.num_tokens} tokens; {parts})"


MAX_COSELECTION_EXPERTS = 1024  # an [E, E] int64 matrix beyond this is too big to keep casually


class _LayerRecorder:
    """Accumulates one layer's :class:`RouterOutput` records across calls (forward hook)."""

    def __init__(self, layer: MoELayer, index: int, name: str, max_tokens: int, keep_tokens: bool):
        self.layer, self.index, self.name = layer, index, name
        self.max_tokens, self.keep_tokens = max_tokens, keep_tokens
        self.E, self.k = layer.num_experts, layer.k
        self.counts = torch.zeros(self.E, dtype=torch.long)
        self.prob_sum = torch.zeros(self.E, dtype=torch.float64)
        self.cosel = torch.zeros(self.E, self.E, dtype=torch.long) \
            if 2 <= self.k and self.E <= MAX_COSELECTION_EXPERTS else None
        self.tokens = self.dropped = 0
        self.token_entropy_sum = 0.0
        self.kept: dict[str, list[torch.Tensor]] = {"logits": [], "gate_weights": [], "indices": []}
        self.kept_rows = 0

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        r: RouterOutput | None = module.last_routing
        if r is None:
            raise RuntimeError(f"MoE layer {self.name!r} ran but set no last_routing")
        idx = r.indices.reshape(-1, r.indices.shape[-1])
        probs = r.probs.reshape(-1, self.E).double()
        t = idx.shape[0]
        self.tokens += t
        self.counts += torch.bincount(idx.reshape(-1), minlength=self.E).cpu()
        self.prob_sum += probs.sum(0).cpu()
        self.token_entropy_sum += float(-(probs * probs.clamp_min(1e-30).log()).sum())
        if r.keep is not None:
            self.dropped += int((~r.keep).sum())
        if self.cosel is not None and t:
            # pairs (i_a, i_b) of each token's choices; a == b fills the diagonal with the counts
            rows = idx.unsqueeze(2).expand(t, idx.shape[1], idx.shape[1]).reshape(-1)
            cols = idx.unsqueeze(1).expand(t, idx.shape[1], idx.shape[1]).reshape(-1)
            self.cosel += torch.bincount(rows * self.E + cols, minlength=self.E * self.E).view(self.E, self.E).cpu()
        if self.keep_tokens and self.kept_rows < self.max_tokens:
            n = min(t, self.max_tokens - self.kept_rows)
            self.kept["logits"].append(r.logits.reshape(-1, self.E)[:n].float().cpu())
            self.kept["gate_weights"].append(r.weights.reshape(t, -1)[:n].float().cpu())
            self.kept["indices"].append(idx[:n].cpu())
            self.kept_rows += n

    def result(self) -> LayerRoutingStats:
        total = int(self.counts.sum())
        freq = self.counts.double() / total if total else torch.zeros(self.E, dtype=torch.float64)
        nz = freq[freq > 0]
        cv2 = float(coefficient_of_variation_sq(self.counts.double())) if total else float("nan")
        kept = {k: torch.cat(v) if v else None for k, v in self.kept.items()}
        return LayerRoutingStats(
            index=self.index,
            name=self.name,
            num_experts=self.E,
            k=self.k,
            num_tokens=self.tokens,
            counts=self.counts,
            frequency=freq.float(),
            mean_prob=(self.prob_sum / max(self.tokens, 1)).float(),
            dropped_fraction=self.dropped / total if total else 0.0,
            load_cv=math.sqrt(cv2) if cv2 == cv2 else cv2,
            entropy=float(-(nz * nz.log()).sum()),
            token_entropy=self.token_entropy_sum / max(self.tokens, 1),
            coselection=self.cosel,
            **kept,
        )


def routing_stats(
    model: nn.Module,
    data: Any,
    batch_size: int = 64,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    max_tokens: int = 8192,
    keep_logits: bool = True,
) -> RoutingStats:
    """Run ``model`` over ``data`` and collect the routing of every MoE layer with forward hooks.

    Frequencies are the ``f_i`` and mean probabilities the ``P_i`` of the Switch load-balancing
    loss (Fedus et al. 2022, eq. 4); the coefficient of variation is Shazeer et al.'s (2017)
    balance measure. A layer module called several times per forward (weights shared across
    depth) accumulates all its calls. Hooks are removed and every module's train/eval mode and
    the model's device restored, even when the forward raises.

    Args:
        model: a model containing :class:`~moe_course.layers.MoELayer` modules.
        data: a ``datasets.Dataset`` (torch format or not) with ``input_ids [T+1]`` (the model
            reads ``[:, :-1]``) or ``x``; a tensor or dict of tensors (chunked by rows); or an
            iterable of batches (tensors are fed as is, dicts in the training format).
        batch_size: rows per batch when ``data`` is chunked here.
        max_batches: stop after this many batches (``None``: all).
        device: where to run; default where the model is.
        max_tokens: tokens per layer whose logits, gate weights and indices are kept.
        keep_logits: keep those per-token tensors at all.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    _validate.positive_int("batch_size", batch_size)
    _validate.positive_int("max_batches", max_batches, allow_none=True)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(f"max_tokens: expected an int >= 0, got {max_tokens!r}")
    names = {id(m): n for n, m in model.named_modules()}
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"model: {type(model).__name__} has no MoE layers (moe_course.layers.MoELayer); "
                         "routing statistics need at least one")
    recorders = [_LayerRecorder(layer, i, names.get(id(layer), str(i)), max_tokens, keep_logits)
                 for i, layer in enumerate(layers)]
    handles = []
    n_batches = 0
    try:
        for layer, rec in zip(layers, recorders):
            handles.append(layer.register_forward_hook(rec))
        with evaluating(model, device) as dev, torch.inference_mode():
            for batch in iter_batches(data, batch_size):
                if max_batches is not None and n_batches >= max_batches:
                    break
                forward(model, to_device(batch, dev))
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
    if n_batches == 0 or recorders[0].tokens == 0:
        raise ValueError("data: no batches (or no tokens) to route; pass a non-empty data set")
    return RoutingStats(layers=[rec.result() for rec in recorders], num_batches=n_batches)


# --------------------------------------------------------------------------------------------
# comparison table
# --------------------------------------------------------------------------------------------
_HIGHER_IS_BETTER = ("accuracy",)
_QUALITY_KEYS = ("accuracy", "perplexity", "loss")


def compare(
    models: Mapping[str, nn.Module],
    data: Any = None,
    evaluate_fn: Callable[[nn.Module, Any], Mapping[str, float] | float] | None = None,
    latency_batch: Any = None,
    batch_size: int = 64,
    max_batches: int | None = None,
    repeats: int = 10,
    device: torch.device | str | None = None,
):
    """One row per variant: size, active compute, quality and latency, with ratios to the first row.

    Columns: ``params``, ``size (MB)``, ``active params/token``, ``FLOPs/token``, ``× smaller``
    (first row's bytes / this row's), then when ``data`` is given the metrics of ``evaluate_fn``
    (default :func:`moe_course.train.evaluate`: ``loss`` and ``perplexity`` or ``accuracy``) and
    ``Δ <metric>`` (this row minus the first) for the quality metric, then when
    ``latency_batch`` is given ``latency (ms)`` (median) and ``× faster``. The quality metric's
    name is in ``df.attrs["quality_metric"]``.

    Args:
        models: ``{name: model}``; the first entry is the reference.
        data: evaluation data for ``evaluate_fn``; ``None`` skips quality.
        evaluate_fn: ``f(model, data) -> dict of metrics`` (or one number, named ``quality``).
        latency_batch: a batch for :func:`latency`; ``None`` skips latency.
    """
    import pandas as pd

    if not isinstance(models, Mapping) or not models:
        raise ValueError("models: expected a non-empty dict {name: nn.Module}")
    for name, m in models.items():
        if not isinstance(m, nn.Module):
            raise TypeError(f"models[{name!r}]: expected an nn.Module, got {type(m).__name__}")
    if data is not None and evaluate_fn is None:
        try:
            from .train import evaluate
        except ImportError as err:  # the package is usable without its training module
            warnings.warn(f"compare: moe_course.train is unavailable ({err}); skipping quality", stacklevel=2)
        else:
            def evaluate_fn(model, d):
                return evaluate(model, d, batch_size=batch_size, device=device, max_batches=max_batches)

    rows: dict[str, dict[str, Any]] = {}
    metric = None
    for name, model in models.items():
        rep = size_report(model)
        row: dict[str, Any] = {
            "params": rep.total_params,
            "size (MB)": rep.megabytes,
            "active params/token": rep.active_params_per_token,
            "FLOPs/token": rep.flops_per_token,
        }
        if data is not None and evaluate_fn is not None:
            result = evaluate_fn(model, data)
            result = dict(result) if isinstance(result, Mapping) else {"quality": float(result)}
            row.update({k: float(v) for k, v in result.items()})
            if metric is None:
                metric = next((k for k in _QUALITY_KEYS if k in result), next(iter(result)))
        if latency_batch is not None:
            row["latency (ms)"] = latency(model, latency_batch, repeats=repeats, device=device).median_ms
        rows[name] = row

    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "variant"
    ref = df.iloc[0]
    df["× smaller"] = ref["size (MB)"] / df["size (MB)"]
    if metric is not None:
        df[f"Δ {metric}"] = df[metric] - ref[metric]
        df.attrs["quality_metric"] = metric
        df.attrs["higher_is_better"] = metric in _HIGHER_IS_BETTER
    if "latency (ms)" in df:
        df["× faster"] = ref["latency (ms)"] / df["latency (ms)"]
    size_cols = ["params", "size (MB)", "active params/token", "FLOPs/token", "× smaller"]
    time_cols = [c for c in ("latency (ms)", "× faster") if c in df]
    quality_cols = [c for c in df.columns if c not in size_cols and c not in time_cols]
    df = df[size_cols + quality_cols + time_cols]
    return df


# --------------------------------------------------------------------------------------------
# routing flips and generation quality (judging a compressed model beyond perplexity)
# --------------------------------------------------------------------------------------------
@dataclass
class RoutingFlips:
    """Result of :func:`routing_flip_rate`: ``per_layer[i]`` is the share of tokens whose top-k
    expert set in MoE layer ``i`` differs between the two models; ``overall`` the share over all
    (layer, token) pairs (= the mean of ``per_layer``: every layer routes the same tokens);
    ``num_tokens`` tokens per layer. ``float(result)`` is ``overall``."""

    overall: float
    per_layer: list[float]
    num_tokens: int

    def __float__(self) -> float:
        return float(self.overall)


class _IndexRecorder:
    """Forward hook keeping every call's top-k indices ``[tokens, k]`` (the order of the k
    choices sorted away, so that rows compare as sets)."""

    def __init__(self) -> None:
        self.calls: list[torch.Tensor] = []

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        r: RouterOutput | None = module.last_routing
        if r is None:
            raise RuntimeError("an MoE layer ran but set no last_routing")
        idx = r.indices.reshape(-1, r.indices.shape[-1])
        self.calls.append(idx.sort(dim=-1).values.cpu())


def routing_flip_rate(
    reference: nn.Module,
    other: nn.Module,
    data: Any,
    batch_size: int = 64,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
) -> RoutingFlips:
    """The share of tokens whose top-k expert **set** changes between two models with the same
    experts (e.g. an fp32 model and its quantized copy), per MoE layer and overall.

    Both models run end to end on the same inputs, and each MoE layer's choice is compared token
    by token as a set (the order of the k choices does not count). Each model routes its **own**
    hidden states: layer ``i`` of ``other`` sees what ``other``'s first ``i - 1`` layers made of
    the input, as a deployed compressed model does, so a flip in an early layer can cause flips
    downstream. (Feeding the reference's hidden states to both routers would isolate one
    layer's own error instead; that is not what this measures.)

    Args:
        reference: the original model.
        other: the compressed model; the same number of MoE layers, each with the same number of
            experts and the same ``k`` as the reference's (a model whose experts were dropped
            or merged renumbers them, so its sets cannot be compared).
        data: as for :func:`routing_stats` (a ``datasets.Dataset``, a tensor, a dict of tensors
            or an iterable of batches).
        batch_size, max_batches, device: as for :func:`routing_stats`.
    """
    for arg, m in (("reference", reference), ("other", other)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{arg}: expected an nn.Module, got {type(m).__name__}")
    _validate.positive_int("batch_size", batch_size)
    _validate.positive_int("max_batches", max_batches, allow_none=True)
    ref_layers, oth_layers = moe_layers(reference), moe_layers(other)
    if not ref_layers:
        raise ValueError(f"reference: {type(reference).__name__} has no MoE layers; the flip rate needs some")
    if len(oth_layers) != len(ref_layers):
        raise ValueError(f"other: has {len(oth_layers)} MoE layers, reference has {len(ref_layers)}; "
                         "routing flips compare models with the same MoE layers (measure a trimmed model "
                         "against the trimmed fp32 model)")
    for i, (a, b) in enumerate(zip(ref_layers, oth_layers)):
        if a.num_experts != b.num_experts:
            raise ValueError(f"other: MoE layer {i} has {b.num_experts} experts, reference has {a.num_experts}; "
                             "routing flips need the same experts in both models (dropped or merged "
                             "experts are renumbered)")
        if a.k != b.k:
            raise ValueError(f"other: MoE layer {i} routes to k={b.k} experts, reference to k={a.k}")
    recs = [[_IndexRecorder() for _ in ref_layers], [_IndexRecorder() for _ in oth_layers]]
    handles = []
    n_batches = 0
    try:
        for layers, rs in zip((ref_layers, oth_layers), recs):
            handles += [layer.register_forward_hook(r) for layer, r in zip(layers, rs)]
        with contextlib.ExitStack() as stack, torch.inference_mode():
            dev_r = stack.enter_context(evaluating(reference, device))
            dev_o = stack.enter_context(evaluating(other, device))
            for batch in iter_batches(data, batch_size):
                if max_batches is not None and n_batches >= max_batches:
                    break
                forward(reference, to_device(batch, dev_r))
                forward(other, to_device(batch, dev_o))
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
    per_layer, tokens = [], 0
    for i, (ra, rb) in enumerate(zip(*recs)):
        if not ra.calls:
            raise ValueError("data: no batches (or no tokens) to route; pass a non-empty data set")
        a, b = torch.cat(ra.calls), torch.cat(rb.calls)
        if a.shape != b.shape:
            raise ValueError(f"other: MoE layer {i} routed {tuple(b.shape)} token choices, the reference "
                             f"{tuple(a.shape)}; the models do not run the same tokens through it")
        flipped = (a != b).any(dim=-1)
        per_layer.append(float(flipped.double().mean()) if len(flipped) else float("nan"))
        tokens = len(flipped)
    if tokens == 0:
        raise ValueError("data: no batches (or no tokens) to route; pass a non-empty data set")
    return RoutingFlips(overall=float(statistics.fmean(per_layer)), per_layer=per_layer, num_tokens=tokens)


def repetition_rate(ids: torch.Tensor | Iterable[int], n: int = 4) -> float:
    """The share of repeated n-grams in a sequence: ``1 - distinct n-grams / n-grams`` (one
    minus Li et al.'s 2016 distinct-n). 0 when no n-gram occurs twice; a constant sequence of
    length L scores ``1 - 1 / (L - n + 1)``. ``[B, L]`` input: the mean over rows; NaN when a
    row is shorter than ``n``."""
    _validate.positive_int("n", n)
    t = torch.as_tensor(ids if torch.is_tensor(ids) else list(ids))
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise ValueError(f"ids: expected a [L] or [B, L] sequence of token ids, got shape {tuple(t.shape)}")
    rates = []
    for row in t.tolist():
        grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
        rates.append(1 - len(set(grams)) / len(grams) if grams else float("nan"))
    return float(statistics.fmean(rates))


@dataclass
class GenerationQuality:
    """Result of :func:`generation_quality`.

    ``perplexity``: the reference model's perplexity on the generated tokens (given the prompt
    and the text generated before them); ``repetition``: :func:`repetition_rate` of the
    generated tokens (mean over prompts); ``texts``: the decoded continuations (``None`` when
    no tokenizer is known); ``tokens``: ``[B, T_prompt + new_tokens]`` ids, prompts included.
    """

    perplexity: float
    repetition: float
    texts: list[str] | None
    tokens: torch.Tensor
    prompt_length: int
    new_tokens: int
    seed: int
    temperature: float
    ngram: int


def generation_quality(
    model: nn.Module,
    prompts: Any,
    reference: nn.Module | None = None,
    new_tokens: int = 48,
    seed: int = 0,
    temperature: float = 1.0,
    ngram: int = 4,
    tokenizer: Any = None,
) -> GenerationQuality:
    """Judge a language model by what it **generates**, not only by its perplexity on held-out
    text: sample ``new_tokens`` continuations of every prompt at a fixed ``seed`` (one batch,
    ``model.generate`` with its KV cache), then measure the ``reference`` model's perplexity on
    the generated tokens and the share of repeated n-grams in them.

    A compressed model whose samples the original model finds unlikely (a higher perplexity
    than the original's own samples get) or that loops (a higher repetition rate) has lost
    something a validation perplexity can hide. The same seed gives the same uniform draws, so
    two models with the same logits produce the same text; with sampling (``temperature`` > 0)
    small logit changes can still pick another token, so compare averages over several prompts.

    Args:
        model: a causal LM with ``generate(ids, max_new_tokens, temperature, generator=...)``
            (:class:`moe_course.models.MoETransformerLM`).
        prompts: ``[B, T]`` (or ``[T]``) token ids, a list of equal-length id lists, or a list of
            equal-length strings (encoded with ``tokenizer`` or ``model.tokenizer``).
        reference: the model that judges the text (the uncompressed original); default
            ``model`` itself.
        new_tokens: tokens generated per prompt; the prompt plus them must fit the reference's
            context length.
        seed: seed of the sampling generator.
        temperature: sampling temperature (0 = greedy; default 1, the model's own distribution).
        ngram: n of the repetition rate.
        tokenizer: decodes the text for display (default ``model.tokenizer`` or the reference's).
    """
    if not isinstance(model, nn.Module) or not callable(getattr(model, "generate", None)):
        raise TypeError(f"model: expected a language model with a generate() method, got {type(model).__name__}")
    reference = model if reference is None else reference
    if not isinstance(reference, nn.Module):
        raise TypeError(f"reference: expected an nn.Module (the original LM), got {type(reference).__name__}")
    _validate.positive_int("new_tokens", new_tokens)
    _validate.positive_int("ngram", ngram)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {seed!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature: expected a number >= 0, got {temperature!r}")
    tok = tokenizer if tokenizer is not None else (getattr(model, "tokenizer", None)
                                                   or getattr(reference, "tokenizer", None))
    if isinstance(prompts, str):
        raise TypeError("prompts: expected a list of prompts (or a [B, T] tensor), got one string; wrap it in a list")
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, str) for p in prompts):
        if tok is None:
            raise ValueError("prompts: strings need a tokenizer (pass tokenizer= or token ids)")
        prompts = [tok.encode(p) for p in prompts]
    try:
        ids = torch.as_tensor(prompts, dtype=torch.long)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"prompts: expected [B, T] token ids of equal length, got {type(prompts).__name__} ({err})") from None
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"prompts: expected a non-empty [B, T] batch of token ids, got shape {tuple(ids.shape)}")
    vocab = _config_value(reference, "vocab_size")
    if int(ids.min()) < 0 or (vocab is not None and int(ids.max()) >= vocab):
        raise ValueError(f"prompts: expected token ids in [0, {vocab}), got values in "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    ctx = _config_value(reference, "context_length")
    T = ids.shape[1]
    if ctx is not None and T + new_tokens > ctx:
        raise ValueError(f"new_tokens: the prompt ({T}) plus new_tokens ({new_tokens}) exceeds the reference's "
                         f"context length {ctx}; use shorter prompts or fewer new tokens")
    with torch.inference_mode():
        with evaluating(model) as dev:
            gen = torch.Generator().manual_seed(seed)
            out = model.generate(ids.to(dev), new_tokens, float(temperature), generator=gen).cpu()
        with evaluating(reference) as dev:
            logits = reference(out[:, :-1].to(dev)).float().cpu()
    pred = logits[:, T - 1:]  # positions T-1 .. end-1 predict the generated tokens T .. end
    nll = torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), out[:, T:].reshape(-1))
    new = out[:, T:]
    texts = [tok.decode(row.tolist()) for row in new] if tok is not None else None
    return GenerationQuality(perplexity=float(torch.exp(nll)), repetition=repetition_rate(new, ngram),
                             texts=texts, tokens=out, prompt_length=T, new_tokens=new_tokens, seed=seed,
                             temperature=float(temperature), ngram=ngram)
