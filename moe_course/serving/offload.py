r"""Expert offloading (chapter 13, "Serving a compressed MoE"): experts live in slow memory, a small
fast cache holds the ones in use.

At batch-1 decode a token needs only ``k`` of the ``N`` experts of each layer, so a model whose
experts do not fit the fast memory can still run if the fast memory caches ``C < N`` experts per
layer and fetches the others on demand (Eliseev & Mazur 2023, "Fast inference of Mixture-of-Experts
language models with offloading": an LRU cache plus speculative prefetch; llama.cpp's
``--n-cpu-moe``; MoE-Infinity). What it costs is the bytes moved per token:

.. math:: \text{bytes/token} = \sum_{\ell} (\text{misses per token})_\ell \times \text{bytes per expert}

so it falls with a better hit rate (a policy that fits the routing, more cache, fewer experts after
pruning or merging) and with smaller experts (quantization).

* :class:`ExpertStore` -- the slow store: every expert of every MoE layer in one safetensors file,
  memory-mapped; reading an expert copies it out of the page cache (CPU-only machines) -- on a GPU
  machine the fast store is GPU memory and the copy crosses PCIe.
* :class:`ExpertCache` -- the fast store: ``capacity`` experts per layer, ``"lru"`` or ``"lfu"``
  (least frequently used so far, ties by recency) eviction; counts hits, misses and bytes moved.
* :func:`offload` -- a copy of a model whose :class:`~moe_course.layers.SparseMoE` layers fetch
  their experts through the cache (:class:`OffloadedMoE`), with optional prefetch of the next
  layer's experts, guessed by applying the next layer's router to this layer's input.
  Outputs equal the original model's (test).
* :func:`simulate` -- replays recorded routing decisions through a cache: hit rate and bytes per
  token for many cache sizes and policies in milliseconds, without running the model.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from moe_course.dispatch import capacity_mask
from moe_course.layers import CompressedExperts, SparseMoE, moe_layers

__all__ = ["ExpertStore", "ExpertCache", "OffloadedMoE", "offload", "cache_stats", "simulate", "CacheStats", "POLICIES"]

POLICIES = ("lru", "lfu")
_NAMES = ("w_in", "w_gate", "w_out")


class ExpertStore:
    """Slow memory: the experts of every MoE layer of a model in one memory-mapped safetensors file."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        self._file = safe_open(str(self.path), framework="pt")  # memory-mapped; tensors copied on read
        self._keys = set(self._file.keys())
        self.expert_bytes: dict[int, int] = {}  # bytes of one expert, per layer
        for key in self._keys:
            layer, expert, _ = key.split(".")
            if expert == "0":
                t = self._file.get_tensor(key)
                self.expert_bytes[int(layer[5:])] = self.expert_bytes.get(int(layer[5:]), 0) + t.numel() * t.element_size()

    @staticmethod
    def write(model: nn.Module, path: str | Path) -> "ExpertStore":
        """Write every SparseMoE's experts as ``layer{l}.{e}.{w_in|w_gate|w_out}`` and open the file."""
        from safetensors.torch import save_file

        tensors = {}
        for li, layer in enumerate(moe_layers(model)):
            if not isinstance(layer, SparseMoE):
                continue
            if isinstance(layer.experts, CompressedExperts):
                raise TypeError(f"MoE layer {li}: compressed experts ({type(layer.experts).__name__}) cannot be "
                                "offloaded by this store; offload the model before quantizing or factorizing")
            for name in _NAMES:
                w = getattr(layer.experts, name)
                if w is not None:
                    for e in range(w.shape[0]):
                        tensors[f"layer{li}.{e}.{name}"] = w[e].detach().cpu().contiguous()
        if not tensors:
            raise ValueError("model: no SparseMoE layer to offload")
        save_file(tensors, str(path))
        return ExpertStore(path)

    def read(self, layer: int, expert: int, device: torch.device) -> tuple[torch.Tensor | None, ...]:
        """``(w_in, w_gate or None, w_out)`` of one expert, copied from the file to ``device``."""
        out = []
        for name in _NAMES:
            key = f"layer{layer}.{expert}.{name}"
            out.append(self._file.get_tensor(key).to(device) if key in self._keys else None)
        return tuple(out)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    bytes_moved: int = 0
    prefetched: int = 0
    prefetch_used: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else float("nan")


