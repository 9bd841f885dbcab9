r"""A bridge to Hugging Face ``transformers`` MoE models (chapter 12, "A real checkpoint"): :func:`from_hf`, :func:`to_hf`.

:func:`from_hf` takes a transformers 5 causal LM and returns the same model with every MoE block
replaced by the course's :class:`HFSparseMoE` (a :class:`~moe_course.layers.SparseMoE` with a
plain :class:`~moe_course.layers.TopKRouter` and stacked :class:`~moe_course.layers.Experts`), so
every function of :mod:`moe_course.compress` and :mod:`moe_course.metrics` works on it unchanged.
:func:`to_hf` turns a (compressed) bridged model back into a plain transformers model whose
``save_pretrained`` / ``from_pretrained`` round trip gives the same logits.

Supported architectures (``config.model_type``) and what their MoE block computes, with ``p =
softmax(x W_g^T)`` and ``TopK`` the ``k`` largest entries:

* ``mixtral`` (Jiang et al. 2024): ``TopK(p)`` renormalised;
* ``qwen2_moe`` (Qwen1.5-MoE): ``TopK(p)``, renormalised iff ``norm_topk_prob``, plus one shared
  SwiGLU expert (its own width) times ``sigmoid(x w_s)``;
* ``qwen3_moe``: ``TopK(p)``, renormalised iff ``norm_topk_prob``;
* ``olmoe`` (Muennighoff et al. 2024): ``TopK(p)``, renormalised iff ``norm_topk_prob``;
* ``deepseek_v2`` (DeepSeekMoE, Dai et al. 2024; DeepSeek-V2-Lite): ``routed_scaling_factor *
  TopK(p)`` with greedy top-k, plus ``n_shared_experts`` always-on experts (one MLP of width
  ``n_shared * I``, which is their sum);
* ``granitemoe``: ``softmax(TopK(x W_g^T))``, which is ``TopK(p)`` renormalised.

Every expert is SwiGLU, ``E_i(x) = W^{down}_i (\mathrm{silu}(W^{gate}_i x) \odot W^{up}_i x)``
(Shazeer 2020). Dense decoder layers (DeepSeek's ``first_k_dense_replace``, Qwen's
``mlp_only_layers``) stay transformers modules.

In float32 the bridged logits equal transformers' to rounding (``tests/test_hf.py``: every
architecture above, 1 to 64 tokens, every dispatch strategy, to 1e-5). The course's router
computes its logits in float32 whatever the weights' dtype; transformers' Mixtral, Qwen and OLMoE
routers compute them in the weights' dtype, so in bf16 a near-tie between two experts can
resolve differently. Not reproduced: Mixtral's training-time router jitter, DeepSeek's
group-limited routing (DeepSeek-V2 ``group_limited_greedy``, DeepSeek-V3's sigmoid router),
``output_router_logits``.

Layouts, and what shares storage
--------------------------------
transformers 5 stores a layer's routed experts as two stacked parameters (``use_experts_implementation``
experts, ``is_transposed=False``, ``is_concatenated=True``; the same layout for every model above)::

    gate_up_proj [E, 2I, H]   rows 0..I-1: W^gate_i, rows I..2I-1: W^up_i   (y = x @ W^T, nn.Linear style)
    down_proj    [E, H, I]    W^down_i

The course stores row-vector weights (``y = x @ W``; :class:`~moe_course.layers.Experts`)::

    w_gate [E, H, I] = gate_up_proj[:, :I].transpose(1, 2)
    w_in   [E, H, I] = gate_up_proj[:, I:].transpose(1, 2)
    w_out  [E, I, H] = down_proj.transpose(1, 2)

These are strided *views*, so :func:`from_hf` copies no expert weight: ``w_gate``/``w_in``/``w_out``
share storage with ``gate_up_proj``/``down_proj``; the router weight ``[E, H]`` is the *same*
parameter object (``TopKRouter.gate.weight``); so are Qwen2-MoE's shared-expert gate ``[1, H]``
(:attr:`HFSparseMoE.shared_gate`) and everything outside the MoE blocks (attention, norms,
embeddings, head). Shared experts (Qwen2-MoE ``shared_expert``, DeepSeek ``shared_experts``;
``nn.Linear`` weights ``[I_s, H]``/``[H, I_s]``) become an ``Experts`` of views too; DeepSeek's one
MLP of width ``n_shared * I`` is viewed as ``n_shared`` experts of width ``I`` (a SwiGLU MLP is the
sum of the MLPs on any split of its hidden units). By default (``inplace=False``) the bridged
model is a new module tree over the same tensors: the original stays a working transformers
model and nothing is copied; editing weights of one in place edits the other. Moving the bridged
model to another device or dtype materialises each view separately (same total size).

:func:`to_hf` goes back: the router weight and ``w_out^T`` are reused when their layout allows
(``down_proj`` must be contiguous), and ``gate_up_proj`` is the original storage again when
``w_gate``/``w_in`` are still the untouched halves of one ``[E, 2I, H]`` tensor; any compressed or
rebuilt expert stack (pruned, merged, deep-copied by a compression function) is copied into new
contiguous tensors. Compression functions copy the model (``inplace=False``) before changing it,
so compressing a bridged model never changes the original.

What :func:`to_hf` can express in a transformers config
--------------------------------------------------------
* expert pruning / expert drop with the same number of experts in every layer: fewer experts in
  the config, router rows removed;
* merging (M-SMoE, HC-SMoE): the router keeps its ``N`` rows and each of the ``N`` slots gets a
  copy of its group's merged expert, which computes exactly what the
  :class:`~moe_course.compress.merging.MergedRouter` does (choices landing in one group add their
  gates); the course stores each group once, transformers ``N`` times, so the file does not shrink;
* block drop: fewer ``num_hidden_layers`` (per-layer lists such as ``layer_types``,
  ``mlp_only_layers``, ``first_k_dense_replace`` renumbered);
* MoE layer drop (:func:`~moe_course.compress.trimming.drop_layers`): only Qwen2-MoE / Qwen3-MoE
  can say "this layer has no MoE block" (``mlp_only_layers``); the dense MLP of those layers gets
  ``intermediate_size = 0``, which computes exactly zero. Other architectures raise;
* magnitude pruning: zeros in dense tensors (no saving on disk).

Quantized experts (:func:`~moe_course.compress.quantization.quantize`) have no transformers-native
format: :func:`save_pretrained` writes the **course's packed format** (below) and
:func:`from_pretrained` loads it through the bridge; ``to_hf(model, materialize=True)`` writes dense
dequantized (or multiplied-out low-rank) tensors instead: same logits, no saving. Everything else
that has no transformers equivalent (dynamic skipping, capacity factors, different expert counts
per layer, low-rank or shared-base experts without ``materialize=True``) raises a ``ValueError``
that names the step.

The course's packed format (``moe-course-packed`` version 1)
------------------------------------------------------------
A directory that :func:`save_pretrained` writes when the model holds packed modules
(:class:`~moe_course.compress.quantization.QuantizedExperts`, ``QuantizedLinear``,
``QuantizedEmbedding``):

* ``config.json``: the transformers config of the model (as :func:`to_hf` would write it) with a
  ``quantization_config = {"quant_method": "moe_course_packed", ...}`` entry that names the format;
* ``moe_course_model.safetensors`` (transformers' ``model.safetensors`` renamed, shards and index
  too): every other tensor under its transformers name, full precision. The rename makes plain
  ``transformers.AutoModelForCausalLM.from_pretrained`` fail ("no file named model.safetensors")
  instead of loading freshly initialised experts with only a warning;
* ``moe_course_packed.safetensors``: for each packed module, its buffers (``{name}{i}_codes`` uint8,
  ``{name}{i}_scale`` fp16, ``{name}{i}_zero`` uint8 for ``name`` in ``in`` (= up), ``gate``,
  ``out`` (= down), expert ``i``; rows ``[out_features, in_features]`` as in transformers, groups
  along the input dimension) under the module's transformers path, and in the file's metadata the
  constructor arguments (bits per expert, group size, symmetric, scale dtype).

4-bit codes with a group of 32 cost ``4 + 24/32 = 4.75`` bits per weight instead of 32 (fp32).

Everything here needs ``transformers`` (the ``[hf]`` extra).
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import sys
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dispatch import STRATEGIES, capacity_mask, dispatch as _dispatch, resolve_strategy
from .layers import CompressedExperts, Experts, SparseMoE, TopKRouter, moe_layers

__all__ = ["require_transformers", "ARCHITECTURES", "HFSparseMoE", "from_hf", "to_hf", "is_bridged", "save_pretrained",
           "from_pretrained", "LogitsOnly", "logits_only", "PACKED_FORMAT",
           "unquantized_shared_experts"]

PACKED_FORMAT = "moe-course-packed"
PACKED_VERSION = 1
PACKED_FILE = "moe_course_packed.safetensors"
WEIGHTS_PREFIX = "moe_course_"  # model.safetensors is saved as moe_course_model.safetensors
QUANT_METHOD = "moe_course_packed"


def require_transformers():
    """The ``transformers`` module, or an ImportError that says how to install it."""
    try:
        import transformers
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise ImportError("moe_course.hf needs transformers 5: pip install 'moe-course[hf]'") from None
    return transformers


# --------------------------------------------------------------------------------------------
# architectures
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Arch:
    block: str                      # decoder-layer attribute holding the MoE block
    router: str                     # block attribute holding the router
    num_experts: str                # config field: routed experts per layer
    width: str                      # config field: routed expert width I
    renormalize: Callable[[Any], bool]
    shared: str | None = None       # block attribute of the shared-expert MLP
    shared_gate: str | None = None  # block attribute of the shared expert's sigmoid gate Linear(H, 1)
    shared_count: str | None = None  # config field: shared experts inside the shared MLP (DeepSeek)
    scale: str | None = None        # config field: routed scaling factor
    dense_layers: str | None = None  # how a layer can be made "no MoE block": "mlp_only_layers"


ARCHITECTURES: dict[str, _Arch] = {
    "mixtral": _Arch("mlp", "gate", "num_local_experts", "intermediate_size", lambda c: True),
    "qwen2_moe": _Arch("mlp", "gate", "num_experts", "moe_intermediate_size", lambda c: bool(c.norm_topk_prob),
                       shared="shared_expert", shared_gate="shared_expert_gate", dense_layers="mlp_only_layers"),
    "qwen3_moe": _Arch("mlp", "gate", "num_experts", "moe_intermediate_size", lambda c: bool(c.norm_topk_prob),
                       dense_layers="mlp_only_layers"),
    "olmoe": _Arch("mlp", "gate", "num_experts", "intermediate_size", lambda c: bool(c.norm_topk_prob)),
    # transformers' DeepseekV2TopkRouter never renormalises (norm_topk_prob is unused there).
    "deepseek_v2": _Arch("mlp", "gate", "n_routed_experts", "moe_intermediate_size", lambda c: False,
                         shared="shared_experts", shared_count="n_shared_experts", scale="routed_scaling_factor"),
    "granitemoe": _Arch("block_sparse_moe", "router", "num_local_experts", "intermediate_size", lambda c: True),
}


def _arch_of(model: nn.Module) -> tuple[str, _Arch]:
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in ARCHITECTURES:
        raise NotImplementedError(
            f"model: no bridge for config.model_type={kind!r} ({type(model).__name__}); supported: "
            f"{', '.join(ARCHITECTURES)}")
    return kind, ARCHITECTURES[kind]


def _check_config(kind: str, cfg: Any) -> None:
    act = getattr(cfg, "hidden_act", "silu")
    if act != "silu":
        raise NotImplementedError(f"model: the course's experts are SwiGLU with silu; config.hidden_act={act!r}")
    if kind == "deepseek_v2":
        method, groups = getattr(cfg, "topk_method", "greedy"), getattr(cfg, "n_group", None)
        if method != "greedy" and groups not in (None, 1):
            raise NotImplementedError(
                f"model: DeepSeek-V2 routing topk_method={method!r} with n_group={groups} (group-limited top-k) "
                "is not a TopKRouter; only greedy top-k (e.g. DeepSeek-V2-Lite) is bridged")


# --------------------------------------------------------------------------------------------
# the course layer for transformers' MoE blocks
# --------------------------------------------------------------------------------------------
class HFSparseMoE(SparseMoE):
    r""":class:`~moe_course.layers.SparseMoE` plus the two extras of transformers' MoE blocks:

    .. math:: y = s \sum_{j=1}^{k} w_j(x)\, E_{i_j(x)}(x) \;+\; g(x) \sum_{m=1}^{S} E^{shared}_m(x),
        \qquad g(x) = \sigma(x\, w_s^\top) \text{ or } 1

    ``routed_scale`` ``s`` is DeepSeek's ``routed_scaling_factor`` (1 elsewhere); ``shared_gate``
    ``w_s [1, d_model]`` is Qwen2-MoE's sigmoid gate on the shared expert (``None`` elsewhere), a
    plain parameter (not an ``nn.Linear``), so quantizers that replace ``nn.Linear`` layers leave it
    in full precision like the router. The shared experts may be wider than the routed ones.

    ``last_routing`` is recorded on every forward; the balance and z losses (``aux_losses``) only in
    training mode, the only one that reads them: for one token through 64 experts, top-8, hidden 256
    they took 0.34 of the block's 1.44 ms on one CPU thread.
    """

    def __init__(self, d_model: int, num_experts: int, d_hidden: int, k: int = 2, renormalize: bool = True,
                 dispatch: str = "auto", routed_scale: float = 1.0):
        super().__init__(d_model, num_experts, d_hidden, k=k, dispatch=dispatch, activation="swiglu",
                         renormalize=renormalize)
        self.routed_scale = float(routed_scale)
        self.shared_gate: nn.Parameter | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self._flatten_input(x)
        r = self.router(flat)
        cap = self.capacity(flat.shape[0])
        if cap is not None:
            r = replace(r, keep=capacity_mask(r.indices, self.num_experts, cap))
        y = self._fused_grouped(flat, r) if r.keep is None else None
        if y is None:
            y = _dispatch(flat, r.weights, r.indices, self.experts, self.dispatch, r.keep)
        if self.routed_scale != 1.0:
            y = y * self.routed_scale
        if self.shared is not None:
            s = self.shared.forward_all(flat).sum(dim=0)
            if self.shared_gate is not None:
                s = torch.sigmoid(F.linear(flat, self.shared_gate)) * s
            y = y + s
        if self.training:
            self._record(r)
        else:  # the aux losses only serve training
            self.last_routing, self.aux_losses = r.detach(), {}
            seen = (id(self.experts), id(self.shared))  # a copy (quantize deep-copies) checks again
            if self.__dict__.get("_shared_checked") != seen:
                self.__dict__["_shared_checked"] = seen
                _warn_unquantized_shared([(getattr(self, "hf_path", "a bridged MoE block"), self)])
        return y.reshape(x.shape)

    def _fused_grouped(self, x: torch.Tensor, r) -> torch.Tensor | None:
        """The ``grouped`` strategy with transformers' fused gate/up matmul, at inference.

        While the experts are still views of one ``gate_up_proj`` (nothing compressed them), the
        gate and up projections run as ONE ``grouped_mm`` over ``[E, H, 2I]``, as transformers'
        ``grouped_mm`` does, instead of two: on the CPU each call visits all ``E`` experts, and for
        one token through 64 experts (hidden 512, width 256, one thread) the fused call took 1.07 ms
        where the two took 1.28 ms, in a MoE block of about 2.5 ms. Same function as
        :func:`moe_course.dispatch.dispatch` (``tests/test_hf.py``); ``None`` when it does not apply
        (another strategy, gradients needed, compressed or copied experts, misaligned sizes).
        """
        ex = self.experts
        if (self.dispatch not in ("auto", "grouped") or type(ex) is not Experts or ex.w_gate is None
                or (torch.is_grad_enabled() and ex.w_in.requires_grad) or not hasattr(F, "grouped_mm")):
            return None
        if resolve_strategy(self.dispatch, x.device, r.indices.numel()) != "grouped":
            return None
        align = 16 // x.element_size()
        if ex.d_model % align or ex.d_hidden % align or ex.w_in.dtype != x.dtype:
            return None
        gate_up = _halves_of_one(ex.w_gate, ex.w_in)
        if gate_up is None:
            return None
        t, k = r.indices.shape
        flat_idx = r.indices.reshape(-1)
        order = torch.argsort(flat_idx, stable=True)
        tok = torch.arange(t, device=x.device).repeat_interleave(k)[order]
        offs = torch.bincount(flat_idx, minlength=ex.num_experts).cumsum(0).to(torch.int32)
        gate, up = F.grouped_mm(x[tok], gate_up.transpose(1, 2), offs=offs).chunk(2, dim=-1)
        y = F.grouped_mm(ex.act(up, gate), ex.w_out.detach(), offs=offs)
        y = y * r.weights.reshape(-1)[order, None].to(x.dtype)
        return x.new_zeros(x.shape).index_add_(0, tok, y)

    def _extra_active(self) -> tuple[int, int]:
        p, f = super()._extra_active()
        if self.shared_gate is not None:
            p, f = p + self.shared_gate.numel(), f + 2 * self.shared_gate.numel()
        return p, f

    def extra_repr(self) -> str:
        extra = f", routed_scale={self.routed_scale:g}" if self.routed_scale != 1.0 else ""
        return super().extra_repr() + extra + (", shared_gate=sigmoid" if self.shared_gate is not None else "")


def _unquantized_shared(blocks) -> list[str]:
    """Names of the blocks whose routed experts are quantized while their shared experts are not."""
    return [name for name, b in blocks
            if isinstance(b, SparseMoE) and type(b.experts).__name__ == "QuantizedExperts"
            and b.shared is not None and type(b.shared).__name__ != "QuantizedExperts"]


def _warn_unquantized_shared(blocks) -> None:
    names = _unquantized_shared(blocks)
    if names:
        warnings.warn(
            f"quantize: the shared experts of {', '.join(names)} stay in full precision (only the routed experts "
            "were quantized; targets='experts'); they run on every token and their bytes count in full: pass "
            "targets='all' to quantize them too", UserWarning, stacklevel=3)


def unquantized_shared_experts(model: nn.Module) -> list[str]:
    """Module names of the bridged MoE blocks of ``model`` whose routed experts are quantized but
    whose shared experts (Qwen2-MoE ``shared_expert``, DeepSeek ``shared_experts``) are still full
    precision, as ``quantize(model, bits)`` leaves them (``targets="experts"``). A bridged model
    warns once per block, naming it, on its first forward in eval mode, and
    :func:`save_pretrained` warns naming all of them."""
    return _unquantized_shared((n, m) for n, m in model.named_modules() if isinstance(m, HFSparseMoE))


def _param(t: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    """A parameter over ``t``'s storage (no copy), trainable like ``like``."""
    return nn.Parameter(t.detach(), requires_grad=like.requires_grad)


