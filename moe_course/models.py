"""The course's two model families (chapter 3, "the zoo models"; their presets live in ``zoo``).

* :class:`MoETransformerLM`: a decoder-only, character-level Transformer (GPT-2 layout: learned
  positions, pre-LN blocks, tied LM head; Radford et al. 2019) whose feed-forward sublayers are
  Mixture-of-Experts layers (Shazeer et al. 2017; Switch Transformer, Fedus et al. 2022).
* :class:`MoEClassifier`: an MNIST-1D classifier (Greydanus 2020) built from the same block, with a
  small convolutional stem that turns the 40-sample signal into a short sequence of tokens.
* :class:`MoEImageClassifier`: the same blocks over images (the 8x8 handwritten digits of UCI
  optdigits, as shipped by scikit-learn): a 2-D convolutional stem turns each image into a grid of
  position tokens, a depthwise 2-D convolution mixes neighbouring tokens, MoE feed-forwards route
  every token.

Every block keeps its feed-forward at ``block.ffn``: a :class:`~moe_course.layers.SparseMoE`, a
:class:`~moe_course.layers.SoftMoE` or a plain :class:`DenseFFN`, so compression code finds the
MoE layers by walking ``model.modules()`` and leaves dense baselines alone.

The training loss is ``task loss + aux_loss_weight * sum_l balance_l + z_loss_weight * sum_l z_l``
(Switch eq. 4 summed over the MoE layers, ST-MoE eq. 5), see :meth:`aux_loss`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from moe_course.dispatch import STRATEGIES as DISPATCH_STRATEGIES
from moe_course.layers import ACTIVATIONS, MoELayer, SoftMoE, SparseMoE, moe_layers

FFN_KINDS = ("moe", "soft", "dense")
# Feed-forward kinds added by modules above this one: name -> builder(cfg) -> nn.Module. They
# register on import (``import moe_course.factorized`` adds "mumoe-cp" and "mumoe-tr").
_FFN_BUILDERS: dict[str, Any] = {}


def register_ffn(name: str, builder) -> None:
    """Make ``ffn=name`` in a model config build its feed-forward with ``builder(cfg)``."""
    if not isinstance(name, str) or not name or name in FFN_KINDS:
        raise ValueError(f"name must be a new non-empty string (not one of {FFN_KINDS}), got {name!r}")
    if not callable(builder):
        raise TypeError(f"builder must be callable(cfg) -> nn.Module, got {type(builder).__name__}")
    _FFN_BUILDERS[name] = builder


MIXERS = ("conv", "attention", "none")


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------
def _check_int(name: str, value: Any, lo: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")


def _check_float(name: str, value: Any, lo: float = 0.0, hi: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not (lo <= value <= hi) or math.isnan(value):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")


@dataclass
class _FFNConfig:
    """Fields shared by both model families (the blocks and their feed-forward).

    ``ffn``: ``"moe"`` (sparse top-``k`` of ``num_experts``), ``"soft"`` (every expert, softmax
    mix) or ``"dense"`` (one MLP of width ``d_hidden``). ``capacity_factor=None`` drops no token;
    ``num_shared_experts`` adds always-on experts; ``dispatch`` picks the token->expert strategy.
    ``aux_loss_weight`` / ``z_loss_weight`` weight the Switch balance loss and the router z-loss.
    """

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ffn: str = "moe"
    num_experts: int = 8
    k: int = 2
    d_hidden: int = 256
    activation: str = "gelu"
    capacity_factor: float | None = None
    num_shared_experts: int = 0
    dispatch: str = "auto"
    noisy: bool = False
    dropout: float = 0.0
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 1e-3
    ffn_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra args of registered kinds

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first bad field."""
        for name in ("d_model", "n_layers", "n_heads", "num_experts", "k", "d_hidden"):
            _check_int(name, getattr(self, name))
        _check_int("num_shared_experts", self.num_shared_experts, lo=0)
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide d_model={self.d_model}")
        if self.ffn not in FFN_KINDS and self.ffn not in _FFN_BUILDERS:
            known = FFN_KINDS + tuple(sorted(_FFN_BUILDERS))
            raise ValueError(f"ffn must be one of {known}, got {self.ffn!r} (other kinds register on import: "
                             "import moe_course.factorized for 'mumoe-cp' and 'mumoe-tr')")
        if not isinstance(self.ffn_options, dict):
            raise TypeError(f"ffn_options must be a dict, got {type(self.ffn_options).__name__}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.ffn == "moe" and self.k > self.num_experts:
            raise ValueError(f"k must be in [1, num_experts={self.num_experts}], got {self.k}")
        if self.capacity_factor is not None:
            _check_float("capacity_factor", self.capacity_factor)
            if self.capacity_factor <= 0:
                raise ValueError(f"capacity_factor must be > 0 or None, got {self.capacity_factor}")
            if not math.isfinite(self.capacity_factor):
                raise ValueError(f"capacity_factor must be a finite number > 0 or None, got {self.capacity_factor}")
        if self.dispatch != "auto" and self.dispatch not in DISPATCH_STRATEGIES:
            raise ValueError(f"dispatch must be one of {DISPATCH_STRATEGIES + ('auto',)}, got {self.dispatch!r}")
        if not isinstance(self.noisy, bool):
            raise TypeError(f"noisy must be a bool, got {type(self.noisy).__name__}")
        _check_float("dropout", self.dropout, 0.0, 1.0)
        if self.dropout >= 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        _check_float("aux_loss_weight", self.aux_loss_weight)
        _check_float("z_loss_weight", self.z_loss_weight)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field (``ffn_options`` only when set, so configs of the
        built-in kinds, and the zoo cache keys hashed from them, stay as they were)."""
        d = dataclasses.asdict(self)
        if not d["ffn_options"]:
            del d["ffn_options"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        if not isinstance(d, Mapping):
            raise TypeError(f"d must be a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**dict(d))

    def replace(self, **changes: Any):
        """A validated copy with some fields changed (``dataclasses.replace``)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown {type(self).__name__} field(s) {unknown}; valid fields: {sorted(known)}")
        return dataclasses.replace(self, **changes)


@dataclass
class LMConfig(_FFNConfig):
    """Configuration of :class:`MoETransformerLM` (character level)."""

    vocab_size: int = 96
    context_length: int = 128

    def validate(self) -> None:
        super().validate()
        _check_int("vocab_size", self.vocab_size, lo=2)
        _check_int("context_length", self.context_length)


@dataclass
class ClassifierConfig(_FFNConfig):
    """Configuration of :class:`MoEClassifier` (MNIST-1D by default: 40 samples, 10 classes).

    ``stride`` of the stem sets the number of tokens per example (``input_length / stride``);
    ``mixer`` is the token-mixing sublayer of every block: a depthwise convolution (cheap, and the
    inductive bias that makes CNNs strong on MNIST-1D), self-attention, or none.
    """

    input_length: int = 40
    num_classes: int = 10
    stride: int = 2
    mixer: str = "conv"
    kernel_size: int = 5

    def validate(self) -> None:
        super().validate()
        _check_stem(self, "input_length", ("input_length", "stride", "kernel_size"))

    @property
    def num_tokens(self) -> int:
        """Tokens per example after the stem."""
        return (self.input_length - 1) // self.stride + 1


def _check_stem(cfg, size: str, ints: tuple[str, ...]) -> None:
    """The classifiers' shared checks: positive ints, >= 2 classes, a stride within the input
    (``size`` names the input's length or side), a known token mixer."""
    for name in ints:
        _check_int(name, getattr(cfg, name))
    _check_int("num_classes", cfg.num_classes, lo=2)
    if cfg.stride > getattr(cfg, size):
        raise ValueError(f"stride must be <= {size}={getattr(cfg, size)}, got {cfg.stride}")
    if cfg.mixer not in MIXERS:
        raise ValueError(f"mixer must be one of {MIXERS}, got {cfg.mixer!r}")


@dataclass
class ImageClassifierConfig(_FFNConfig):
    """Configuration of :class:`MoEImageClassifier` (8x8 one-channel digits, 10 classes, by default).

    The stem is ``Conv2d(in_channels, d_model, kernel_size)`` -> GELU -> a stride-``stride`` 3x3
    ``Conv2d``, so an ``image_size`` x ``image_size`` image becomes ``grid ** 2`` position tokens
    (``grid = ceil(image_size / stride)``: 16 tokens for 8x8 at stride 2). ``mixer``: a depthwise
    ``kernel_size`` x ``kernel_size`` convolution over the token grid, self-attention, or none.
    """

    image_size: int = 8
    in_channels: int = 1
    num_classes: int = 10
    stride: int = 2
    mixer: str = "conv"
    kernel_size: int = 3

    def validate(self) -> None:
        super().validate()
        _check_stem(self, "image_size", ("image_size", "in_channels", "stride", "kernel_size"))

    @property
    def grid(self) -> int:
        """Tokens per side after the stem."""
        return (self.image_size - 1) // self.stride + 1

    @property
    def num_tokens(self) -> int:
        """Tokens per image after the stem (``grid ** 2``)."""
        return self.grid**2


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------
class DenseFFN(nn.Module):
    """The Transformer MLP (Vaswani et al. 2017, eq. 2) or its SwiGLU form (Shazeer 2020).

    Plain ``nn.Linear`` layers, deliberately not an ``Experts(1, ...)``: compression code treats a
    dense baseline as non-MoE.
    """

    def __init__(self, d_model: int, d_hidden: int, activation: str = "gelu") -> None:
        super().__init__()
        _check_int("d_model", d_model)
        _check_int("d_hidden", d_hidden)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.fc_in = nn.Linear(d_model, d_hidden)
        self.fc_gate = nn.Linear(d_model, d_hidden) if activation == "swiglu" else None
        self.fc_out = nn.Linear(d_hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fc_gate is None:
            h = F.gelu(self.fc_in(x))
        else:
            h = F.silu(self.fc_gate(x)) * self.fc_in(x)
        return self.fc_out(h)


def make_ffn(cfg: _FFNConfig) -> nn.Module:
    """The feed-forward sublayer ``cfg.ffn`` asks for."""
    if cfg.ffn not in FFN_KINDS:
        return _FFN_BUILDERS[cfg.ffn](cfg)
    if cfg.ffn == "dense":
        return DenseFFN(cfg.d_model, cfg.d_hidden, cfg.activation)
    if cfg.ffn == "soft":
        return SoftMoE(cfg.d_model, cfg.num_experts, cfg.d_hidden, activation=cfg.activation)
    return SparseMoE(
        cfg.d_model,
        cfg.num_experts,
        cfg.d_hidden,
        k=cfg.k,
        capacity_factor=cfg.capacity_factor,
        num_shared_experts=cfg.num_shared_experts,
        dispatch=cfg.dispatch,
        activation=cfg.activation,
        noisy=cfg.noisy,
    )


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention (Vaswani et al. 2017, eq. 1)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, causal: bool = True) -> None:
        super().__init__()
        _check_int("d_model", d_model)
        _check_int("n_heads", n_heads)
        if d_model % n_heads:
            raise ValueError(f"n_heads={n_heads} must divide d_model={d_model}")
        _check_float("dropout", dropout, 0.0, 1.0)
        if dropout >= 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.n_heads = n_heads
        self.causal = causal
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, cache: "KVCache.Layer | None" = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        mask, causal = None, self.causal
        if cache is not None:  # decoding: keys and values of earlier tokens come from the cache
            k, v = cache.append(k, v)
            past = k.shape[2] - t
            if past and t > 1:  # queries at positions past..past+t-1 see keys up to their own position
                mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(diagonal=past)
                causal = False
            elif past:  # one new token sees every cached key
                causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class KVCache:
    """Keys and values of the tokens seen so far, one entry per attention layer (decoding).

    ``generate`` fills it with the prompt (prefill), then runs one new token per step, so each step
    costs one token's compute instead of the whole context's. ``length`` is the number of cached
    positions; the next token's position is ``length``.
    """

    class Layer:
        def __init__(self) -> None:
            self.k: torch.Tensor | None = None
            self.v: torch.Tensor | None = None

        def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Add ``[B, H, t, d_head]`` keys/values; return all of them so far."""
            self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
            self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
            return self.k, self.v

    def __init__(self, n_layers: int) -> None:
        self.layers = [KVCache.Layer() for _ in range(n_layers)]
        self.length = 0

    def nbytes(self) -> int:
        """Bytes held by the cached keys and values."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.k, layer.v) if t is not None)


class DepthwiseConvMixer(nn.Module):
    """Token mixing by a depthwise 1-D convolution along the sequence (ConvMixer-style)."""

    def __init__(self, d_model: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(d_model, d_model, kernel_size, padding=kernel_size // 2, groups=d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.transpose(1, 2)).transpose(1, 2)[:, : x.shape[1]]


class DepthwiseConv2dMixer(nn.Module):
    """Token mixing on a ``grid`` x ``grid`` token image by a depthwise 2-D convolution."""

    def __init__(self, d_model: int, kernel_size: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.conv = nn.Conv2d(d_model, d_model, kernel_size, padding=kernel_size // 2, groups=d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = x.transpose(1, 2).reshape(b, d, self.grid, self.grid)
        h = self.conv(h)[:, :, : self.grid, : self.grid]
        return h.reshape(b, d, t).transpose(1, 2)


class Block(nn.Module):
    """Pre-LN residual block: ``x + mix(LN(x))`` then ``x + ffn(LN(x))`` (Xiong et al. 2020)."""

    def __init__(self, cfg: _FFNConfig, mixer: nn.Module | None) -> None:
        super().__init__()
        if not isinstance(cfg, _FFNConfig):
            raise TypeError(f"cfg must be an LMConfig, ClassifierConfig or ImageClassifierConfig, got "
                            f"{type(cfg).__name__}")
        if mixer is not None and not isinstance(mixer, nn.Module):
            raise TypeError(f"mixer must be an nn.Module or None, got {type(mixer).__name__}")
        self.ln_mix = nn.LayerNorm(cfg.d_model) if mixer is not None else None
        self.mixer = mixer
        self.ln_ffn = nn.LayerNorm(cfg.d_model)
        self.ffn = make_ffn(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache.Layer | None = None) -> torch.Tensor:
        if self.mixer is not None:
            mixed = self.mixer(self.ln_mix(x)) if cache is None else self.mixer(self.ln_mix(x), cache)
            x = x + self.drop(mixed)
        return x + self.drop(self.ffn(self.ln_ffn(x)))


class _MoEModel(nn.Module):
    """What both model families share: blocks, aux losses, init."""

    config: _FFNConfig
    blocks: nn.ModuleList

    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers, in order."""
        return moe_layers(self)

    def _aux_parts(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Sum over MoE layers of the unweighted balance and z losses of the last forward."""
        zero = next(self.parameters()).new_zeros(())
        balance, z, n = zero, zero, 0
        for layer in self.moe_layers():
            aux = getattr(layer, "aux_losses", None) or {}
            if "balance" in aux:
                balance = balance + aux["balance"]
            if "z" in aux:
                z = z + aux["z"]
            n += 1
        return balance, z, n

    def aux_loss(self) -> torch.Tensor:
        """``aux_loss_weight * sum_l balance_l + z_loss_weight * sum_l z_l`` of the last forward.

        Switch Transformer eq. 4 (alpha = ``aux_loss_weight``) and ST-MoE eq. 5; zero for dense models.
        """
        balance, z, _ = self._aux_parts()
        return self.config.aux_loss_weight * balance + self.config.z_loss_weight * z

    def _aux_metrics(self) -> tuple[torch.Tensor, dict[str, float]]:
        balance, z, n = self._aux_parts()
        aux = self.config.aux_loss_weight * balance + self.config.z_loss_weight * z
        n = max(n, 1)
        # Reported per layer (1.0 = perfectly balanced) so numbers do not grow with depth.
        return aux, {"balance": float(balance.detach()) / n, "z": float(z.detach()) / n}

    def _init_weights(self) -> None:
        """GPT-2 init for attention and embeddings. Feed-forwards (MoE experts, dense MLPs and any
        registered kind) keep their own U(+-1/sqrt(fan_in)) initialisation, so that an MoE and its
        dense baseline start alike and comparisons between them measure the architecture."""
        moe_params = {id(p) for block in self.blocks for p in block.ffn.parameters()}
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and id(module.weight) not in moe_params:
                std = resid_std if name.endswith(("proj", "fc_out")) else 0.02
                nn.init.normal_(module.weight, 0.0, std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Number of parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())


# --------------------------------------------------------------------------------------------
# language model
# --------------------------------------------------------------------------------------------
class MoETransformerLM(_MoEModel):
    """Decoder-only character-level MoE Transformer (GPT-2 layout, Switch-style MoE feed-forwards).

    ``forward(input_ids [B, T]) -> logits [B, T, vocab_size]`` with ``T <= context_length``.
    The LM head is tied to the token embedding (Press & Wolf 2017). ``.tokenizer`` is set by the
    zoo (a :class:`moe_course.data.CharTokenizer`) and used by :meth:`generate_text`.
    """

    # The output layer is ``F.linear(h, tok_emb.weight)``, not a module: ``metrics.size_report``
    # reads this flag to add its 2 * vocab_size * d_model FLOPs per token.
    tied_lm_head = True

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        if not isinstance(cfg, LMConfig):
            raise TypeError(f"cfg must be an LMConfig, got {type(cfg).__name__}")
        cfg.validate()
        self.config = cfg
        self.tokenizer = None
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg, SelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout, causal=True))
            for _ in range(cfg.n_layers)
        )
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self._init_weights()

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """``[B, T] -> [B, T, vocab]``; with ``cache`` the ids continue the cached positions (decoding)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected shape [B, T], got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        t = input_ids.shape[1]
        start = 0 if cache is None else cache.length
        if not 1 <= start + t <= self.config.context_length or t < 1:
            raise ValueError(
                f"input_ids: sequence length must be in [1, context_length={self.config.context_length}], "
                f"got {t}" + (f" after {start} cached positions" if start else "")
            )
        pos = torch.arange(start, start + t, device=input_ids.device)
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(pos))
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.length += t
        return F.linear(self.ln_f(x), self.tok_emb.weight)

    def compute_loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Next-token cross-entropy plus the weighted aux losses.

        ``batch["input_ids"]`` is ``[B, T+1]``: the model reads the first ``T`` ids and predicts the
        last ``T``. Metrics: ``lm_loss`` (the cross-entropy alone), ``balance`` and ``z`` (per MoE layer).
        """
        if "input_ids" not in batch:
            raise KeyError(f"batch must have 'input_ids', got keys {sorted(batch)}")
        ids = batch["input_ids"]
        if ids.dim() != 2 or ids.shape[1] < 2:
            raise ValueError(f"batch['input_ids']: expected shape [B, T+1] with T >= 1, got {tuple(ids.shape)}")
        logits = self(ids[:, :-1])
        lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        aux, metrics = self._aux_metrics()
        return lm_loss + aux, {"lm_loss": float(lm_loss.detach()), **metrics}

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor | list[int],
        max_new_tokens: int = 200,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` continuations autoregressively (temperature 0 = greedy).

        ``prompt_ids`` is a list, a ``[T]`` or a ``[B, T]`` tensor; the result has the same rank and
        includes the prompt. The window slides over the last ``context_length`` ids.

        ``use_cache=True`` keeps a :class:`KVCache`: the prompt is encoded once (prefill), then each
        step runs only the newest token. Positions are learned and absolute, so a cache cannot slide:
        once the text is longer than ``context_length``, every step re-encodes the last
        ``context_length`` ids, exactly as ``use_cache=False`` does for every step. Both give the same
        tokens (up to float rounding in near-ties; a capacity factor would route only the new token).
        """
        _check_int("max_new_tokens", max_new_tokens, lo=0)
        _check_float("temperature", temperature)
        if top_k is not None:
            _check_int("top_k", top_k)
        if not isinstance(use_cache, bool):
            raise TypeError(f"use_cache must be a bool, got {type(use_cache).__name__}")
        device = next(self.parameters()).device
        ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
        squeeze = ids.dim() == 1
        if squeeze:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"prompt_ids: expected a non-empty [T] or [B, T] sequence, got shape {tuple(ids.shape)}")
        lo, hi = int(ids.min()), int(ids.max())  # once per call, not per generated token
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"prompt_ids: expected token ids in [0, vocab_size={self.config.vocab_size}), got {bad}")
        was_training = self.training
        self.eval()
        ctx, cache = self.config.context_length, None
        try:
            for _ in range(max_new_tokens):
                if not use_cache:
                    logits = self(ids[:, -ctx:])[:, -1].float()
                elif cache is None or cache.length >= ctx:  # prefill (or re-encode a full window)
                    cache = KVCache(len(self.blocks))
                    logits = self(ids[:, -ctx:], cache)[:, -1].float()
                else:  # decode: only the newest token
                    logits = self(ids[:, -1:], cache)[:, -1].float()
                if temperature == 0:
                    nxt = logits.argmax(-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None and top_k < logits.shape[-1]:
                        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    probs = torch.softmax(logits, dim=-1)
                    if generator is not None and generator.device != probs.device:
                        nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(device)
                    else:
                        nxt = torch.multinomial(probs, 1, generator=generator)
                ids = torch.cat([ids, nxt], dim=1)
        finally:
            self.train(was_training)
        return ids[0] if squeeze else ids

    def generate_text(self, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                      top_k: int | None = None, seed: int | None = 0) -> str:
        """Encode ``prompt`` with ``.tokenizer``, :meth:`generate`, decode (prompt included)."""
        if self.tokenizer is None:
            raise ValueError("this model has no .tokenizer; set one (moe_course.data.CharTokenizer) first")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        ids = self.generate(self.tokenizer.encode(prompt), max_new_tokens, temperature, top_k, gen)
        return self.tokenizer.decode(ids.tolist())


# --------------------------------------------------------------------------------------------
# classifier
# --------------------------------------------------------------------------------------------
class MoEClassifier(_MoEModel):
    """MNIST-1D classifier: conv stem -> pre-LN blocks (token mixer + MoE feed-forward) -> mean pool -> linear.

    The stem (two ``Conv1d``) turns the ``[B, input_length]`` signal into ``num_tokens`` position
    tokens of width ``d_model``; each MoE layer routes all ``B * num_tokens`` tokens.
    Returns logits ``[B, num_classes]``.
    """

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        if not isinstance(cfg, ClassifierConfig):
            raise TypeError(f"cfg must be a ClassifierConfig, got {type(cfg).__name__}")
        cfg.validate()
        self.config = cfg
        self.stem = nn.Sequential(
            nn.Conv1d(1, cfg.d_model, cfg.kernel_size, padding=cfg.kernel_size // 2),
            nn.GELU(),
            nn.Conv1d(cfg.d_model, cfg.d_model, 3, stride=cfg.stride, padding=1),
        )
        self.pos_emb = nn.Parameter(torch.zeros(cfg.num_tokens, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)

        def mixer() -> nn.Module | None:
            if cfg.mixer == "conv":
                return DepthwiseConvMixer(cfg.d_model, cfg.kernel_size)
            if cfg.mixer == "attention":
                return SelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout, causal=False)
            return None

        self.blocks = nn.ModuleList(Block(cfg, mixer()) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.num_classes)
        self._init_weights()
        nn.init.normal_(self.pos_emb, 0.0, 0.02)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Token sequence ``[B, num_tokens, d_model]`` after the last block (before pooling)."""
        if x.dim() != 2 or x.shape[1] != self.config.input_length:
            raise ValueError(f"x: expected shape [B, input_length={self.config.input_length}], got {tuple(x.shape)}")
        h = self.stem(x.float().unsqueeze(1)).transpose(1, 2)
        h = self.drop(h + self.pos_emb)
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=1))

    def compute_loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-entropy plus the weighted aux losses; metrics ``ce``, ``accuracy``, ``balance``, ``z``."""
        if "x" not in batch or "y" not in batch:
            raise KeyError(f"batch must have 'x' and 'y', got keys {sorted(batch)}")
        logits = self(batch["x"])
        y = batch["y"].long()
        ce = F.cross_entropy(logits.float(), y)
        aux, metrics = self._aux_metrics()
        acc = (logits.argmax(-1) == y).float().mean()
        return ce + aux, {"ce": float(ce.detach()), "accuracy": float(acc), **metrics}


class MoEImageClassifier(_MoEModel):
    """Image classifier: 2-D conv stem -> pre-LN blocks (token mixer + MoE feed-forward) -> mean
    pool -> linear; the image counterpart of :class:`MoEClassifier`.

    ``forward(x [B, in_channels, image_size, image_size]) -> logits [B, num_classes]`` (a
    ``[B, image_size, image_size]`` batch of one-channel images is accepted too). Every MoE layer
    routes all ``B * num_tokens`` position tokens, so the compression code treats it like the other
    zoo models (``model.blocks[i].ffn``, :meth:`moe_layers`).
    """

    def __init__(self, cfg: ImageClassifierConfig) -> None:
        super().__init__()
        if not isinstance(cfg, ImageClassifierConfig):
            raise TypeError(f"cfg must be an ImageClassifierConfig, got {type(cfg).__name__}")
        cfg.validate()
        self.config = cfg
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_channels, cfg.d_model, cfg.kernel_size, padding=cfg.kernel_size // 2),
            nn.GELU(),
            nn.Conv2d(cfg.d_model, cfg.d_model, 3, stride=cfg.stride, padding=1),
        )
        self.pos_emb = nn.Parameter(torch.zeros(cfg.num_tokens, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)

        def mixer() -> nn.Module | None:
            if cfg.mixer == "conv":
                return DepthwiseConv2dMixer(cfg.d_model, cfg.kernel_size, cfg.grid)
            if cfg.mixer == "attention":
                return SelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout, causal=False)
            return None

        self.blocks = nn.ModuleList(Block(cfg, mixer()) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.num_classes)
        self._init_weights()
        nn.init.normal_(self.pos_emb, 0.0, 0.02)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Token sequence ``[B, num_tokens, d_model]`` after the last block (before pooling)."""
        c, n = self.config.in_channels, self.config.image_size
        if x.dim() == 3 and c == 1:
            x = x.unsqueeze(1)
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, n, n):
            raise ValueError(f"x: expected shape [B, {c}, {n}, {n}], got {tuple(x.shape)}")
        h = self.stem(x.float()).flatten(2).transpose(1, 2)
        h = self.drop(h + self.pos_emb)
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=1))

    compute_loss = MoEClassifier.compute_loss


def model_from_config(cfg: _FFNConfig) -> _MoEModel:
    """Build the model class a config belongs to."""
    if isinstance(cfg, LMConfig):
        return MoETransformerLM(cfg)
    if isinstance(cfg, ClassifierConfig):
        return MoEClassifier(cfg)
    if isinstance(cfg, ImageClassifierConfig):
        return MoEImageClassifier(cfg)
    raise TypeError(f"cfg must be an LMConfig, ClassifierConfig or ImageClassifierConfig, got {type(cfg).__name__}")


__all__ = [
    "LMConfig",
    "ClassifierConfig",
    "DenseFFN",
    "SelfAttention",
    "Block",
    "MoETransformerLM",
    "KVCache",
    "MoEClassifier",
    "ImageClassifierConfig",
    "MoEImageClassifier",
    "model_from_config",
]