class ExpertCache:
    """``capacity`` experts of one layer in fast memory, with ``lru`` or ``lfu`` eviction."""

    def __init__(self, capacity: int, policy: str = "lru"):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity: expected an int >= 1 (experts per layer), got {capacity!r}")
        if policy not in POLICIES:
            raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
        self.capacity, self.policy = capacity, policy
        self.slots: OrderedDict[int, object] = OrderedDict()  # expert -> weights, oldest use first
        self.uses: dict[int, int] = {}
        self.stats = CacheStats()
        self._from_prefetch: set[int] = set()

    def _evict(self) -> None:
        if self.policy == "lru":
            victim = next(iter(self.slots))
        else:  # least frequently used; OrderedDict order breaks ties by recency
            victim = min(self.slots, key=lambda e: self.uses.get(e, 0))
        del self.slots[victim]
        self._from_prefetch.discard(victim)

    def get(self, expert: int, load, nbytes: int):
        """The expert's weights, loading them with ``load()`` (``nbytes`` moved) on a miss."""
        self.uses[expert] = self.uses.get(expert, 0) + 1
        if expert in self.slots:
            self.stats.hits += 1
            if expert in self._from_prefetch:
                self.stats.prefetch_used += 1
                self._from_prefetch.discard(expert)
            self.slots.move_to_end(expert)
            return self.slots[expert]
        self.stats.misses += 1
        self.stats.bytes_moved += nbytes
        if len(self.slots) >= self.capacity:
            self._evict()
        self.slots[expert] = load()
        return self.slots[expert]

    def prefetch(self, expert: int, load, nbytes: int) -> None:
        """Bring an expert in ahead of use (counted as moved bytes, not as a hit or miss)."""
        if expert in self.slots:
            return
        if len(self.slots) >= self.capacity:
            self._evict()
        self.slots[expert] = load()
        self.stats.bytes_moved += nbytes
        self.stats.prefetched += 1
        self._from_prefetch.add(expert)


class OffloadedMoE(nn.Module):
    """A SparseMoE whose router and shared experts stay in fast memory and whose experts come from
    an :class:`ExpertStore` through an :class:`ExpertCache` (one expert at a time, as at decode)."""

    def __init__(self, moe: SparseMoE, layer: int, store: ExpertStore, cache: ExpertCache):
        super().__init__()
        self.router, self.shared = copy.deepcopy(moe.router), copy.deepcopy(moe.shared)
        self.k, self.num_experts, self.d_model = moe.k, moe.num_experts, moe.d_model
        self.capacity_factor, self.activation = moe.capacity_factor, moe.experts.activation
        self.layer, self.store, self.cache = layer, store, cache
        self.next_layer: OffloadedMoE | None = None
        self.prefetch = False
        self.last_routing = None

    def _load(self, expert: int):
        device = self.router.gate.weight.device
        return lambda: self.store.read(self.layer, expert, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.d_model)
        r = self.router(flat)
        if self.capacity_factor is not None:
            cap = SparseMoE.capacity(self, flat.shape[0])
            r = replace(r, keep=capacity_mask(r.indices, self.num_experts, cap))
        self.last_routing = r.detach()
        y = torch.zeros_like(flat)
        nbytes = self.store.expert_bytes[self.layer]
        weights = r.weights.to(flat.dtype) if r.keep is None else r.weights.to(flat.dtype) * r.keep
        for e in torch.unique(r.indices).tolist():
            w_in, w_gate, w_out = self.cache.get(e, self._load(e), nbytes)
            rows, slot = (r.indices == e).nonzero(as_tuple=True)
            h = flat[rows] @ w_in
            h = torch.nn.functional.silu(flat[rows] @ w_gate) * h if w_gate is not None else torch.nn.functional.gelu(h)
            y.index_add_(0, rows, (h @ w_out) * weights[rows, slot, None])
        if self.shared is not None:
            y = y + self.shared.forward_all(flat).sum(dim=0)
        if self.prefetch and self.next_layer is not None:  # speculative: next router on this input
            nxt = self.next_layer
            guess = torch.unique(nxt.router(flat).indices).tolist()
            for e in guess[: nxt.cache.capacity]:
                nxt.cache.prefetch(e, nxt._load(e), self.store.expert_bytes[nxt.layer])
        return y.reshape(x.shape)