def _experts_from_fused(gate_up: torch.Tensor, down: torch.Tensor) -> Experts:
    """Course ``Experts`` whose weights are views of ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``."""
    E, two_i, H = gate_up.shape
    inter = two_i // 2
    with torch.device("meta"):
        ex = Experts(E, H, inter, "swiglu")
    ex.w_gate = _param(gate_up[:, :inter].transpose(1, 2), gate_up)
    ex.w_in = _param(gate_up[:, inter:].transpose(1, 2), gate_up)
    ex.w_out = _param(down.transpose(1, 2), down)
    return ex


def _experts_from_mlp(mlp: nn.Module, count: int) -> Experts:
    """``count`` course experts viewing one SwiGLU MLP (``gate_proj``/``up_proj`` ``[n*I, H]``, ``down_proj [H, n*I]``)."""
    g, u, d = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        if lin.bias is not None:
            raise NotImplementedError("model: shared experts with biases are not bridged")
    width, H = g.shape
    if width % count:
        raise ValueError(f"model: shared MLP width {width} is not a multiple of {count} shared experts")
    inter = width // count
    with torch.device("meta"):
        ex = Experts(count, H, inter, "swiglu")
    ex.w_gate = _param(g.view(count, inter, H).transpose(1, 2), g)
    ex.w_in = _param(u.view(count, inter, H).transpose(1, 2), u)
    ex.w_out = _param(d.t().view(count, inter, H), d)
    return ex


def _is_moe_block(block: nn.Module, arch: _Arch) -> bool:
    ex = getattr(block, "experts", None)
    return ex is not None and hasattr(ex, "gate_up_proj") and hasattr(ex, "down_proj") and hasattr(block, arch.router)


def _bridge_block(block: nn.Module, kind: str, arch: _Arch, cfg: Any, dispatch: str) -> HFSparseMoE:
    ex = block.experts
    for flag, want in (("has_bias", False), ("is_transposed", False), ("has_gate", True), ("is_concatenated", True)):
        if getattr(ex, flag, want) != want:
            raise NotImplementedError(f"model: experts with {flag}={not want} are not bridged ({type(ex).__name__})")
    router = getattr(block, arch.router)
    weight = router.weight
    E, H = weight.shape
    gate_up, down = ex.gate_up_proj, ex.down_proj
    if gate_up.shape[0] != E or gate_up.shape[2] != H or gate_up.shape[1] % 2:
        raise ValueError(f"model: unexpected expert shapes gate_up_proj {tuple(gate_up.shape)} for a router {tuple(weight.shape)}")
    k = int(cfg.num_experts_per_tok)
    scale = float(getattr(cfg, arch.scale)) if arch.scale else 1.0
    with torch.device("meta"):
        layer = HFSparseMoE(H, E, gate_up.shape[1] // 2, k=k, renormalize=arch.renormalize(cfg), dispatch=dispatch,
                            routed_scale=scale)
    layer.router.gate.weight = weight            # the same parameter: no copy
    layer.experts = _experts_from_fused(gate_up, down)
    if arch.shared is not None and getattr(block, arch.shared, None) is not None:
        count = int(getattr(cfg, arch.shared_count)) if arch.shared_count else 1
        layer.shared = _experts_from_mlp(getattr(block, arch.shared), count)
        if arch.shared_gate is not None:
            gate = getattr(block, arch.shared_gate)
            if gate.bias is not None:
                raise NotImplementedError("model: a shared-expert gate with a bias is not bridged")
            layer.shared_gate = gate.weight          # the same parameter: no copy
    layer.hf_block_class = type(block)
    layer.train(block.training)
    for name, t in itertools.chain(layer.named_parameters(), layer.named_buffers()):
        if t.is_meta:  # pragma: no cover - a new kind of block tensor we do not map
            raise NotImplementedError(f"model: {type(block).__name__}.{name} is not mapped by the bridge")
    return layer