def offload(model: nn.Module, path: str | Path, cache_size: int, *, policy: str = "lru",
            prefetch: bool = False) -> nn.Module:
    """A copy of ``model`` whose SparseMoE layers fetch experts from ``path`` through per-layer caches.

    The experts are written to the safetensors file ``path`` (slow store) and removed from the copy;
    ``model`` is not modified. ``cache_size`` experts per layer stay in fast memory. After running,
    ``cache_stats(model)`` gives per-layer hits, misses and bytes moved.
    """
    if not isinstance(prefetch, bool):
        raise TypeError(f"prefetch must be a bool, got {type(prefetch).__name__}")
    store = ExpertStore.write(model, path)
    new = copy.deepcopy(model)
    layers = [m for m in moe_layers(new) if isinstance(m, SparseMoE)]
    previous = None
    for li, layer in enumerate(layers):
        off = OffloadedMoE(layer, li, store, ExpertCache(min(cache_size, layer.num_experts), policy))
        off.prefetch = prefetch
        if previous is not None:
            previous.next_layer = off
        previous = off
        parent_name, _, child = next(n for n, m in new.named_modules() if m is layer).rpartition(".")
        setattr(new.get_submodule(parent_name) if parent_name else new, child, off)
    new.offload_store = store
    return new


def cache_stats(model: nn.Module) -> list[CacheStats]:
    """Per offloaded layer, the cache's counters."""
    return [m.cache.stats for m in model.modules() if isinstance(m, OffloadedMoE)]


def simulate(trace: Sequence[torch.Tensor], cache_size: int, policy: str = "lru",
             expert_bytes: Sequence[int] | int = 1) -> dict[str, float]:
    """Replay routing decisions through per-layer caches, token by token, layer by layer.

    ``trace[l]`` is layer ``l``'s ``[T, k]`` expert indices for the same ``T`` tokens in decode order
    (e.g. ``routing_stats(...).layers[l].indices``). Returns the hit rate, misses per token and bytes
    moved per token (``expert_bytes`` per layer, or one number for all).
    """
    if not trace:
        raise ValueError("trace: expected one [T, k] index tensor per MoE layer, got none")
    tokens = trace[0].shape[0]
    if any(t.dim() != 2 or t.shape[0] != tokens for t in trace):
        raise ValueError("trace: every layer needs a [T, k] tensor for the same T tokens")
    sizes = [expert_bytes] * len(trace) if isinstance(expert_bytes, int) else list(expert_bytes)
    caches = [ExpertCache(cache_size, policy) for _ in trace]
    lists = [t.tolist() for t in trace]
    for i in range(tokens):
        for cache, idx, nbytes in zip(caches, lists, sizes):
            for e in dict.fromkeys(idx[i]):  # a token needs each chosen expert once
                cache.get(e, lambda: None, nbytes)
    hits = sum(c.stats.hits for c in caches)
    misses = sum(c.stats.misses for c in caches)
    return {"hit_rate": hits / (hits + misses), "misses_per_token": misses / tokens,
            "bytes_per_token": sum(c.stats.bytes_moved for c in caches) / tokens}