# --------------------------------------------------------------------------------------------
# the course's model protocol on transformers models (blocks / ffn / ln_ffn)
# --------------------------------------------------------------------------------------------
class _BridgedLayer:
    """Mixin for a transformers decoder layer: the course's names ``ffn`` (the MoE block) and
    ``ln_ffn`` (the norm before it) read and write the layer's own attributes, so trimming's layer
    drop works on it."""

    _mc_names: dict[str, str] = {}

    @property
    def ffn(self):
        return getattr(self, self._mc_names["ffn"])

    @property
    def ln_ffn(self):
        return getattr(self, self._mc_names["ln_ffn"])

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(self._mc_names.get(name, name), value)


class _BridgedModel:
    """Mixin for the top-level transformers model: ``blocks`` is its decoder-layer list; assigning
    a selection of them (trimming's block drop) renumbers the layers, their KV-cache slots and the
    per-layer config fields. ``save_pretrained`` goes through :func:`save_pretrained`."""

    @property
    def blocks(self) -> nn.ModuleList:
        return _base(self).layers

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "blocks":
            _set_blocks(self, value)
        else:
            super().__setattr__(name, value)

    def save_pretrained(self, save_directory, **kwargs):
        """Save through :func:`moe_course.hf.save_pretrained` (plain transformers files, or the course's
        packed format when the model holds quantized modules)."""
        return save_pretrained(self, save_directory, **kwargs)


_CLASSES: dict[tuple[type, type], type] = {}


def _bridged_class(cls: type, mixin: type, names: dict[str, str] | None = None) -> type:
    key = (cls, mixin)
    if key not in _CLASSES:
        attrs = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "_mc_original": cls}
        if names is not None:
            attrs["_mc_names"] = names
        _CLASSES[key] = type(cls.__name__, (mixin, cls), attrs)  # same name: transformers' checks see the original
    return _CLASSES[key]


def _original_class(obj: nn.Module) -> type:
    return getattr(type(obj), "_mc_original", type(obj))


def _base(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", model)
    if not isinstance(getattr(base, "layers", None), nn.ModuleList):
        raise TypeError(f"model: expected a transformers decoder with .layers, got {type(base).__name__}")
    return base


def _set_layer_index(layer: nn.Module, index: int) -> None:
    for m in layer.modules():
        if isinstance(getattr(m, "layer_idx", None), int):
            m.layer_idx = index


def _renumber_config(cfg: Any, kind: str, kept: list[int], total: int) -> None:
    """Per-layer config fields after keeping the decoder layers ``kept`` (old indices, in order)."""
    arch = ARCHITECTURES[kind]
    new_of = {old: new for new, old in enumerate(kept)}
    if arch.dense_layers == "mlp_only_layers":
        step = int(getattr(cfg, "decoder_sparse_step", 1) or 1)
        dense = set(getattr(cfg, "mlp_only_layers", []) or [])
        dense |= {i for i in range(total) if (i + 1) % step}  # layers the sparse step made dense
        cfg.mlp_only_layers = sorted(new_of[i] for i in dense if i in new_of)
        cfg.decoder_sparse_step = 1
    for name in ("first_k_dense_replace", "max_window_layers"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(cfg, name, sum(1 for i in kept if i < value))
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == total:
        cfg.layer_types = [types[i] for i in kept]
    cfg.num_hidden_layers = len(kept)


def _set_blocks(model: nn.Module, layers: Any) -> None:
    base = _base(model)
    old = list(base.layers)
    where = {id(layer): i for i, layer in enumerate(old)}
    layers = list(layers)
    kept = [where.get(id(layer)) for layer in layers]
    if any(i is None for i in kept) or len(set(kept)) != len(kept) or kept != sorted(kept):
        raise ValueError("blocks: expected a subset of the model's own decoder layers, in their order")
    if not layers:
        raise ValueError("blocks: at least one decoder layer must stay")
    kind, _ = _arch_of(model)
    _renumber_config(model.config, kind, kept, len(old))
    for new, layer in enumerate(layers):
        _set_layer_index(layer, new)
    nn.Module.__setattr__(base, "layers", nn.ModuleList(layers))


# --------------------------------------------------------------------------------------------
# from_hf
# --------------------------------------------------------------------------------------------
def _share_copy(model: nn.Module) -> nn.Module:
    """A new module tree over the same parameter and buffer tensors (nothing is copied but the
    Python objects and the config)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def is_bridged(model: Any) -> bool:
    """Whether ``model`` came out of :func:`from_hf` (and was not turned back by :func:`to_hf`)."""
    return isinstance(model, _BridgedModel)


def from_hf(model: nn.Module, *, dispatch: str = "auto", inplace: bool = False) -> nn.Module:
    """The transformers MoE model ``model`` with each MoE block replaced by an :class:`HFSparseMoE`.

    Args:
        model: a transformers 5 causal LM (or its base model) of a type in :data:`ARCHITECTURES`.
        dispatch: the course's dispatch strategy for every bridged layer
            (``"naive" | "loop" | "grouped" | "auto"``, :mod:`moe_course.dispatch`).
        inplace: change ``model`` itself; by default a new module tree over the same tensors is
            returned (no weight is copied; see the module docstring) and ``model`` stays a plain
            transformers model.

    Returns:
        The bridged model: still the transformers class (``generate``, ``config``, the KV cache all
        work), its MoE layers found by :func:`moe_course.layers.moe_layers`, ``model.blocks`` its
        decoder layers. In eval mode its logits equal the original's up to float rounding.
    """
    transformers = require_transformers()
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    if is_bridged(model):
        raise ValueError("model: already bridged (from_hf was applied to it)")
    if dispatch != "auto" and dispatch not in STRATEGIES:
        raise ValueError(f"dispatch: expected one of {STRATEGIES + ('auto',)}, got {dispatch!r}")
    kind, arch = _arch_of(model)
    _check_config(kind, model.config)
    base = _base(model)
    if not any(_is_moe_block(getattr(layer, arch.block, None) or nn.Module(), arch) for layer in base.layers):
        raise ValueError(f"model: no MoE block found in {type(model).__name__} (decoder attribute {arch.block!r})")
    out = model if inplace else _share_copy(model)
    names = {"ffn": arch.block, "ln_ffn": "post_attention_layernorm"}
    for i, layer in enumerate(_base(out).layers):
        block = getattr(layer, arch.block, None)
        if block is not None and _is_moe_block(block, arch):
            setattr(layer, arch.block, _bridge_block(block, kind, arch, out.config, dispatch))
            getattr(layer, arch.block).hf_path = f"model.layers.{i}.{arch.block}"  # names it in warnings
        layer.__class__ = _bridged_class(type(layer), _BridgedLayer, names)
    out.__class__ = _bridged_class(type(out), _BridgedModel)
    return out


# --------------------------------------------------------------------------------------------
# to_hf
# --------------------------------------------------------------------------------------------
_STEP_OF = {
    "QuantizedExperts": "quantize()",
    "LowRankExperts": "lowrank_experts()",
    "SharedExperts": "share_experts()",
    "LowRankSparseExperts": "mc_smoe()",
    "SkippingRouter": "skip_experts()",
    "QuantizedLinear": "quantize(targets='all') or quantize_rest()",
    "QuantizedEmbedding": "quantize(targets='all') or quantize_rest()",
}


def _halves_of_one(w_gate: torch.Tensor, w_in: torch.Tensor) -> torch.Tensor | None:
    """transformers' ``gate_up_proj [E, 2I, H]`` (a view, detached) when the course's ``w_gate`` and
    ``w_in`` ``[E, H, I]`` are still its two halves (as :func:`from_hf` made them), else ``None``."""
    E, H, inter = w_in.shape
    st = (2 * inter * H, 1, H)
    if (w_gate.shape == w_in.shape and w_gate.dtype == w_in.dtype and w_gate.device == w_in.device
            and w_gate.device.type != "meta"
            and w_gate.untyped_storage().data_ptr() == w_in.untyped_storage().data_ptr()
            and w_gate.stride() == st and w_in.stride() == st
            and w_in.storage_offset() == w_gate.storage_offset() + inter * H):
        return torch.as_strided(w_gate.detach(), (E, 2 * inter, H), (2 * inter * H, H, 1), w_gate.storage_offset())
    return None


def _fused(w_gate: torch.Tensor, w_in: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``gate_up_proj [E, 2I, H]`` from the course's ``w_gate``/``w_in`` ``[E, H, I]``: the original
    storage when they are still its two halves, else a new contiguous tensor. Returns (tensor, shared)."""
    base = _halves_of_one(w_gate, w_in)
    if base is not None:
        return base, True
    return torch.cat([w_gate.detach().transpose(1, 2), w_in.detach().transpose(1, 2)], dim=1).contiguous(), False


def _contiguous_t(w: torch.Tensor) -> torch.Tensor:
    t = w.detach().transpose(-2, -1)
    return t if t.is_contiguous() else t.contiguous()


def _dense_weights(experts: Experts, materialize: bool, where: str):
    """``(w_in, w_gate, w_out)`` of dense or (with ``materialize``) compressed experts."""
    if type(experts) is Experts:
        return experts.w_in, experts.w_gate, experts.w_out
    step = _STEP_OF.get(type(experts).__name__)
    if not materialize:
        what = f"was compressed by {step} ({type(experts).__name__})" if step else f"stores {type(experts).__name__}"
        hint = ("save it with moe_course.hf.save_pretrained(model, path) (the course's packed format) or "
                if type(experts).__name__ == "QuantizedExperts" else "")
        raise ValueError(f"to_hf: {where} {what}, which transformers cannot store; {hint}"
                         "pass materialize=True for dense tensors (same function, no saving)")
    with torch.no_grad():
        return experts.weights()


def _new_param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach(), requires_grad=False)


def _hf_experts_tensors(layer: HFSparseMoE, materialize: bool, where: str, placeholder: bool):
    """``(gate_up_proj, down_proj, router_weight)`` of one bridged layer, merged slots expanded."""
    from .compress.merging import MergedRouter  # noqa: PLC0415 - compress sits above hf's core imports

    ex = layer.experts
    router = layer.router
    if placeholder and _is_quantized(ex):  # stored packed by save_pretrained: only the shapes matter here
        E, H, inter = router.num_experts, ex.d_model, ex.d_hidden
        return torch.empty(E, 2 * inter, H, device="meta"), torch.empty(E, H, inter, device="meta"), router.gate.weight
    else:
        w_in, w_gate, w_out = _dense_weights(ex, materialize, where)
        if w_gate is None:
            raise ValueError(f"to_hf: {where} has GELU experts; transformers' blocks are SwiGLU")
        gate_up, _ = _fused(w_gate, w_in)
        down = _contiguous_t(w_out)
    if isinstance(router, MergedRouter):  # one copy of its group's expert per router slot
        s2g = router.slot_to_group.to(gate_up.device)
        gate_up, down = gate_up.index_select(0, s2g), down.index_select(0, s2g)
    return gate_up, down, router.gate.weight


def _is_quantized(experts: nn.Module) -> bool:
    return type(experts).__name__ == "QuantizedExperts"


def _check_layer(layer: nn.Module, i: int, kind: str) -> None:
    from .compress.merging import MergedRouter  # noqa: PLC0415

    where = f"MoE layer {i}"
    if not isinstance(layer, HFSparseMoE):
        raise ValueError(f"to_hf: decoder layer {i} holds a {type(layer).__name__}, not a bridged MoE block")
    router = layer.router
    if type(router) not in (TopKRouter, MergedRouter):
        step = _STEP_OF.get(type(router).__name__)
        raise ValueError(f"to_hf: {where} has a {type(router).__name__}"
                         + (f" (from {step})" if step else "") + f"; transformers' {kind} router has no equivalent")
    if router.noisy:
        raise ValueError(f"to_hf: {where} has a noisy router; transformers' {kind} router is not noisy")
    if layer.capacity_factor is not None:
        raise ValueError(f"to_hf: {where} has capacity_factor={layer.capacity_factor}; transformers' {kind} "
                         "blocks drop no tokens")
    if layer.experts.activation != "swiglu":
        raise ValueError(f"to_hf: {where} has {layer.experts.activation} experts; transformers' blocks are SwiGLU")


def _uniform(values: list, what: str, field: str, cls: str, hint: str = "") -> Any:
    if len(set(values)) > 1:
        raise ValueError(f"to_hf: the MoE layers have different {what} {values}; transformers' {cls} has one "
                         f"{field} for all layers{hint}")
    return values[0]


def _set_module_tensor(module: nn.Module, name: str, t: torch.Tensor) -> None:
    owner_path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = t if isinstance(t, nn.Parameter) else _new_param(t)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = t.detach()
    else:  # pragma: no cover
        raise KeyError(name)


def _build_block(layer: HFSparseMoE, cfg: Any, kind: str, arch: _Arch, materialize: bool, where: str,
                 placeholder: bool) -> nn.Module:
    cls = layer.hf_block_class
    with torch.device("meta"):
        block = cls(cfg)
    gate_up, down, router_w = _hf_experts_tensors(layer, materialize, where, placeholder)
    _set_module_tensor(block, f"{arch.router}.weight", router_w)
    _set_module_tensor(block, "experts.gate_up_proj", gate_up)
    _set_module_tensor(block, "experts.down_proj", down)
    block.experts.config = cfg
    if arch.shared is not None:
        mlp = getattr(block, arch.shared, None)
        if (mlp is None) != (layer.shared is None):
            raise ValueError(f"to_hf: {where}: shared experts {'missing' if layer.shared is None else 'unexpected'}")
        if mlp is not None:
            sh = layer.shared
            if placeholder and _is_quantized(sh):
                for lin in ("gate_proj", "up_proj", "down_proj"):
                    w = getattr(mlp, lin).weight
                    _set_module_tensor(mlp, f"{lin}.weight", torch.empty(w.shape, device="meta"))
            else:
                w_in, w_gate, w_out = _dense_weights(sh, materialize, f"{where} (shared experts)")
                n, H, inter = w_in.shape
                _set_module_tensor(mlp, "gate_proj.weight", _flat_rows(w_gate))
                _set_module_tensor(mlp, "up_proj.weight", _flat_rows(w_in))
                _set_module_tensor(mlp, "down_proj.weight", _contiguous_t(w_out.reshape(n * inter, H)))
        if arch.shared_gate is not None:
            _set_module_tensor(block, f"{arch.shared_gate}.weight", layer.shared_gate)
    for name, t in itertools.chain(block.named_parameters(), block.named_buffers()):
        if t.is_meta and not placeholder:  # pragma: no cover - a block tensor the bridge does not know
            raise NotImplementedError(f"to_hf: {cls.__name__}.{name} is not mapped by the bridge")
    return block


def _flat_rows(w: torch.Tensor) -> torch.Tensor:
    """``[n, H, I]`` row-vector experts -> ``nn.Linear`` weight ``[n*I, H]`` (a view when possible)."""
    t = w.detach().transpose(1, 2)  # [n, I, H]
    n, inter, H = t.shape
    if t.is_contiguous():
        return t.view(n * inter, H)
    return t.reshape(n * inter, H).contiguous()


def _dense_mlp(block_cls: type, cfg: Any, width: int) -> nn.Module:
    """Qwen's dense MLP class (``Qwen2MoeMLP`` / ``Qwen3MoeMLP``) of width ``width``, zero-initialised."""
    module = sys.modules[block_cls.__module__]
    prefix = block_cls.__name__.replace("SparseMoeBlock", "")
    mlp_cls = getattr(module, prefix + "MLP")
    return mlp_cls(cfg, intermediate_size=width)


def _plain_linear(m: nn.Module) -> nn.Module:
    """A ``QuantizedLinear`` / ``QuantizedEmbedding`` as a plain dense module (dequantized)."""
    with torch.no_grad():
        w = m.weight.detach().clone()
    if isinstance(m, nn.Embedding):
        e = nn.Embedding(m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx, device="meta")
        e.weight = _new_param(w)
        return e
    lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
    lin.weight = _new_param(w)
    if m.bias is not None:
        lin.bias = _new_param(m.bias)
    return lin


def _packed_modules(model: nn.Module) -> dict[str, nn.Module]:
    from .compress.quantization import QuantizedEmbedding, QuantizedExperts, QuantizedLinear  # noqa: PLC0415

    kinds = (QuantizedExperts, QuantizedLinear, QuantizedEmbedding)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


def to_hf(model: nn.Module, *, materialize: bool = False, inplace: bool = False) -> nn.Module:
    """A plain transformers model computing what the bridged (and compressed) ``model`` computes.

    Its ``save_pretrained`` -> ``from_pretrained`` round trip gives the same logits. Expert
    removal, merging, block drop and (Qwen) MoE layer drop change the config (see the module
    docstring); the MoE blocks are transformers' own classes again, with the configured
    ``experts_implementation``.

    Args:
        model: a model returned by :func:`from_hf`, possibly compressed by :mod:`moe_course.compress`.
        materialize: write quantized (``quantize``), low-rank (``lowrank_experts``, ``mc_smoe``)
            and shared-base (``share_experts``) experts, and packed linear layers, as dense tensors
            (same function, no saving). Without it they raise a ``ValueError`` naming the step;
            :func:`save_pretrained` stores quantized models in the course's packed format instead.
        inplace: turn ``model`` itself back (it stops being bridged); by default a new module tree
            over the same tensors is returned wherever the layouts allow (module docstring).
    Raises:
        ValueError: a compression that a transformers config cannot express, naming the step.
    """
    return _to_hf(model, materialize=materialize, inplace=inplace, placeholder=False)


def _to_hf(model: nn.Module, *, materialize: bool, inplace: bool, placeholder: bool) -> nn.Module:
    require_transformers()
    from .compress.trimming import Skipped  # noqa: PLC0415

    if not is_bridged(model):
        raise TypeError(f"model: expected a model returned by moe_course.hf.from_hf, got {type(model).__name__}")
    kind, arch = _arch_of(model)
    cls_name = type(model.config).__name__
    base = _base(model)

    # 1. check everything before changing anything
    moe, dropped = [], []
    for i, layer in enumerate(base.layers):
        block = getattr(layer, arch.block)
        if isinstance(block, Skipped):
            dropped.append(i)
        elif isinstance(block, HFSparseMoE) or moe_layers(block):
            _check_layer(block, i, kind)
            moe.append((i, block))
        if isinstance(block, HFSparseMoE) and isinstance(layer.post_attention_layernorm, nn.Identity):
            raise ValueError(f"to_hf: decoder layer {i} lost its MoE norm but kept its MoE block")
    if not moe:
        raise ValueError("to_hf: the model has no MoE layer left; transformers' "
                         f"{cls_name} needs at least one")
    layers = [b for _, b in moe]
    num_slots = [b.router.num_experts for b in layers]
    E = _uniform(num_slots, "numbers of experts", arch.num_experts, cls_name,
                 " (expert drop with scope='global' or a per-layer keep / num_groups list; keep the same "
                 "number in every layer for transformers)")
    inter = _uniform([b.experts.d_hidden for b in layers], "expert widths", arch.width, cls_name)
    k = _uniform([b.k for b in layers], "top-k", "num_experts_per_tok", cls_name)
    renorm = _uniform([b.router.renormalize for b in layers], "renormalize flags", "norm_topk_prob", cls_name)
    if renorm != arch.renormalize(model.config) and kind not in ("qwen2_moe", "qwen3_moe", "olmoe"):
        raise ValueError(f"to_hf: routers with renormalize={renorm}; transformers' {kind} router always uses "
                         f"renormalize={arch.renormalize(model.config)}")
    if arch.scale:
        _uniform([b.routed_scale for b in layers], "routed scales", arch.scale, cls_name)
    if dropped and arch.dense_layers != "mlp_only_layers":
        raise ValueError(
            f"to_hf: drop_layers() removed the MoE block of decoder layers {dropped}; transformers' {cls_name} "
            "cannot express a decoder layer without its MoE block (only Qwen2-MoE / Qwen3-MoE can, through "
            "mlp_only_layers); use drop_blocks() (whole decoder layers) instead")
    if dropped:
        cfg = model.config
        step = int(getattr(cfg, "decoder_sparse_step", 1) or 1)
        dense_now = set(getattr(cfg, "mlp_only_layers", []) or []) | {i for i in range(len(base.layers)) if (i + 1) % step}
        if dense_now and int(cfg.intermediate_size) != 0:
            raise ValueError(
                f"to_hf: drop_layers() removed the MoE block of decoder layers {dropped}, and the model already has "
                f"dense MLP layers {sorted(dense_now)} of width intermediate_size={cfg.intermediate_size}; a Qwen "
                "config has one dense width, so the dropped layers cannot be written as zero-width MLPs")
    packed = _packed_modules(model)
    outside = {n: m for n, m in packed.items() if type(m).__name__ != "QuantizedExperts"}
    if outside and not (materialize or placeholder):
        first = next(iter(outside))
        raise ValueError(f"to_hf: {first} is a {type(outside[first]).__name__} (from "
                         f"{_STEP_OF[type(outside[first]).__name__]}), which transformers cannot store; save it with "
                         "moe_course.hf.save_pretrained(model, path) (the course's packed format) or pass "
                         "materialize=True for dense tensors")
    for i, b in moe:  # experts and shared experts: raise now, not half-way
        if not placeholder:
            _dense_weights_check(b.experts, materialize, f"MoE layer {i}")
            if b.shared is not None:
                _dense_weights_check(b.shared, materialize, f"MoE layer {i} (shared experts)")

    # 2. build
    out = model if inplace else _share_copy(model)
    cfg = out.config
    setattr(cfg, arch.num_experts, E)
    if kind in ("qwen2_moe", "qwen3_moe", "olmoe"):
        cfg.norm_topk_prob = bool(renorm)
    obase = _base(out)
    if dropped:
        cfg.mlp_only_layers = sorted(set(getattr(cfg, "mlp_only_layers", []) or []) | set(dropped)
                                     | {i for i in range(len(obase.layers))
                                        if (i + 1) % int(getattr(cfg, "decoder_sparse_step", 1) or 1)})
        cfg.decoder_sparse_step = 1
        cfg.intermediate_size = 0
    for i, layer in enumerate(obase.layers):
        block = getattr(layer, arch.block)
        if isinstance(block, Skipped):
            dev = layer.input_layernorm.weight.device
            with torch.device(dev), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
                mlp = _dense_mlp(moe[0][1].hf_block_class, cfg, 0)  # zero-width: computes exactly 0
            nn.Module.__setattr__(layer, arch.block, mlp)
            if isinstance(layer.post_attention_layernorm, nn.Identity):
                norm = type(layer.input_layernorm)(cfg.hidden_size, eps=cfg.rms_norm_eps)
                nn.Module.__setattr__(layer, "post_attention_layernorm", norm.to(layer.input_layernorm.weight.device,
                                                                                  layer.input_layernorm.weight.dtype))
        elif isinstance(block, HFSparseMoE):
            new = _build_block(block, cfg, kind, arch, materialize, f"MoE layer {i}", placeholder)
            nn.Module.__setattr__(layer, arch.block, new)
        layer.__class__ = _original_class(layer)
    if materialize:
        for name, m in list(outside.items()):
            parent_name, _, leaf = name.rpartition(".")
            parent = out.get_submodule(parent_name) if parent_name else out
            nn.Module.__setattr__(parent, leaf, _plain_linear(out.get_submodule(name)))
    elif placeholder:
        for name, m in list(outside.items()):
            parent_name, _, leaf = name.rpartition(".")
            parent = out.get_submodule(parent_name) if parent_name else out
            q = out.get_submodule(name)
            shape = (q.num_embeddings, q.embedding_dim) if isinstance(q, nn.Embedding) else (q.out_features, q.in_features)
            if isinstance(q, nn.Embedding):
                plain = nn.Embedding(*shape, padding_idx=q.padding_idx, device="meta")
            else:
                plain = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
                if q.bias is not None:
                    plain.bias = _new_param(q.bias)
            nn.Module.__setattr__(parent, leaf, plain)
    out.__class__ = _original_class(out)
    for attr in ("dropped_blocks", "dropped_layers"):
        out.__dict__.pop(attr, None)
    # eval mode without PreTrainedModel.train(): with the `kernels` package installed and kernels in
    # use, it re-kernelizes on the device of the first parameter, which is "meta" for the
    # placeholders of the packed format (a quantized embedding) and raises
    for m in out.modules():
        m.training = False
    return out


def _dense_weights_check(experts: Experts, materialize: bool, where: str) -> None:
    if type(experts) is Experts or materialize:
        return
    _dense_weights(experts, False, where)  # raises with the step's name


# --------------------------------------------------------------------------------------------
# saving and loading
# --------------------------------------------------------------------------------------------
def _packed_meta(m: nn.Module) -> dict[str, Any]:
    from .compress.quantization import QuantizedExperts  # noqa: PLC0415

    scale = next((b for n, b in m.named_buffers() if n.endswith("_scale")), None)
    meta = {"kind": type(m).__name__, "scale_dtype": str(scale.dtype).replace("torch.", "") if scale is not None else "float16"}
    if isinstance(m, QuantizedExperts):
        meta.update(bits=list(m.bits), group_size=m.group_size, symmetric=m.symmetric,
                    num_experts=m.num_experts, d_model=m.d_model, d_hidden=m.d_hidden, activation=m.activation)
    else:
        meta.update(bits=int(m.bits), group_size=m.group_size, symmetric=bool(getattr(m, "symmetric", False)))
    return meta


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """Save a bridged (compressed) model so that :func:`from_pretrained` loads it.

    Without packed (quantized) modules this is ``to_hf(model).save_pretrained(save_directory)``:
    plain transformers files that ``transformers.AutoModelForCausalLM.from_pretrained`` loads too.
    With them it writes the course's packed format (module docstring): the packed codes stay
    packed on disk, so the directory is really smaller. ``kwargs`` go to transformers'
    ``save_pretrained`` (e.g. ``max_shard_size``).
    """
    from safetensors.torch import save_file

    if not is_bridged(model):
        raise TypeError(f"model: expected a model returned by moe_course.hf.from_hf, got {type(model).__name__}")
    packed = _packed_modules(model)
    _warn_unquantized_shared((n, m) for n, m in model.named_modules() if isinstance(m, HFSparseMoE))
    if not packed:
        to_hf(model).save_pretrained(save_directory, **kwargs)
        return
    if os.path.isdir(save_directory):  # files of an earlier packed save that this one would not overwrite
        for name in os.listdir(save_directory):
            if name.startswith(WEIGHTS_PREFIX):
                os.remove(os.path.join(save_directory, name))
    plain = _to_hf(model, materialize=False, inplace=False, placeholder=True)
    state = {k: v for k, v in plain.state_dict().items() if not v.is_meta}
    from .compress.merging import MergedRouter  # noqa: PLC0415

    meta = {name: _packed_meta(m) for name, m in packed.items()}
    for name in meta:  # merged then quantized: each group stored once, plus the router's slot -> group map
        parent, _, leaf = name.rpartition(".")
        router = getattr(model.get_submodule(parent), "router", None) if parent else None
        if leaf == "experts" and isinstance(router, MergedRouter):
            meta[name]["slot_to_group"] = router.slot_to_group.tolist()
    plain.config.quantization_config = {"quant_method": QUANT_METHOD, "format": PACKED_FORMAT,
                                        "version": PACKED_VERSION, "file": PACKED_FILE}
    kwargs.setdefault("save_original_format", False)  # the stacked v5 layout, as in memory
    try:
        plain.save_pretrained(save_directory, state_dict=state, **kwargs)
    finally:
        del plain.config.quantization_config
    # Hide the weights from plain transformers, which would otherwise load the directory with
    # freshly initialised experts in place of the packed ones (and only warn).
    for name in os.listdir(save_directory):
        if name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".safetensors.index.json")):
            os.replace(os.path.join(save_directory, name), os.path.join(save_directory, WEIGHTS_PREFIX + name))
    tensors = {f"{name}.{b}": t.detach().contiguous().cpu()
               for name, m in packed.items() for b, t in itertools.chain(m.named_buffers(), m.named_parameters())}
    save_file(tensors, os.path.join(save_directory, PACKED_FILE),
              metadata={"format": PACKED_FORMAT, "version": str(PACKED_VERSION), "modules": json.dumps(meta)})


def from_pretrained(path: str | os.PathLike, *, dispatch: str = "auto", **kwargs: Any) -> nn.Module:
    """Load a directory written by :func:`save_pretrained` (or any transformers checkpoint of a
    supported architecture) and bridge it (:func:`from_hf`). ``kwargs`` go to transformers'
    ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ``device_map`` ...). For the packed format
    the quantized modules are rebuilt from their stored codes; the transformers model is first
    loaded with its quantized weights freshly initialised (peak memory: the unquantized model)."""
    transformers = require_transformers()
    from safetensors import safe_open

    from .compress.merging import MergedRouter  # noqa: PLC0415
    from .compress.quantization import QuantizedEmbedding, QuantizedExperts, QuantizedLinear  # noqa: PLC0415

    packed_file = os.path.join(path, PACKED_FILE)
    if not os.path.exists(packed_file):
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
        return from_hf(model, dispatch=dispatch, inplace=True)
    config = transformers.AutoConfig.from_pretrained(path)
    qc = getattr(config, "quantization_config", None)
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"path: {PACKED_FILE} found but config.json has no {QUANT_METHOD} quantization_config")
    del config.quantization_config
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(path)):
        if name.startswith(WEIGHTS_PREFIX + "model") and name.endswith(".safetensors"):
            state.update(load_file(os.path.join(path, name)))
    if not state:
        raise ValueError(f"path: no {WEIGHTS_PREFIX}model*.safetensors next to {PACKED_FILE}")
    logger = transformers.utils.logging
    verbosity = logger.get_verbosity()
    logger.set_verbosity_error()  # the packed weights are "missing" from the plain state by design
    try:
        arch_name = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch_name, None) if arch_name else None
        if cls is None:
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
            cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        model = cls.from_pretrained(None, config=config, state_dict=state, **kwargs)
    finally:
        logger.set_verbosity(verbosity)
    del state
    model = from_hf(model, dispatch=dispatch, inplace=True)
    with safe_open(packed_file, framework="pt") as f:
        info = f.metadata() or {}
        if info.get("format") != PACKED_FORMAT or int(info.get("version", 0)) > PACKED_VERSION:
            raise ValueError(f"path: {PACKED_FILE} is not {PACKED_FORMAT} version <= {PACKED_VERSION} ({info})")
        meta = json.loads(info["modules"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    kinds = {"QuantizedExperts": QuantizedExperts, "QuantizedLinear": QuantizedLinear,
             "QuantizedEmbedding": QuantizedEmbedding}
    for name, m in meta.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        current = getattr(parent, leaf)
        scale_dtype = getattr(torch, m["scale_dtype"])
        s2g = m.get("slot_to_group")
        if s2g is not None:  # merged experts: one per group, the router maps its slots to them
            current = Experts(max(s2g) + 1, m["d_model"], m["d_hidden"], m["activation"])
        with torch.no_grad():  # a shell of the right shapes; its buffers are then replaced by the stored ones
            shell = kinds[m["kind"]](current, m["bits"], m["group_size"], m["symmetric"], scale_dtype)
        own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        shell.load_state_dict(own, strict=True)
        setattr(parent, leaf, shell.to(next(parent.parameters()).device))
        if s2g is not None:
            parent.router = MergedRouter(parent.router, torch.tensor(s2g))
    return model.eval()


# --------------------------------------------------------------------------------------------
# course functions that expect logits
# --------------------------------------------------------------------------------------------
class LogitsOnly(nn.Module):
    """``model(ids).logits`` as a module, for course functions that expect a model returning a
    logits tensor (:func:`moe_course.compress.distillation.train_student`, :func:`moe_course.train.evaluate`).
    Parameters are the wrapped model's (training the wrapper trains it in place); ``aux_loss`` sums
    the bridged MoE layers' Switch balance losses times ``aux_weight``."""

    def __init__(self, model: nn.Module, aux_weight: float = 0.0):
        super().__init__()
        self.model = model
        self.config = model.config
        self.aux_weight = float(aux_weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def aux_loss(self) -> torch.Tensor:
        losses = [layer.aux_losses["balance"] for layer in moe_layers(self.model) if "balance" in layer.aux_losses]
        p = next(self.model.parameters())
        if not losses or not self.aux_weight:
            return p.new_zeros(())
        return self.aux_weight * torch.stack(losses).mean()


def logits_only(model: nn.Module, aux_weight: float = 0.0) -> LogitsOnly:
    """:class:`LogitsOnly` around ``model``."""
    return LogitsOnly(model, aux_weight)
