"""Bad input, everywhere (issue 7): one table row per (public function or class, plausible mistake).

Each row says what a learner might pass, which exception must come out and a regex that must match
its message: the argument's name and the value it expected. For rows that take a model (or a
tensor), the test also checks that the input is left exactly as it was: a sha256 over every
state_dict tensor's bytes in sorted key order plus the module structure's repr (tensors: their
bytes), taken before and after the failing call. So validation has to happen before any copy or
mutation.

Not checked on purpose: NaN/inf inside the forward pass of MoE layers, routers, dispatch, the
losses and kd_loss. They run on every training step, and a data-dependent check
(``torch.isfinite(x).all()``) would force a GPU synchronisation each time; NaNs there show up in
the loss, which ``moe_course.train.fit`` already stops on. One-shot steps (compression,
calibration, quantize_tensor, truncated_svd, merging) do check.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn

from moe_course import calib as CA
from moe_course import course_table as CT
from moe_course import data as D
from moe_course import device as DEV
from moe_course import dispatch as DI
from moe_course import factorized as FZ
from moe_course import layers as LY
from moe_course import losses as LO
from moe_course import metrics as ME
from moe_course import models as MO
from moe_course import train as TR
from moe_course import viz as VZ
from moe_course import zoo as ZO
from moe_course.compress import distillation as KD
from moe_course.compress import lowrank as LR
from moe_course.compress import merging as MG
from moe_course.compress import pruning as PR
from moe_course.compress import quantization as QU
from moe_course.compress import trimming as TM

try:  # the pipeline is added by another change; its rows join when it exists
    from moe_course.compress import recipes as RC
except ImportError:  # pragma: no cover
    RC = None

VE, TE = ValueError, TypeError
V = 11  # vocabulary of the tiny LM
NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------------------------- fixtures
class L:
    """A lazily built argument (models are built once per module, on first use)."""

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn


def _lm_cfg(**kw) -> MO.LMConfig:
    base = dict(d_model=16, n_layers=2, n_heads=2, num_experts=4, k=2, d_hidden=16, vocab_size=V, context_length=8)
    base.update(kw)
    return MO.LMConfig(**base)


def _build(cfg, seed=0):
    torch.manual_seed(seed)
    return MO.model_from_config(cfg).eval()


@cache
def lm():
    return _build(_lm_cfg())


@cache
def dense():
    return _build(_lm_cfg(ffn="dense"))


@cache
def soft():
    return _build(_lm_cfg(ffn="soft"))


@cache
def top1():
    return _build(_lm_cfg(k=1))


@cache
def capped():
    return _build(_lm_cfg(capacity_factor=1.0))


@cache
def clf():
    return _build(MO.ClassifierConfig(d_model=16, n_layers=1, n_heads=2, num_experts=4, k=2, d_hidden=16))


@cache
def calib():
    return {"input_ids": torch.randint(0, V, (4, 9), generator=torch.Generator().manual_seed(0))}


@cache
def clf_calib():
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(8, 40, generator=g), "y": torch.randint(0, 10, (8,), generator=g)}


@cache
def quantized():
    return QU.quantize(lm(), 8)


@cache
def lowrank():
    return LR.lowrank_experts(lm(), keep=2)


@cache
def shared():
    return LR.share_experts(lm(), keep=1)


@cache
def merged():
    return MG.merge_experts(lm(), 2, calib=calib())


@cache
def mcsmoe():
    return MG.mc_smoe(lm(), 2, calib=calib(), rank=2, keep_sparse=0.1)


@cache
def skipping():
    return PR.skip_experts(lm(), calib=calib())


@cache
def nan_model():
    m = copy.deepcopy(lm())
    with torch.no_grad():
        m.blocks[0].ffn.experts.w_in[0, 0, 0] = NAN
    return m


@cache
def inf_router_model():
    m = copy.deepcopy(lm())
    with torch.no_grad():
        m.blocks[1].ffn.router.gate.weight[0, 0] = INF
    return m


@cache
def seq():
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))


@cache
def layer():
    return lm().blocks[0].ffn


@cache
def experts():
    torch.manual_seed(0)
    return LY.Experts(4, 16, 16)


@cache
def stats():
    return ME.routing_stats(lm(), calib())


@cache
def history():
    h = TR.History()
    h.steps, h.train_loss = [0, 1, 2], [3.0, 2.0, 1.0]
    return h


def _nan(t: torch.Tensor, value: float = NAN) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = value
    return t


LM, DENSE, SOFT, TOP1, CAPPED, CLF = L(lm), L(dense), L(soft), L(top1), L(capped), L(clf)
CAL, CCAL = L(calib), L(clf_calib)
QM, LRM, SHM, MGM, MCM, SKM = L(quantized), L(lowrank), L(shared), L(merged), L(mcsmoe), L(skipping)
NANM, INFM, SEQ, LAYER, EXPERTS, STATS = L(nan_model), L(inf_router_model), L(seq), L(layer), L(experts), L(stats)
EMPTY_CAL = {"input_ids": torch.empty(0, 9, dtype=torch.long)}
NO_TOKENS_CAL = {"input_ids": torch.zeros(4, 1, dtype=torch.long)}
OOV_CAL = {"input_ids": torch.full((2, 9), V + 5)}
NEG_CAL = {"input_ids": torch.full((2, 9), -1)}
NAN_CCAL = L(lambda: {"x": _nan(clf_calib()["x"]), "y": clf_calib()["y"]})
W = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
X16 = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))


# ---------------------------------------------------------------------------------- the table
@dataclass
class Row:
    id: str
    fn: Callable
    exc: type | tuple
    match: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    marks: tuple = ()


ROWS: list[Row] = []


def row(id: str, fn: Callable, exc, match: str, *args, **kwargs) -> None:
    ROWS.append(Row(id, fn, exc, match, args, kwargs))


def known_issue(reason: str) -> None:
    """Mark the last row as a known, reported problem (strict xfail: it must keep failing until fixed)."""
    ROWS[-1].marks = (pytest.mark.xfail(reason=reason, strict=True),)


# ---- layers -------------------------------------------------------------------------------
row("Experts/num_experts=0", LY.Experts, VE, r"num_experts: expected a positive int, got 0", 0, 16, 16)
row("Experts/d_model=float", LY.Experts, VE, r"d_model: expected a positive int, got 16\.0", 4, 16.0, 16)
row("Experts/d_hidden=-1", LY.Experts, VE, r"d_hidden: expected a positive int, got -1", 4, 16, -1)
row("Experts/activation", LY.Experts, VE, r"activation: expected one of \('gelu', 'swiglu'\), got 'relu'", 4, 16, 16, "relu")
row("Experts[]/out of range", lambda e: e[4], IndexError, r"expert index 4 out of range for 4 experts", EXPERTS)
row("Experts[]/float index", lambda e: e[1.5], TE, r"i: expected an int expert index, got 1\.5", EXPERTS)
row("Experts.expert_forward/index", lambda e: e.expert_forward(9, X16), IndexError,
    r"i: expected an expert index in \[0, 4\), got 9", EXPERTS)
row("CompressedExperts/not Experts", LY.CompressedExperts, TE, r"experts: expected a moe_course.layers.Experts, got Linear",
    nn.Linear(2, 2))
row("ExpertView/index", LY.ExpertView, IndexError, r"index: expected an expert index in \[0, 4\), got 7", EXPERTS, 7)
row("TopKRouter/k=0", LY.TopKRouter, VE, r"k: expected an integer in \[1, num_experts=4\], got 0", 16, 4, 0)
row("TopKRouter/k>E", LY.TopKRouter, VE, r"k: expected an integer in \[1, num_experts=4\], got 5", 16, 4, 5)
row("TopKRouter/num_experts=0", LY.TopKRouter, VE, r"num_experts: expected a positive int, got 0", 16, 0, 1)
row("TopKRouter/d_model=str", LY.TopKRouter, VE, r"d_model: expected a positive int, got '16'", "16", 4, 2)
row("SoftMoE/num_experts=0", LY.SoftMoE, VE, r"num_experts: expected a positive int, got 0", 16, 0, 16)
row("SoftMoE/activation", LY.SoftMoE, VE, r"activation: expected one of", 16, 4, 16, "tanh")
row("SparseMoE/k>E", LY.SparseMoE, VE, r"k: expected an integer in \[1, num_experts=4\], got 6", 16, 4, 16, k=6)
row("SparseMoE/capacity_factor<0", LY.SparseMoE, VE, r"capacity_factor: expected None or a finite number > 0, got -1",
    16, 4, 16, capacity_factor=-1)
row("SparseMoE/capacity_factor=inf", LY.SparseMoE, VE, r"capacity_factor: expected None or a finite number > 0, got inf",
    16, 4, 16, capacity_factor=INF)
row("SparseMoE/capacity_factor=nan", LY.SparseMoE, VE, r"capacity_factor: expected None or a finite number > 0, got nan",
    16, 4, 16, capacity_factor=NAN)
row("SparseMoE/num_shared_experts", LY.SparseMoE, VE, r"num_shared_experts: expected an integer >= 0, got -1",
    16, 4, 16, num_shared_experts=-1)
row("SparseMoE/dispatch", LY.SparseMoE, VE, r"dispatch: expected one of \('naive', 'loop', 'grouped', 'auto'\), got 'fast'",
    16, 4, 16, dispatch="fast")
# MoE layer forwards validate shapes and dtypes (free: no GPU sync); they do NOT check NaN (hot path).
row("SparseMoE.forward/last dim", lambda m: m(torch.randn(3, 8)), VE, r"x: expected last dimension d_model=16, got shape \(3, 8\)", LAYER)
row("SparseMoE.forward/not tensor", lambda m: m([[0.0] * 16]), TE, r"x: expected a torch.Tensor, got list", LAYER)
row("SparseMoE.forward/int dtype", lambda m: m(torch.ones(3, 16, dtype=torch.long)), TE,
    r"x: expected a floating-point tensor, got torch.int64", LAYER)
row("SoftMoE.forward/last dim", lambda m: m(torch.randn(2, 3, 4)), VE, r"x: expected last dimension d_model=16",
    L(lambda: soft().blocks[0].ffn))
row("moe_layers/not a module", LY.moe_layers, TE, r"model: expected an nn.Module, got dict", {"w": 1})
row("require_moe_layers/dense", LY.require_moe_layers, VE, r"model: MoETransformerLM has no MoE layers", DENSE)
row("require_moe_layers/None", LY.require_moe_layers, TE, r"model: expected an nn.Module, got NoneType", None)

# ---- dispatch -----------------------------------------------------------------------------
_w2, _i2 = torch.full((5, 2), 0.5), torch.tensor([[0, 1]] * 5)
row("dispatch/x 3-D", DI.dispatch, VE, r"x: expected shape \[T, d_model=16\], got \(1, 5, 16\)", X16[None], _w2, _i2, EXPERTS)
row("dispatch/weights shape", DI.dispatch, VE, r"weights/indices: expected matching shapes \[T=5, k\]", X16, _w2[:, :1], _i2, EXPERTS)
row("dispatch/indices float", DI.dispatch, TE, r"indices: expected an integer tensor of expert ids, got torch.float32",
    X16, _w2, _i2.float(), EXPERTS)
row("dispatch/keep shape", DI.dispatch, VE, r"keep: expected shape \(5, 2\)", X16, _w2, _i2, EXPERTS, keep=torch.ones(5, 1, dtype=torch.bool))
row("dispatch/keep dtype", DI.dispatch, TE, r"keep: expected a bool mask, got torch.int64", X16, _w2, _i2, EXPERTS,
    keep=torch.ones(5, 2, dtype=torch.long))
row("dispatch/strategy", DI.dispatch, VE, r"dispatch: expected one of \('naive', 'loop', 'grouped', 'auto'\), got 'magic'",
    X16, _w2, _i2, EXPERTS, "magic")
row("dispatch/experts", DI.dispatch, TE, r"experts: expected a moe_course.layers.Experts, got Linear", X16, _w2, _i2, nn.Linear(16, 16))
row("resolve_strategy/name", DI.resolve_strategy, VE, r"dispatch: expected one of", "sorted", "cpu")
row("capacity_mask/capacity<0", DI.capacity_mask, VE, r"capacity: expected an integer in \[0, inf\], got -1", _i2, 4, -1)
row("capacity_mask/capacity float", DI.capacity_mask, VE, r"capacity: expected an integer in \[0, inf\], got 2\.5", _i2, 4, 2.5)
row("capacity_mask/indices 1-D", DI.capacity_mask, VE, r"indices: expected an integer tensor \[T, k\], got shape \(5,\)", _i2[:, 0], 4, 2)
row("capacity_mask/num_experts=0", DI.capacity_mask, VE, r"num_experts: expected an integer in \[1, inf\], got 0", _i2, 0, 2)

# ---- losses -------------------------------------------------------------------------------
_p = torch.softmax(torch.randn(5, 4), -1)
row("load_balancing_loss/probs shape", LO.load_balancing_loss, VE, r"probs: expected shape \[T, num_experts=3\]", _p, _i2, 3)
row("load_balancing_loss/indices shape", LO.load_balancing_loss, VE, r"indices: expected shape \[T=5, k\]", _p, _i2[:3], 4)
row("load_balancing_loss/num_experts=0", LO.load_balancing_loss, VE, r"num_experts: expected an integer in \[1, inf\], got 0", _p, _i2, 0)
row("router_z_loss/1-D", LO.router_z_loss, VE, r"logits: expected shape \[T, num_experts\], got \(4,\)", torch.randn(4))
row("coefficient_of_variation_sq/empty", LO.coefficient_of_variation_sq, VE, r"x: expected a non-empty tensor", torch.empty(0))
row("coefficient_of_variation_sq/not tensor", LO.coefficient_of_variation_sq, TE, r"x: expected a torch.Tensor, got list", [1.0, 2.0])

# ---- models -------------------------------------------------------------------------------
row("LMConfig/k>num_experts", MO.LMConfig, VE, r"k must be in \[1, num_experts=4\], got 5", num_experts=4, k=5)
row("LMConfig/k=0", MO.LMConfig, VE, r"k must be >= 1, got 0", k=0)
row("LMConfig/d_model float", MO.LMConfig, TE, r"d_model must be an int, got float", d_model=64.0)
row("LMConfig/n_heads divides", MO.LMConfig, VE, r"n_heads=3 must divide d_model=128", n_heads=3)
row("LMConfig/ffn", MO.LMConfig, VE, r"ffn must be one of \('moe', 'soft', 'dense'", ffn="sparse")
row("LMConfig/activation", MO.LMConfig, VE, r"activation must be one of \('gelu', 'swiglu'\), got 'relu'", activation="relu")
row("LMConfig/capacity_factor 0", MO.LMConfig, VE, r"capacity_factor must be > 0 or None, got 0", capacity_factor=0.0)
row("LMConfig/capacity_factor nan", MO.LMConfig, VE, r"capacity_factor must be in \[0\.0, inf\], got nan", capacity_factor=NAN)
row("LMConfig/capacity_factor inf", MO.LMConfig, VE, r"capacity_factor must be a finite number > 0 or None, got inf",
    capacity_factor=INF)
row("LMConfig/dropout 1", MO.LMConfig, VE, r"dropout must be in \[0, 1\), got 1", dropout=1.0)
row("LMConfig/dispatch", MO.LMConfig, VE, r"dispatch must be one of", dispatch="fastest")
row("LMConfig/noisy str", MO.LMConfig, TE, r"noisy must be a bool, got str", noisy="yes")
row("LMConfig/vocab_size 1", MO.LMConfig, VE, r"vocab_size must be >= 2, got 1", vocab_size=1)
row("LMConfig/aux_loss_weight<0", MO.LMConfig, VE, r"aux_loss_weight must be in \[0\.0, inf\], got -0\.1", aux_loss_weight=-0.1)
row("LMConfig/num_shared_experts<0", MO.LMConfig, VE, r"num_shared_experts must be >= 0, got -1", num_shared_experts=-1)
row("LMConfig/ffn_options", MO.LMConfig, TE, r"ffn_options must be a dict, got list", ffn_options=[1])
row("LMConfig.from_dict/unknown", MO.LMConfig.from_dict, VE, r"unknown LMConfig field\(s\) \['experts'\]", {"experts": 8})
row("LMConfig.from_dict/not mapping", MO.LMConfig.from_dict, TE, r"d must be a mapping, got list", [("k", 2)])
row("LMConfig.replace/bad", lambda: MO.LMConfig().replace(k=99), VE, r"k must be in \[1, num_experts=8\], got 99")
row("ClassifierConfig/mixer", MO.ClassifierConfig, VE, r"mixer must be one of \('conv', 'attention', 'none'\), got 'rnn'", mixer="rnn")
row("ClassifierConfig/stride>input", MO.ClassifierConfig, VE, r"stride must be <= input_length=40, got 50", stride=50)
row("ClassifierConfig/num_classes 1", MO.ClassifierConfig, VE, r"num_classes must be >= 2, got 1", num_classes=1)
row("DenseFFN/activation", MO.DenseFFN, VE, r"activation must be one of \('gelu', 'swiglu'\), got 'relu'", 16, 16, "relu")
row("DenseFFN/d_hidden=0", MO.DenseFFN, VE, r"d_hidden must be >= 1, got 0", 16, 0)
row("SelfAttention/n_heads divides", MO.SelfAttention, VE, r"n_heads=3 must divide d_model=16", 16, 3)
row("SelfAttention/dropout", MO.SelfAttention, VE, r"dropout must be in \[0(\.0)?, 1(\.0)?[\]\)], got 1\.5", 16, 2, 1.5)
row("Block/cfg", MO.Block, TE, r"cfg must be an LMConfig, ClassifierConfig or ImageClassifierConfig, got dict", {"d_model": 16}, None)
row("MoETransformerLM/cfg", MO.MoETransformerLM, TE, r"cfg must be an LMConfig, got ClassifierConfig", MO.ClassifierConfig())
row("MoEClassifier/cfg", MO.MoEClassifier, TE, r"cfg must be a ClassifierConfig, got LMConfig", MO.LMConfig())
row("MoETransformerLM.forward/1-D", lambda m: m(torch.zeros(5, dtype=torch.long)), VE, r"input_ids: expected shape \[B, T\], got \(5,\)", LM)
row("MoETransformerLM.forward/float", lambda m: m(torch.zeros(2, 5)), TE, r"input_ids must be an integer tensor, got torch.float32", LM)
row("MoETransformerLM.forward/too long", lambda m: m(torch.zeros(1, 9, dtype=torch.long)), VE,
    r"input_ids: sequence length must be in \[1, context_length=8\], got 9", LM)
row("MoETransformerLM.compute_loss/keys", lambda m: m.compute_loss({"ids": torch.zeros(1, 3)}), KeyError,
    r"batch must have 'input_ids', got keys \['ids'\]", LM)
row("MoETransformerLM.compute_loss/T=0", lambda m: m.compute_loss({"input_ids": torch.zeros(2, 1, dtype=torch.long)}), VE,
    r"batch\['input_ids'\]: expected shape \[B, T\+1\] with T >= 1, got \(2, 1\)", LM)
row("MoETransformerLM.generate/max_new_tokens", lambda m: m.generate([1, 2], max_new_tokens=-1), VE,
    r"max_new_tokens must be >= 0, got -1", LM)
row("MoETransformerLM.generate/temperature", lambda m: m.generate([1, 2], temperature=-1.0), VE,
    r"temperature must be in \[0\.0, inf\], got -1\.0", LM)
row("MoETransformerLM.generate/top_k", lambda m: m.generate([1, 2], top_k=0), VE, r"top_k must be >= 1, got 0", LM)
row("MoETransformerLM.generate/empty prompt", lambda m: m.generate([]), VE,
    r"prompt_ids: expected a non-empty \[T\] or \[B, T\] sequence", LM)
row("MoETransformerLM.generate/oov prompt", lambda m: m.generate([1, V + 3]), VE,
    r"prompt_ids: expected token ids in \[0, vocab_size=11\), got 14", LM)
row("MoETransformerLM.generate_text/no tokenizer", lambda m: m.generate_text("hi"), VE, r"this model has no \.tokenizer", LM)
row("MoEClassifier.forward/shape", lambda m: m(torch.randn(2, 30)), VE, r"x: expected shape \[B, input_length=40\], got \(2, 30\)", CLF)
row("MoEClassifier.compute_loss/keys", lambda m: m.compute_loss({"x": torch.randn(2, 40)}), KeyError,
    r"batch must have 'x' and 'y', got keys \['x'\]", CLF)
row("preset/name", ZO.preset_configs, VE, r"preset name must be one of \('cpu', 'gpu', 'test', 'auto'\), got 'tiny'", "tiny")
row("preset/model", ZO.preset_configs, VE, r"model must be one of \('shakespeare-moe', 'mnist1d-moe', 'digits-moe'\), got 'mnist'", "cpu", "mnist")
row("model_from_config/dict", MO.model_from_config, TE, r"cfg must be an LMConfig, ClassifierConfig or ImageClassifierConfig, got dict", {"d_model": 8})
row("register_ffn/builtin name", MO.register_ffn, VE, r"name must be a new non-empty string \(not one of \('moe', 'soft', 'dense'\)\)",
    "moe", lambda cfg: None)
row("register_ffn/builder", MO.register_ffn, TE, r"builder must be callable\(cfg\) -> nn.Module, got int", "mine", 3)

# ---- train --------------------------------------------------------------------------------
row("TrainConfig/steps=0", TR.TrainConfig, VE, r"steps must be >= 1, got 0", steps=0)
row("TrainConfig/batch_size float", TR.TrainConfig, TE, r"batch_size must be an int, got float", batch_size=32.0)
row("TrainConfig/lr=0", TR.TrainConfig, VE, r"lr must be > 0, got 0", lr=0)
row("TrainConfig/lr nan", TR.TrainConfig, VE, r"lr must be a number >= 0, got nan", lr=NAN)
row("TrainConfig/lr inf", TR.TrainConfig, VE, r"lr must be a finite number > 0, got inf", lr=INF)
row("TrainConfig/min_lr_ratio", TR.TrainConfig, VE, r"min_lr_ratio must be in \[0, 1\], got 2", min_lr_ratio=2)
row("TrainConfig/grad_clip", TR.TrainConfig, VE, r"grad_clip must be > 0 or None, got 0", grad_clip=0)
row("TrainConfig/eval_batches", TR.TrainConfig, VE, r"eval_batches must be a positive int or None, got 0", eval_batches=0)
row("TrainConfig.from_dict/unknown", TR.TrainConfig.from_dict, VE, r"unknown TrainConfig field\(s\) \['epochs'\]", {"epochs": 3})
row("fit/cfg", TR.fit, TE, r"cfg must be a TrainConfig, got dict", LM, [1], cfg={"steps": 3})
row("fit/no compute_loss", TR.fit, TE, r"model must define compute_loss\(batch\), got Sequential", SEQ, [1])
row("fit/empty data", TR.fit, VE, r"train_data is empty", LM, [])
row("fit/data not sized", TR.fit, TE, r"train_data must be a datasets.Dataset", LM, 42)
row("evaluate/batch_size", TR.evaluate, VE, r"batch_size must be a positive int, got 0", LM, [1], batch_size=0)
row("evaluate/max_batches", TR.evaluate, VE, r"max_batches must be a positive int or None, got 0", LM, [1], max_batches=0)
row("evaluate/empty", TR.evaluate, VE, r"data is empty", LM, [])
row("lr_at/step<0", TR.lr_at, VE, r"step: expected an int >= 0, got -1", -1, TR.TrainConfig())
row("lr_at/cfg", TR.lr_at, TE, r"cfg: expected a TrainConfig, got dict", 3, {"lr": 1e-3})
row("param_groups/weight_decay<0", TR.param_groups, VE, r"weight_decay: expected a finite number >= 0, got -0\.1", LM, -0.1)
row("param_groups/model", TR.param_groups, TE, r"model: expected an nn.Module, got dict", {"w": 1}, 0.1)

# ---- data ---------------------------------------------------------------------------------
row("CharTokenizer/multi-char", D.CharTokenizer, VE, r"chars must contain single characters, got 'ab'", ["ab", "c"])
row("CharTokenizer.fit/empty", lambda: D.CharTokenizer().fit(""), VE, r"texts contains no characters")
row("CharTokenizer.fit/ints", lambda: D.CharTokenizer().fit([1, 2]), TE, r"texts must contain only str, got int")
row("CharTokenizer.encode/unfitted", lambda: D.CharTokenizer().encode("a"), RuntimeError, r"CharTokenizer has no vocabulary yet")
row("CharTokenizer.encode/not str", lambda: D.CharTokenizer.from_text("abc").encode(5), TE, r"text must be a str, got int")
row("CharTokenizer.decode/out of range", lambda: D.CharTokenizer.from_text("abc").decode([99]), VE,
    r"ids must be in \[0, vocab_size=4\), got values in \[99, 99\]")
row("CharTokenizer.decode/2-D", lambda: D.CharTokenizer.from_text("abc").decode([[1]]), VE, r"ids must be 1-D, got shape \(1, 1\)")
row("CharTokenizer.decode/float", lambda: D.CharTokenizer.from_text("abc").decode([1.5]), TE, r"ids must be integers, got dtype float64")
row("CharTokenizer.from_dict/format", D.CharTokenizer.from_dict, VE, r"data is not a saved CharTokenizer", {"chars": "ab"})
row("CharTokenizer.load/missing", D.CharTokenizer.load, FileNotFoundError, r"path '/nonexistent/tok.json' does not exist",
    "/nonexistent/tok.json")
row("lm_blocks/block_size=0", lambda: D.lm_blocks(_text_ds(), D.CharTokenizer.from_text("ab "), 0), VE, r"block_size must be >= 1, got 0")
row("lm_blocks/column", lambda: D.lm_blocks(_text_ds(), D.CharTokenizer.from_text("ab "), 2, text_column="body"), VE,
    r"text_column 'body' is not a column of dataset")
row("lm_blocks/tokenizer", lambda: D.lm_blocks(_text_ds(), 5, 2), TE, r"tokenizer must have an encode method")
row("lm_blocks/not dataset", D.lm_blocks, TE, r"dataset must be a datasets.Dataset", ["ab ab"], D.CharTokenizer.from_text("ab "), 2)
row("lm_blocks/too short", lambda: D.lm_blocks(_text_ds(), D.CharTokenizer.from_text("ab "), 500), VE,
    r"fewer than block_size \+ 1 = 501")
row("load_mnist1d/num_samples", D.load_mnist1d, VE, r"num_samples must be >= 10, got 5", num_samples=5)
row("load_mnist1d/seed<0", D.load_mnist1d, VE, r"seed must be >= 0, got -1", seed=-1)
row("load_mnist1d/val_fraction", D.load_mnist1d, VE, r"val_fraction must be in", val_fraction=1.5)
row("load_shakespeare/val_fraction", D.load_shakespeare, VE, r"val_fraction must be in", val_fraction=0.0)
row("load_shakespeare/val_fraction str", D.load_shakespeare, TE, r"val_fraction must be a float, got str", val_fraction="0.1")
row("load_text_dataset/empty", D.load_text_dataset, VE, r"name_or_path must not be empty", "")
row("load_text_dataset/type", D.load_text_dataset, TE, r"name_or_path must be a str or path, got int", 3)
row("load_text_dataset/split", D.load_text_dataset, VE, r"split must be a non-empty str such as 'train', got ''", "x.txt", split="")
row("batches/batch_size=0", lambda: D.batches(_text_ds(), 0), VE, r"batch_size must be >= 1, got 0")
row("batches/seed<0", lambda: D.batches(_text_ds(), 2, seed=-3), VE, r"seed must be >= 0, got -3")
row("batches/not dataset", D.batches, TE, r"dataset must be a datasets.Dataset", [{"x": 1}], 2)


@cache
def _text_ds():
    import datasets

    return datasets.Dataset.from_dict({"text": ["ab ab", "ba ba"]})


# ---- device -------------------------------------------------------------------------------
row("get_device/unknown", DEV.get_device, VE, r"prefer must be one of 'auto', 'cpu', 'cuda\[:N\]', 'mps', got 'tpu'", "tpu")
row("get_device/type", DEV.get_device, TE, r"prefer must be a str, torch.device or None, got int", 0)
row("seed_everything/negative", DEV.seed_everything, VE, r"seed must be in \[0, 2\*\*32\), got -1", -1)
row("seed_everything/str", DEV.seed_everything, TE, r"seed must be an int, got str", "42")
row("default_preset/bad device", DEV.default_preset, VE, r"device must be a device string like 'cpu' or 'cuda:0', got 'gpu0'", "gpu0")
row("default_preset/type", DEV.default_preset, TE, r"device must be a str, torch.device or None, got float", 1.0)

# ---- zoo ----------------------------------------------------------------------------------
row("pretrained/name", ZO.pretrained, VE, r"name must be one of \('shakespeare-moe', 'mnist1d-moe', 'digits-moe'\), got 'gpt2'", "gpt2")
row("pretrained/preset", ZO.pretrained, VE, r"preset must be one of \('cpu', 'gpu', 'test', 'auto'\), got 'large'", "mnist1d-moe", "large")
row("data/name", ZO.data, VE, r"name must be one of", "mnist")
row("is_cached/name", ZO.is_cached, VE, r"name must be one of", "shakespeare")
row("entry_dir/preset", ZO.entry_dir, VE, r"preset must be one of", "mnist1d-moe", preset="xl")
row("cache_dir/type", ZO.cache_dir, TE, r"path: expected a str, os.PathLike or None, got int", 5)

# ---- metrics ------------------------------------------------------------------------------
row("format_bytes/negative", ME.format_bytes, VE, r"n: expected a number of bytes >= 0, got -1", -1)
row("format_bytes/nan", ME.format_bytes, VE, r"n: expected a number of bytes >= 0, got nan", NAN)
row("format_count/str", ME.format_count, VE, r"n: expected a number, got 'ten'", "ten")
row("size_report/not module", ME.size_report, TE, r"model: expected an nn.Module, got str", "model")
row("size_report/context_length", ME.size_report, VE, r"context_length: expected None or a positive int, got 0", LM, 0)
row("latency/repeats", ME.latency, VE, r"repeats: expected a positive int, got 0", LM, torch.zeros(1, 4, dtype=torch.long), repeats=0)
row("latency/warmup", ME.latency, VE, r"warmup: expected an int >= 0, got -1", LM, torch.zeros(1, 4, dtype=torch.long), warmup=-1)
row("latency/model None", ME.latency, TE, r"model: expected an nn.Module \(None is allowed only when batch is a callable\)",
    None, torch.zeros(1, 4, dtype=torch.long))
row("latency/model type", ME.latency, TE, r"model: expected an nn.Module or None, got str", "lm", lambda: None)
row("routing_stats/dense", ME.routing_stats, VE, r"model: MoETransformerLM has no MoE layers", DENSE, CAL)
row("routing_stats/batch_size", ME.routing_stats, VE, r"batch_size: expected a positive int, got 0", LM, CAL, batch_size=0)
row("routing_stats/max_batches", ME.routing_stats, VE, r"max_batches: expected None or a positive int, got 0", LM, CAL, max_batches=0)
row("routing_stats/max_tokens", ME.routing_stats, VE, r"max_tokens: expected an int >= 0, got -5", LM, CAL, max_tokens=-5)
row("routing_stats/empty", ME.routing_stats, VE, r"data: no batches \(or no tokens\) to route", LM, EMPTY_CAL)
row("routing_stats/data type", ME.routing_stats, TE, r"data: expected a datasets.Dataset, a tensor, a dict of tensors or an iterable",
    LM, 42)
row("compare/empty", ME.compare, VE, r"models: expected a non-empty dict \{name: nn.Module\}", {})
row("compare/not module", ME.compare, TE, r"models\['q'\]: expected an nn.Module, got int", {"q": 3})
row("compare/list", ME.compare, VE, r"models: expected a non-empty dict", [LM])

# ---- viz ----------------------------------------------------------------------------------
row("plot_architecture/int", VZ.plot_architecture, TE, r"model_or_config: expected an MoE layer, a model, or a config, got int", 42)
row("plot_architecture/no moe", VZ.plot_architecture, VE, r"model_or_config: Sequential has no \.config and no MoE layers", SEQ)
row("plot_expert_utilization/layer", VZ.plot_expert_utilization, VE, r"layer: expected an index in \[0, 2\), got 5", STATS, layer=5)
row("plot_expert_utilization/type", VZ.plot_expert_utilization, TE, r"stats: expected RoutingStats, LayerRoutingStats or frequencies, got str",
    "stats")
row("plot_expert_utilization/3-D", VZ.plot_expert_utilization, VE, r"stats: expected frequencies \[E\] or \[L, E\], got shape \(1, 2, 3\)",
    torch.ones(1, 2, 3))
row("plot_routing_heatmap/shape", VZ.plot_routing_heatmap, VE, r"indices_or_probs: expected a \[T, E\] or \[T, k\] tensor, got shape \(4,\)",
    None, torch.ones(4))
row("plot_routing_heatmap/tokens", VZ.plot_routing_heatmap, VE, r"tokens: expected 3 labels \(one per routed token\), got 2",
    ["a", "b"], torch.softmax(torch.randn(3, 4), -1))
row("plot_routing_heatmap/indices range", VZ.plot_routing_heatmap, VE, r"indices_or_probs: expert indices must be in \[0, num_experts=4\)",
    None, torch.tensor([[0, 7]]), num_experts=4)
row("plot_loss_curves/smoothing", VZ.plot_loss_curves, VE, r"smoothing: expected a number in \[0, 1\), got 1\.5", L(history), smoothing=1.5)
row("plot_loss_curves/type", VZ.plot_loss_curves, TE, r"history_or_histories: expected a History", 3.0)
row("plot_race/empty", VZ.plot_race, VE, r"results: expected a non-empty dict", {})
if hasattr(VZ, "plot_frontier"):
    row("plot_frontier/empty", VZ.plot_frontier, VE, r"rows: expected a non-empty list of dicts", [])
    row("plot_frontier/x", VZ.plot_frontier, VE, r"x: expected one of .*, got 'flops'", [{"bytes": 1, "quality": 1.0}], x="flops")
    row("plot_frontier/keys", VZ.plot_frontier, VE, r"rows: each row needs the keys", [{"bytes": 1}])

# ---- factorized ---------------------------------------------------------------------------
row("entmax15/int", FZ.entmax15, TE, r"z: expected a floating point tensor, got torch.int64", torch.ones(3, dtype=torch.long))
row("entmax15/dim", FZ.entmax15, VE, r"dim: expected an int in \[-2, 1\] for a 2-d tensor, got 2", torch.randn(2, 3), dim=2)
row("entmax15/list", FZ.entmax15, TE, r"z: expected a torch.Tensor, got list", [1.0, 2.0])
row("MuMoEGate/normalization", FZ.MuMoEGate, VE, r"normalization: expected one of", 16, 4, normalization="rms")
row("MuMoEGate/num_experts", FZ.MuMoEGate, TE, r"num_experts: expected a positive int, or a non-empty tuple", 16, ())
row("MuMoEGate.silence/mode", lambda: FZ.MuMoEGate(16, 4).silence([0], mode=3), VE, r"mode: expected an int in \[0, 0\], got 3")
row("MuMoEGate.silence/experts", lambda: FZ.MuMoEGate(16, 4).silence([9]), VE, r"experts: expected indices in \[0, 3\] for mode 0")
row("UnfactorizedMuMoE/in_features", FZ.UnfactorizedMuMoE, VE, r"in_features: expected a positive int \(>= 1\), got 0", 0, 4, 4)
row("UnfactorizedMuMoE.from_weight/1-D", FZ.UnfactorizedMuMoE.from_weight, VE, r"weight: expected a tensor \[N_1, \.\.\., N_h, I\(\+1\), O\]",
    torch.randn(4))
row("CPMuMoE/rank=0", FZ.CPMuMoE, VE, r"rank: expected a positive int \(>= 1\), got 0", 8, 8, 4, 0)
row("CPMuMoE/bias str", FZ.CPMuMoE, TE, r"bias: expected a bool, got 'yes'", 8, 8, 4, 2, "yes")
row("CPMuMoE.forward/coefficients", lambda: FZ.CPMuMoE(8, 8, 4, 2)(torch.randn(3, 8), torch.ones(3, 5)), VE,
    r"coefficients\[0\]: expected last dimension 4")
row("CPMuMoE.forward/z", lambda: FZ.CPMuMoE(8, 8, 4, 2)(torch.randn(3, 7), torch.ones(3, 4)), VE,
    r"z: expected last dimension in_features=8, got shape \(3, 7\)")
row("TRMuMoE/ranks length", FZ.TRMuMoE, VE, r"ranks: a tensor ring with 1 expert mode\(s\) needs 3 ranks", 8, 8, 4, (2, 2))
row("TRMuMoE/ranks int", FZ.TRMuMoE, TE, r"ranks: expected a sequence of 3 positive ints", 8, 8, 4, 2)
row("MuMoE/factorization", FZ.MuMoE, VE, r"factorization: expected one of", 8, 8, 4, factorization="tucker")
row("MuMoE/cp without rank", FZ.MuMoE, VE, r"rank: CP factorization needs a rank", 8, 8, 4)
row("MuMoEBlock/tr ranks", FZ.MuMoEBlock, VE, r"ranks: a tensor ring with 1 expert mode\(s\) needs 3 ranks", 8, 16, 4,
    factorization="tr", ranks=(2, 2))
row("cp_to_tensor/empty", FZ.cp_to_tensor, VE, r"factors: expected at least one \[dim, rank\] matrix", [])
row("cp_to_tensor/ranks differ", FZ.cp_to_tensor, VE, r"factors\[1\]: expected shape \[dim, 2\], got \(3, 3\)", [torch.ones(2, 2), torch.ones(3, 3)])
row("tr_to_tensor/empty", FZ.tr_to_tensor, VE, r"cores: expected at least one \[r_m, dim, r_\{m\+1\}\] core", [])
row("tr_to_tensor/ring", FZ.tr_to_tensor, VE, r"cores\[0\]: expected shape \[r, dim, r'\]", [torch.ones(2, 3, 2), torch.ones(3, 3, 2)])
row("cp_als/rank=0", FZ.cp_als, VE, r"rank: expected a positive int \(>= 1\), got 0", torch.randn(3, 4, 5), 0)
row("cp_als/1-D", FZ.cp_als, VE, r"tensor: expected a tensor with at least 2 modes", torch.randn(5), 2)
row("cp_als/nan", FZ.cp_als, VE, r"tensor: expected finite values, got 1 NaN", _nan(torch.randn(3, 4, 5)), 2)
row("dense_ffn_params/activation", FZ.dense_ffn_params, VE, r"activation: expected 'gelu' or 'swiglu', got 'relu'", 16, 32, "relu")
row("dense_ffn_params/d_model=0", FZ.dense_ffn_params, VE, r"d_model: expected a positive int \(>= 1\), got 0", 0, 32)
row("unfactorized_params/in_features", FZ.unfactorized_params, VE, r"in_features: expected a positive int \(>= 1\), got -1", -1, 8, 4)
row("cp_mumoe_params/rank=0", FZ.cp_mumoe_params, VE, r"rank: expected a positive int \(>= 1\), got 0", 8, 8, 4, 0)
row("tr_mumoe_params/ranks", FZ.tr_mumoe_params, VE, r"ranks: a tensor ring with 1 expert mode\(s\) needs 3 ranks", 8, 8, 4, (2,))
row("cp_rank_for_budget/too small", FZ.cp_rank_for_budget, VE, r"budget: 3 parameters cannot hold a CP μMoE with \(8,\) experts.*raise the budget", 3, 64, 64, 8)
row("cp_rank_for_budget/budget=0", FZ.cp_rank_for_budget, VE, r"budget: expected a positive int number of parameters, got 0", 0, 64, 64, 8)
row("tr_rank_for_budget/expert_ranks", FZ.tr_rank_for_budget, VE, r"expert_ranks: expected an int or 2 ints", 10000, 64, 64, 8,
    expert_ranks=(1, 2, 3))
row("build_mumoe_ffn/option", lambda: FZ.build_mumoe_ffn(_lm_cfg(ffn="mumoe-cp", ffn_options={"rnk": 4})), VE,
    r"ffn_options: unknown key\(s\) \['rnk'\]")

# ---- compress.quantization ----------------------------------------------------------------
row("quantize_tensor/int dtype", QU.quantize_tensor, TE, r"w: expected a floating-point tensor, got torch.int64",
    torch.ones(4, 4, dtype=torch.long), 4)
row("quantize_tensor/list", QU.quantize_tensor, TE, r"w: expected a floating-point tensor, got list", [[1.0]], 4)
row("quantize_tensor/bits=5", QU.quantize_tensor, VE, r"bits: expected one of \(2, 3, 4, 8\), got 5", W, 5)
row("quantize_tensor/bits=16", QU.quantize_tensor, VE, r"bits: expected one of \(2, 3, 4, 8\), got 16", W, 16)
row("quantize_tensor/bits=True", QU.quantize_tensor, VE, r"bits: expected one of \(2, 3, 4, 8\), got True", W, True)
row("quantize_tensor/bits=4.0", QU.quantize_tensor, VE, r"bits: expected one of \(2, 3, 4, 8\), got 4\.0", W, 4.0)
row("quantize_tensor/granularity", QU.quantize_tensor, VE, r"granularity: expected one of \('tensor', 'channel', 'group'\), got 'row'",
    W, 4, granularity="row")
row("quantize_tensor/group_size None", QU.quantize_tensor, VE, r"group_size: expected a positive int for granularity='group', got None",
    W, 4, granularity="group")
row("quantize_tensor/group_size divides", QU.quantize_tensor, VE, r"group_size: must divide the last dimension 16, got 5",
    W, 4, granularity="group", group_size=5)
row("quantize_tensor/scalar", QU.quantize_tensor, VE, r"w: expected a non-empty tensor with at least one dimension, got shape \(\)",
    torch.tensor(1.0), 4)
row("quantize_tensor/empty", QU.quantize_tensor, VE, r"w: expected a non-empty tensor", torch.empty(0, 4), 4)
row("quantize_tensor/nan", QU.quantize_tensor, VE, r"w: expected finite values, got 1 NaN and 0 inf", _nan(W), 4)
row("quantize_tensor/inf", QU.quantize_tensor, VE, r"w: expected finite values, got 0 NaN and 1 inf", _nan(W, INF), 8)
row("dequantize_tensor/groups", QU.dequantize_tensor, VE, r"scale: 3 groups do not divide 16 codes",
    torch.zeros(4, 4, dtype=torch.uint8), torch.ones(3, 1), torch.zeros(3, 1))
row("dequantize_tensor/zero shape", QU.dequantize_tensor, VE, r"zero: expected 2 zero points \(one per scale\), got 3",
    torch.zeros(4, 4, dtype=torch.uint8), torch.ones(2, 1), torch.zeros(3, 1))
row("fake_quantize/bits=1", QU.fake_quantize, VE, r"bits: expected one of \(2, 3, 4, 8\), got 1", W, 1)
row("fake_quantize/nan", QU.fake_quantize, VE, r"w: expected finite values", _nan(W), 4)
row("pack_codes/too big", QU.pack_codes, VE, r"codes: values must be < 2\*\*bits = 16, got max 200", torch.tensor([1, 200], dtype=torch.uint8), 4)
row("pack_codes/bits", QU.pack_codes, VE, r"bits: expected one of \(2, 3, 4, 8\), got 6", torch.zeros(8, dtype=torch.uint8), 6)
row("pack_codes/negative", QU.pack_codes, VE, r"codes: expected integer codes in \[0, 2\*\*bits\), got min -1", torch.tensor([-1, 2]), 4)
row("pack_codes/float", QU.pack_codes, TE, r"codes: expected an integer tensor \(uint8 codes\), got torch.float32", torch.ones(8), 4)
row("unpack_codes/length", QU.unpack_codes, VE, r"packed: expected 4 bytes for 8 codes of 4 bits, got 3", torch.zeros(3, dtype=torch.uint8), 4, 8)
row("unpack_codes/bits", QU.unpack_codes, VE, r"bits: expected one of \(2, 3, 4, 8\), got 7", torch.zeros(7, dtype=torch.uint8), 7, 8)
row("QuantizedExperts/bits list", QU.QuantizedExperts, VE, r"bits: expected an int or 4 values \(one per expert\), got 2", EXPERTS, [4, 4])
row("QuantizedExperts/bits=7", QU.QuantizedExperts, VE, r"bits: expected one of \(2, 3, 4, 8\), got 7", EXPERTS, 7)
row("QuantizedExperts/group_size", QU.QuantizedExperts, VE, r"group_size: must divide d_model=16 and d_hidden=16, got 6", EXPERTS, 4, 6)
row("QuantizedExperts/group_size=0", QU.QuantizedExperts, VE, r"group_size: expected None or a positive int, got 0", EXPERTS, 4, 0)
row("QuantizedExperts/twice", lambda q: QU.QuantizedExperts(q.blocks[0].ffn.experts, 4), TE,
    r"experts: expected dense moe_course.layers.Experts, got QuantizedExperts", QM)
row("QuantizedLinear/bits", QU.QuantizedLinear, VE, r"bits: expected one of \(2, 3, 4, 8\), got 16", nn.Linear(4, 4), 16)
row("QuantizedLinear/not linear", QU.QuantizedLinear, TE, r"linear: expected an nn.Linear, got Conv1d", nn.Conv1d(2, 2, 1), 8)
row("QuantizedEmbedding/bits", QU.QuantizedEmbedding, VE, r"bits: expected one of \(2, 3, 4, 8\), got 1", nn.Embedding(4, 4), 1)
row("QuantizedEmbedding/not embedding", QU.QuantizedEmbedding, TE, r"emb: expected an nn.Embedding, got Linear", nn.Linear(4, 4), 8)
row("quantize/bits=5", QU.quantize, VE, r"bits: expected one of \(2, 3, 4, 8\), got 5", LM, 5)
row("quantize/bits=32", QU.quantize, VE, r"bits: expected one of \(2, 3, 4, 8\)", LM, 32)
row("quantize/bits list length", QU.quantize, VE, r"bits: expected one of \(2, 3, 4, 8\), or a list of 2 entries", LM, [4])
row("quantize/bits per expert", QU.quantize, VE, r"bits\[1\]: expected an int or 4 values, got 3", LM, [4, [2, 4, 8]])
row("quantize/bits per expert value", QU.quantize, VE, r"bits\[0\]: expected one of \(2, 3, 4, 8\), got 5", LM, [[4, 4, 4, 5], 4])
row("quantize/group_size=0", QU.quantize, VE, r"group_size: expected None or a positive int, got 0", LM, 4, group_size=0)
row("quantize/group_size divides", QU.quantize, VE, r"group_size: must divide d_model=16 and d_hidden=16, got 5", LM, 4, group_size=5)
row("quantize/targets", QU.quantize, VE, r"targets: expected one of \('experts', 'all'\), got 'attention'", LM, 4, targets="attention")
row("quantize/other_bits", QU.quantize, VE, r"other_bits: expected one of \(2, 3, 4, 8\), got 16", LM, 4, targets="all", other_bits=16)
row("quantize/dense model", QU.quantize, VE, r"model: MoETransformerLM has no MoE layers \(moe_course.layers.MoELayer\) to quantize", DENSE, 4)
row("quantize/sequential", QU.quantize, VE, r"model: Sequential has no MoE layers", SEQ, 4)
row("quantize/not a model", QU.quantize, TE, r"model: expected an nn.Module, got dict", {"w": torch.ones(2)}, 4)
row("quantize/twice", QU.quantize, TE, r"model: quantize needs MoE layers with dense Experts, but MoE layer 0 was compressed by "
    r"quantize\(\) \(QuantizedExperts\); quantize last", QM, 4)
row("quantize/after lowrank", QU.quantize, TE, r"model: quantize needs MoE layers with dense Experts, but MoE layer 0 was compressed by "
    r"lowrank_experts\(\)", LRM, 4)
row("quantize/after share", QU.quantize, TE, r"was compressed by share_experts\(\) \(SharedExperts\)", SHM, 4)
row("quantize/after mc_smoe", QU.quantize, TE, r"was compressed by mc_smoe\(\) \(LowRankSparseExperts\)", MCM, 4)
row("quantize/nan weights", QU.quantize, VE, r"model: expected finite weights, but parameter 'blocks\.0\.ffn\.experts\.w_in' holds NaN or inf", NANM, 4)
row("quantize/inf router", QU.quantize, VE, r"model: expected finite weights, but parameter 'blocks\.1\.ffn\.router\.gate\.weight'", INFM, 4)
row("mixed_precision_bits/avg_bits high", QU.mixed_precision_bits, VE, r"avg_bits: expected a number in \[2, 8\], got 9", STATS, 9)
row("mixed_precision_bits/avg_bits low", QU.mixed_precision_bits, VE, r"avg_bits: expected a number in \[2, 8\], got 1", STATS, 1)
row("mixed_precision_bits/avg_bits nan", QU.mixed_precision_bits, VE, r"avg_bits: expected a number in \[2, 8\], got nan", STATS, NAN)
row("mixed_precision_bits/choices", QU.mixed_precision_bits, VE, r"choices: expected one of \(2, 3, 4, 8\), got 5", STATS, 4, (4, 5))
row("mixed_precision_bits/choices empty", QU.mixed_precision_bits, VE, r"choices: expected at least one bit width", STATS, 4, ())
row("mixed_precision_bits/stats empty", QU.mixed_precision_bits, VE, r"stats: expected routing statistics of at least one MoE layer", [], 4)
row("mixed_precision_bits/stats type", QU.mixed_precision_bits, TE,
    r"stats: expected moe_course.metrics.RoutingStats \(or per-layer stats with \.frequency\), got int", [1, 2], 4)
row("bits_per_weight/bits", QU.bits_per_weight, VE, r"bits: expected one of \(2, 3, 4, 8\), got 0", 0, 32, 64)
row("bits_per_weight/group_size", QU.bits_per_weight, VE, r"group_size: expected None or a positive int, got 0", 4, 0, 64)
row("bits_per_weight/in_features", QU.bits_per_weight, VE, r"in_features: expected an integer in \[1, inf\], got 0", 4, None, 0)

# ---- compress.pruning ---------------------------------------------------------------------
row("magnitude_mask/sparsity=1", PR.magnitude_mask, VE, r"sparsity: expected a number in \[0, 1\), got 1\.0", W, 1.0)
row("magnitude_mask/sparsity<0", PR.magnitude_mask, VE, r"sparsity: expected a number in \[0, 1\), got -0\.1", W, -0.1)
row("magnitude_mask/sparsity nan", PR.magnitude_mask, VE, r"sparsity: expected a number in \[0, 1\), got nan", W, NAN)
row("magnitude_mask/nan weight", PR.magnitude_mask, VE, r"weight: expected finite values, got 1 NaN", _nan(W), 0.5)
row("magnitude_mask/not tensor", PR.magnitude_mask, TE, r"weight: expected a torch.Tensor, got list", [1.0, 2.0], 0.5)
row("prune_magnitude/keep=1.5", PR.prune_magnitude, VE, r"keep: a fraction must be in \(0, 1\], got 1\.5", LM, 1.5)
row("prune_magnitude/keep=0.0", PR.prune_magnitude, VE, r"keep: a fraction must be in \(0, 1\], got 0\.0", LM, 0.0)
row("prune_magnitude/keep=50000", PR.prune_magnitude, VE, r"keep: expected between 1 and 4096 expert weights, got 50000", LM, 50000)
row("prune_magnitude/keep str", PR.prune_magnitude, VE, r"keep: expected an int number of expert weights or a fraction", LM, "0.5")
row("prune_magnitude/scope", PR.prune_magnitude, VE, r"scope: expected one of \('global', 'layer'\), got 'row'", LM, 0.5, scope="row")
row("prune_magnitude/dense model", PR.prune_magnitude, VE, r"model: MoETransformerLM has no MoE layers \(moe_course.layers.MoELayer\) to prune", DENSE, 0.5)
row("prune_magnitude/quantized", PR.prune_magnitude, TE, r"model: prune_magnitude needs MoE layers with dense Experts, but MoE layer 0 was "
    r"compressed by quantize\(\) \(QuantizedExperts\); quantize last: apply prune_magnitude to the model before quantizing it", QM, 0.5)
row("prune_magnitude/lowrank", PR.prune_magnitude, TE, r"prune_magnitude needs MoE layers with dense Experts.*LowRankExperts", LRM, 0.5)
row("prune_magnitude/nan", PR.prune_magnitude, VE, r"model: expected finite weights", NANM, 0.5)
row("csr_bytes/not tensor", PR.csr_bytes, VE, r"dense: expected a tensor with at least one dimension", [1, 0])
row("csr_bytes/index_bytes", PR.csr_bytes, VE, r"index_bytes: expected 2, 4 or 8, got 3", W, 3)
row("csr_bytes/value_bytes", PR.csr_bytes, VE, r"value_bytes: expected None or a positive int, got 0", W, 8, 0)
row("sparsity_report/dense model", PR.sparsity_report, VE, r"model: MoETransformerLM has no MoE layers", DENSE)
row("sparsity_report/quantized", PR.sparsity_report, TE, r"model: sparsity_report needs MoE layers with dense Experts.*quantize\(\)", QM)
row("sparsity_report/index_bytes", PR.sparsity_report, VE, r"index_bytes: expected 2, 4 or 8, got 16", LM, 16)
_logits = torch.randn(5, 4)
row("restrict_router/kept<k", PR.restrict_router, VE, r"kept: expected at least k=2 experts, got 1", _logits, [0], 2)
row("restrict_router/kept range", PR.restrict_router, VE, r"kept: expected distinct expert ids in \[0, 4\), got \[0, 9\]", _logits, [0, 9], 2)
row("restrict_router/kept duplicates", PR.restrict_router, VE, r"kept: expected distinct expert ids in \[0, 4\), got \[1, 1\]", _logits, [1, 1], 1)
row("restrict_router/k=0", PR.restrict_router, VE, r"k: expected an integer in \[1, 4\], got 0", _logits, [0, 1], 0)
row("restrict_router/logits 1-D", PR.restrict_router, VE, r"logits: expected shape \[T, num_experts\], got \(4,\)", torch.randn(4), [0, 1], 1)
row("layer_inputs/calib None", CA.layer_inputs, VE, r"calib: expected calibration data \(a training-split Dataset or batches\), got None", LM, None)
row("layer_inputs/calib empty", CA.layer_inputs, VE, r"calib: the calibration data is empty", LM, EMPTY_CAL)
row("layer_inputs/calib no tokens", CA.layer_inputs, VE, r"calib: batch 0 has no tokens", LM, NO_TOKENS_CAL)
row("layer_inputs/calib type", CA.layer_inputs, TE, r"calib: expected a datasets.Dataset, a tensor, a dict of tensors or an iterable", LM, 42)
row("layer_inputs/calib oov", CA.layer_inputs, VE, r"calib: batch 0 has token id 16; expected ids in \[0, vocab_size=11\)", LM, OOV_CAL)
row("layer_inputs/calib negative", CA.layer_inputs, VE, r"calib: batch 0 has negative token ids \(min -1\)", LM, NEG_CAL)
row("layer_inputs/dense model", CA.layer_inputs, VE, r"model: MoETransformerLM has no MoE layers", DENSE, CAL)
row("expert_frequencies/calib None", PR.expert_frequencies, VE, r"calib: expected calibration data", LM, None)
row("expert_frequencies/nan calib", PR.expert_frequencies, VE, r"calib \(batch 0\): expected finite values, got 1 NaN", CLF, NAN_CCAL)
row("naee_select/keep>E", PR.naee_select, VE, r"keep: expected an integer in \[2, 4\], got 5", LAYER, X16, 5)
row("naee_select/keep<k", PR.naee_select, VE, r"keep: expected an integer in \[2, 4\], got 1", LAYER, X16, 1)
row("naee_select/x shape", PR.naee_select, VE, r"x: expected shape \[T, d_model=16\], got \(5, 8\)", LAYER, torch.randn(5, 8), 2)
row("naee_select/x nan", PR.naee_select, VE, r"x: expected finite values", LAYER, _nan(X16), 2)
row("naee_select/max_subsets", PR.naee_select, VE, r"max_subsets: expected an integer in \[1, inf\], got 0", LAYER, X16, 2, 0)
row("prune_experts/keep=0", PR.prune_experts, VE, r"keep: expected between k=2 and num_experts=4 experts per layer, got 0", LM, 0, calib=CAL)
row("prune_experts/keep=1 (<k)", PR.prune_experts, VE, r"keep: expected between k=2 and num_experts=4 experts per layer, got 1", LM, 1, calib=CAL)
row("prune_experts/keep=10", PR.prune_experts, VE, r"keep: expected between k=2 and num_experts=4 experts per layer, got 10", LM, 10, calib=CAL)
row("prune_experts/keep=1.5", PR.prune_experts, VE, r"keep: a fraction must be in \(0, 1\], got 1\.5", LM, 1.5, calib=CAL)
row("prune_experts/keep=nan", PR.prune_experts, VE, r"keep: a fraction must be in \(0, 1\], got nan", LM, NAN, calib=CAL)
row("prune_experts/keep str", PR.prune_experts, VE, r"keep: expected an int number of experts per layer or a fraction in \(0, 1\], got '2'", LM, "2",
    calib=CAL)
row("prune_experts/method", PR.prune_experts, VE, r"method: expected one of \('frequency', 'router_prob', 'activation', 'reap', 'naee'\), got 'random'", LM, 2, calib=CAL, method="random")
row("prune_experts/calib None", PR.prune_experts, VE, r"calib: expected calibration data", LM, 2, calib=None)
row("prune_experts/calib empty", PR.prune_experts, VE, r"calib: the calibration data is empty", LM, 2, calib=EMPTY_CAL)
row("prune_experts/calib nan", PR.prune_experts, VE, r"calib \(batch 0\): expected finite values", CLF, 2, calib=NAN_CCAL)
row("prune_experts/calib oov", PR.prune_experts, VE, r"calib: batch 0 has token id 16", LM, 2, calib=OOV_CAL)
row("prune_experts/dense model", PR.prune_experts, VE, r"model: MoETransformerLM has no MoE layers .* to prune", DENSE, 2, calib=CAL)
row("prune_experts/soft moe", PR.prune_experts, TE, r"model: expert pruning needs sparse top-k MoE layers, got SoftMoE", SOFT, 2, calib=CAL)
row("prune_experts/quantized", PR.prune_experts, TE, r"model: prune_experts needs MoE layers with dense Experts.*quantize last: "
    r"apply prune_experts to the model before quantizing it", QM, 2, calib=CAL)
row("prune_experts/lowrank", PR.prune_experts, TE, r"prune_experts needs MoE layers with dense Experts.*lowrank_experts\(\)", LRM, 2, calib=CAL)
row("prune_experts/merged", PR.prune_experts, TE, r"model: prune_experts needs routers of type TopKRouter or SkippingRouter; "
    r"MoE layer 0 was merged", MGM, 2, calib=CAL)
row("prune_experts/nan weights", PR.prune_experts, VE, r"model: expected finite weights", NANM, 2, calib=CAL)
row("prune_experts/max_subsets", PR.prune_experts, VE, r"max_subsets: expected an integer in \[1, inf\], got 0", LM, 2, calib=CAL, method="naee", max_subsets=0)
row("SkippingRouter/beta<0", PR.SkippingRouter, VE, r"beta: expected a finite number in \[0, 1\], got -0\.5",
    L(lambda: layer().router), -0.5)
row("SkippingRouter/beta nan", PR.SkippingRouter, VE, r"beta: expected a finite number in \[0, 1\], got nan", L(lambda: layer().router), NAN)
row("SkippingRouter/router", PR.SkippingRouter, TE, r"router: expected a TopKRouter, got Linear", nn.Linear(4, 4), 0.5)
row("skip_experts/quantile", PR.skip_experts, VE, r"quantile: expected a number in \[0, 1\), got 1\.5", LM, calib=CAL, quantile=1.5)
row("skip_experts/k=1", PR.skip_experts, VE, r"model: skipping needs sparse MoE layers with k >= 2, got SparseMoE k=1", TOP1, calib=CAL)
row("skip_experts/capacity", PR.skip_experts, VE, r"model: skipping is implemented for layers without a capacity factor", CAPPED, calib=CAL)
row("skip_experts/calib None", PR.skip_experts, VE, r"calib: expected calibration data", LM, calib=None)
row("skip_experts/dense", PR.skip_experts, VE, r"model: MoETransformerLM has no MoE layers", DENSE, calib=CAL)
row("skip_experts/merged", PR.skip_experts, TE, r"model: skip_experts needs routers of type TopKRouter; MoE layer 0 was merged", MGM, calib=CAL)
row("skip_experts/twice", PR.skip_experts, TE, r"model: skip_experts needs routers of type TopKRouter; MoE layer 0 already skips experts", SKM, calib=CAL)
row("skip_fraction/no skipping", PR.skip_fraction, VE, r"model: no SkippingRouter found; apply skip_experts first", LM)
row("skip_fraction/dense", PR.skip_fraction, VE, r"model: MoETransformerLM has no MoE layers", DENSE)

# ---- compress.distillation ----------------------------------------------------------------
_s, _t = torch.randn(4, 10), torch.randn(4, 10)
row("kd_loss/shape", KD.kd_loss, VE, r"teacher_logits shape \(4, 9\) must match student_logits shape \(4, 10\)", _s, _t[:, :9])
row("kd_loss/temperature=0", KD.kd_loss, VE, r"temperature must be a finite number > 0, got 0", _s, _t, temperature=0)
row("kd_loss/temperature=inf", KD.kd_loss, VE, r"temperature must be a finite number > 0, got inf", _s, _t, temperature=INF)
row("kd_loss/alpha", KD.kd_loss, VE, r"alpha must be a number in \[0, 1\], got 1\.5", _s, _t, alpha=1.5)
row("kd_loss/alpha nan", KD.kd_loss, VE, r"alpha must be a number in \[0, 1\], got nan", _s, _t, alpha=NAN)
row("kd_loss/labels shape", KD.kd_loss, VE, r"labels shape \(3,\) must be student_logits shape without the last dimension", _s, _t,
    torch.zeros(3, dtype=torch.long))
row("kd_loss/1-D", KD.kd_loss, VE, r"student_logits must be \[\.\.\., num_classes\], got shape \(10,\)", _s[0], _t[0])
row("kd_loss/not tensor", KD.kd_loss, TE, r"student_logits and teacher_logits must be tensors", [1.0], _t)
row("soft_targets/temperature", KD.soft_targets, VE, r"temperature must be a finite number > 0, got -1", _s, -1)
row("soft_targets/not tensor", KD.soft_targets, TE, r"logits must be a tensor, got list", [1.0, 2.0])
row("train_student/same model", KD.train_student, VE, r"student must be a different model from teacher", LM, LM, [1])
row("train_student/alpha", KD.train_student, VE, r"alpha must be a number in \[0, 1\], got 2", CLF, LM, [1], alpha=2)
row("train_student/temperature", KD.train_student, VE, r"temperature must be a finite number > 0, got 0", CLF, LM, [1], temperature=0)
row("train_student/teacher type", KD.train_student, TE, r"teacher and student must be torch.nn.Module instances", LM, "lm", [1])
row("train_student/data dict", KD.train_student, VE, r"data as a dict needs a 'train' split, got keys \['test'\]", CLF, LM, {"test": [1]})
row("train_student/mismatched vocab", KD.train_student, VE, r"student: its config\.vocab_size=7 differs from the teacher's vocab_size=11", L(lambda: _build(_lm_cfg(vocab_size=7))), LM, [1])
row("make_student/no config", KD.make_student, TE, r"teacher must be a course model with a \.config, got Sequential", SEQ)
row("make_student/bad change", KD.make_student, VE, r"k must be in \[1, num_experts=1\], got 2", LM, num_experts=1)
row("make_student/unknown field", KD.make_student, VE, r"unknown LMConfig field\(s\) \['experts'\]; valid fields", LM, experts=2)
row("init_from_teacher/student", KD.init_from_teacher, TE, r"student: expected an nn.Module, got dict", {"w": 1}, LM)
row("init_from_teacher/teacher", KD.init_from_teacher, TE, r"teacher: expected an nn.Module, got NoneType", CLF, None)
row("gain_preserved/equal", KD.gain_preserved, VE, r"teacher \(1\.0\) equals baseline \(1\.0\): there is no gain to preserve", 0.5, 1.0, 1.0)
row("gain_preserved/nan", KD.gain_preserved, VE, r"student must be a finite number, got nan", NAN, 1.0, 2.0)
row("gain_preserved/str", KD.gain_preserved, VE, r"baseline must be a finite number, got '1'", 0.5, "1", 2.0)

# ---- compress.lowrank ---------------------------------------------------------------------
row("truncated_svd/rank too big", LR.truncated_svd, VE, r"rank: expected an integer in \[0, min\(m, n\) = 8\], got 9", W, 9)
row("truncated_svd/rank<0", LR.truncated_svd, VE, r"rank: expected an integer in \[0, min\(m, n\) = 8\], got -1", W, -1)
row("truncated_svd/rank float", LR.truncated_svd, VE, r"rank: expected an integer in \[0, min\(m, n\) = 8\], got 2\.0", W, 2.0)
row("truncated_svd/1-D", LR.truncated_svd, VE, r"w: expected a floating-point tensor with at least 2 dimensions, got \(16,\)", W[0], 1)
row("truncated_svd/int", LR.truncated_svd, VE, r"w: expected a floating-point tensor with at least 2 dimensions",
    torch.ones(3, 3, dtype=torch.long), 1)
row("truncated_svd/nan", LR.truncated_svd, VE, r"w: expected finite values, got 1 NaN", _nan(W), 2)
row("truncated_svd/inf", LR.truncated_svd, VE, r"w: expected finite values, got 0 NaN and 1 inf", _nan(W, -INF), 2)
row("rank_for_energy/energy=0", LR.rank_for_energy, VE, r"energy: expected a number in \(0, 1\], got 0", torch.ones(4), 0)
row("rank_for_energy/energy=95", LR.rank_for_energy, VE, r"energy: expected a number in \(0, 1\], got 95", torch.ones(4), 95)
row("rank_for_energy/energy nan", LR.rank_for_energy, VE, r"energy: expected a number in \(0, 1\], got nan", torch.ones(4), NAN)
row("rank_for_energy/empty", LR.rank_for_energy, VE, r"singular_values: expected at least one value", torch.ones(0), 0.9)
row("rank_for_energy/nan", LR.rank_for_energy, VE, r"singular_values: expected finite values", _nan(torch.ones(4)), 0.9)
row("rank_for_energy/negative", LR.rank_for_energy, VE, r"singular_values: expected values >= 0", torch.tensor([2.0, -1.0]), 0.9)
row("LowRankExperts/rank=0", LR.LowRankExperts, VE, r"rank: expected an integer in \[1, 16\], got 0", EXPERTS, 0)
row("LowRankExperts/rank=17", LR.LowRankExperts, VE, r"rank: expected an integer in \[1, 16\], got 17", EXPERTS, 17)
row("LowRankExperts/init", LR.LowRankExperts, VE, r"init: expected 'svd' or 'random', got 'zeros'", EXPERTS, 2, init="zeros")
row("LowRankExperts/ranks dict", LR.LowRankExperts, VE, r"ranks: expected 4 ranks for 'in', got 2", EXPERTS, {"in": [2, 2], "out": [2] * 4})
row("LowRankExperts/ranks missing", LR.LowRankExperts, VE, r"ranks: expected an int or a dict with keys \('in', 'out'\), got keys \['in'\]",
    EXPERTS, {"in": [2] * 4})
row("LowRankExperts/not experts", LR.LowRankExperts, TE, r"experts: expected a moe_course.layers.Experts, got Linear", nn.Linear(4, 4), 2)
row("SharedExperts/rank<0", LR.SharedExperts, VE, r"rank: expected an integer in \[0, 16\], got -1", EXPERTS, -1)
row("SharedExperts/rank too big", LR.SharedExperts, VE, r"rank: expected an integer in \[0, 16\], got 40", EXPERTS, 40)
row("SharedExperts/shared names", LR.SharedExperts, VE, r"shared: expected names from \('in', 'gate', 'out'\), got \['w_in'\]",
    EXPERTS, 1, ("w_in",))
row("lowrank_experts/keep None", LR.lowrank_experts, VE, r"keep: expected a rank in \[1, min\(d_model, d_hidden\) = 16\] \(an int\) "
    r"or a fraction of the energy in \(0, 1\], got None", LM, None)
row("lowrank_experts/rank big", LR.lowrank_experts, VE, r"keep: expected a rank in \[1, min\(d_model, d_hidden\) = 16\].*got 32", LM, 32)
row("lowrank_experts/rank 0", LR.lowrank_experts, VE, r"keep: expected a rank in \[1, min\(d_model, d_hidden\) = 16\].*got 0", LM, 0)
row("lowrank_experts/energy 1.5", LR.lowrank_experts, VE, r"keep: .*a fraction of the energy in \(0, 1\], got 1\.5", LM, 1.5)
row("lowrank_experts/init", LR.lowrank_experts, VE, r"init: expected 'svd' or 'random', got 'normal'", LM, 2, init="normal")
row("lowrank_experts/dense", LR.lowrank_experts, VE, r"model: MoETransformerLM has no MoE layers .* to factorize", DENSE, 2)
row("lowrank_experts/quantized", LR.lowrank_experts, TE, r"model: lowrank_experts needs MoE layers with dense Experts.*quantize last: "
    r"apply lowrank_experts to the model before quantizing it", QM, 2)
row("lowrank_experts/twice", LR.lowrank_experts, TE, r"lowrank_experts needs MoE layers with dense Experts, but MoE layer 0 was compressed "
    r"by lowrank_experts\(\)", LRM, 2)
row("lowrank_experts/nan", LR.lowrank_experts, VE, r"model: expected finite weights", NANM, 2)
row("share_experts/keep<0", LR.share_experts, VE, r"keep: expected a rank in \[0, min\(d_model, d_hidden\) = 16\] \(an int\), got -1", LM, -1)
row("share_experts/mode", LR.share_experts, VE, r"mode: expected one of \('all', 'first_layer'\), got 'second_layer'", LM, 1, mode="second_layer")
row("share_experts/quantized", LR.share_experts, TE, r"model: share_experts needs MoE layers with dense Experts.*quantize last", QM, 1)
row("share_experts/lowrank", LR.share_experts, TE, r"share_experts needs MoE layers with dense Experts.*lowrank_experts", LRM, 1)
row("share_experts/nan", LR.share_experts, VE, r"model: expected finite weights", NANM, 1)
row("singular_values/dense", LR.singular_values, VE, r"model: MoETransformerLM has no MoE layers", DENSE)

# ---- compress.merging ---------------------------------------------------------------------
_wi, _wo = torch.randn(16, 8), torch.randn(8, 16)
row("match_neurons/shape", MG.match_neurons, VE, r"w_in, w_out: expected the reference's shapes \(16, 8\), \(8, 16\)", _wi, _wo, _wi[:, :4], _wo)
row("match_neurons/gate", MG.match_neurons, VE, r"w_gate: give a gate for both the reference and the expert, or for neither",
    _wi, _wo, _wi, _wo, ref_gate=_wi)
row("match_neurons/nan", MG.match_neurons, VE, r"w_in: expected finite values", _wi, _wo, _nan(_wi), _wo)
row("permute_expert/perm length", MG.permute_expert, VE, r"perm: expected a permutation of range\(16\), got shape \(3,\)",
    L(lambda: copy.deepcopy(experts())), 0, torch.arange(3))
row("permute_expert/not a permutation", MG.permute_expert, VE, r"perm: expected a permutation of range\(16\)",
    L(lambda: copy.deepcopy(experts())), 0, torch.zeros(16, dtype=torch.long))
row("permute_expert/i", MG.permute_expert, IndexError, r"i: expected an expert index in \[0, 4\), got 4", L(lambda: copy.deepcopy(experts())),
    4, torch.arange(16))
row("permute_expert/quantized", MG.permute_expert, TE, r"experts: expected dense moe_course.layers.Experts, got QuantizedExperts",
    L(lambda: quantized().blocks[0].ffn.experts), 0, torch.arange(16))
row("align_experts/dense", MG.align_experts, VE, r"model: MoETransformerLM has no MoE layers .* to align", DENSE)
row("align_experts/quantized", MG.align_experts, TE, r"model: align needs sparse top-k MoE layers with dense Experts and a plain TopKRouter "
    r"\(apply it before other compressions\), got SparseMoE with QuantizedExperts", QM)
row("align_experts/calib empty", MG.align_experts, VE, r"calib: the calibration data is empty", LM, calib=EMPTY_CAL)
row("frequency_weighted_merge/count", MG.frequency_weighted_merge, VE, r"freqs: expected 3 frequencies, got 2", torch.randn(3, 4), [0.5, 0.5])
row("frequency_weighted_merge/negative", MG.frequency_weighted_merge, VE, r"freqs: frequencies must be >= 0", torch.randn(2, 4), [0.5, -0.5])
row("frequency_weighted_merge/nan freqs", MG.frequency_weighted_merge, VE, r"freqs: expected finite values", torch.randn(2, 4), [NAN, 0.5])
row("frequency_weighted_merge/nan weights", MG.frequency_weighted_merge, VE, r"weights: expected finite values", _nan(torch.randn(2, 4)),
    [0.5, 0.5])
row("expert_similarity/name", MG.expert_similarity, VE, r"similarity: expected one of \('router-logits', 'expert-outputs', 'weights'\), "
    r"got 'cosine'", LAYER, X16, "cosine")
row("expert_similarity/x", MG.expert_similarity, VE, r"x: expected shape \[T, d_model=16\], got \(5, 3\)", LAYER, torch.randn(5, 3))
row("MergedRouter/slot_to_group shape", MG.MergedRouter, VE, r"slot_to_group: expected 4 entries, got shape \(3,\)",
    L(lambda: layer().router), torch.tensor([0, 1, 1]))
row("MergedRouter/slot_to_group gaps", MG.MergedRouter, VE, r"slot_to_group: expected group ids 0\.\.G-1 each used at least once, got \[0, 2, 2, 3\]",
    L(lambda: layer().router), torch.tensor([0, 2, 2, 3]))
row("merge_experts/keep=1", MG.merge_experts, VE, r"keep: expected between k=2 and num_experts=4 merged experts per layer, got 1",
    LM, 1, calib=CAL)
row("merge_experts/keep=9", MG.merge_experts, VE, r"keep: expected between k=2 and num_experts=4 merged experts per layer, got 9",
    LM, 9, calib=CAL)
row("merge_experts/keep=2.5", MG.merge_experts, VE, r"keep: a fraction must be in \(0, 1\], got 2\.5", LM, 2.5, calib=CAL)
row("merge_experts/keep=0.25", MG.merge_experts, VE, r"keep: expected between k=2 and num_experts=4 merged experts per layer, "
    r"got 0\.25 -> 1", LM, 0.25, calib=CAL)
row("merge_experts/keep list", MG.merge_experts, VE, r"keep: expected one value per MoE layer \(2\), got 3", LM, [2, 2, 2], calib=CAL)
row("merge_experts/similarity", MG.merge_experts, VE, r"similarity: expected one of", LM, 2, calib=CAL, similarity="l2")
row("merge_experts/weighting", MG.merge_experts, VE, r"weighting: expected one of \('frequency', 'uniform'\), got 'mean'", LM, 2, calib=CAL, weighting="mean")
row("merge_experts/scope", MG.merge_experts, VE, r"scope: expected one of", LM, 2, calib=CAL, scope="model")
row("merge_experts/global list", MG.merge_experts, VE, r"keep: with scope='global' expected one total", LM, [2, 2],
    calib=CAL, scope="global")
row("merge_experts/calib None", MG.merge_experts, VE, r"calib: expected calibration data", LM, 2, calib=None)
row("merge_experts/calib empty", MG.merge_experts, VE, r"calib: the calibration data is empty", LM, 2, calib=EMPTY_CAL)
row("merge_experts/calib nan", MG.merge_experts, VE, r"calib \(batch 0\): expected finite values", CLF, 2, calib=NAN_CCAL)
row("merge_experts/dense", MG.merge_experts, VE, r"model: MoETransformerLM has no MoE layers .* to merge", DENSE, 2, calib=CAL)
row("merge_experts/soft", MG.merge_experts, TE, r"model: merge needs sparse top-k MoE layers", SOFT, 2, calib=CAL)
row("merge_experts/quantized", MG.merge_experts, TE, r"model: merge needs sparse top-k MoE layers with dense Experts .*QuantizedExperts", QM, 2, calib=CAL)
row("merge_experts/twice", MG.merge_experts, TE, r"model: merge needs .* a plain TopKRouter .*MergedRouter", MGM, 2, calib=CAL)
row("merge_experts/skipping", MG.merge_experts, TE, r"model: merge needs .* a plain TopKRouter .*SkippingRouter", SKM, 2, calib=CAL)
row("merge_experts/nan weights", MG.merge_experts, VE, r"model: expected finite weights", NANM, 2, calib=CAL)
row("hc_smoe/keep", MG.hc_smoe, VE, r"keep: expected between k=2 and num_experts=4 merged experts per layer, got 0", LM, 0, calib=CAL)
row("hc_smoe/quantized", MG.hc_smoe, TE, r"model: merge needs sparse top-k MoE layers with dense Experts", QM, 2, calib=CAL)
row("hc_smoe/calib None", MG.hc_smoe, VE, r"calib: expected calibration data", LM, 2, calib=None)
row("hc_smoe/nan weights", MG.hc_smoe, VE, r"model: expected finite weights", NANM, 2, calib=CAL)
row("LowRankSparseExperts/keep_sparse", MG.LowRankSparseExperts, VE, r"keep_sparse: expected a number in \[0, 1\), got 1", EXPERTS, 2, 1)
row("LowRankSparseExperts/rank", MG.LowRankSparseExperts, VE, r"rank: expected an integer in \[0, min\(m, n\) = 16\], got 20", EXPERTS, 20, 0.1)
row("mc_smoe/rank=0", MG.mc_smoe, VE, r"rank: expected an integer in \[1, 16\], got 0", LM, 2, calib=CAL, rank=0, keep_sparse=0.1)
row("mc_smoe/keep_sparse", MG.mc_smoe, VE, r"keep_sparse: expected a number in \[0, 1\), got 1\.5", LM, 2, calib=CAL, rank=2, keep_sparse=1.5)
row("mc_smoe/keep", MG.mc_smoe, VE, r"keep: expected between k=2 and num_experts=4 merged experts per layer, got 5", LM, 5,
    calib=CAL, rank=2, keep_sparse=0.1)
row("mc_smoe/quantized", MG.mc_smoe, TE, r"model: merge needs sparse top-k MoE layers with dense Experts", QM, 2, calib=CAL, rank=2, keep_sparse=0.1)
row("mc_smoe/calib None", MG.mc_smoe, VE, r"calib: expected calibration data", LM, 2, calib=None, rank=2, keep_sparse=0.1)
row("stable_rank/1-D", MG.stable_rank, VE, r"w: expected a floating-point tensor with at least 2 dimensions, got \(16,\)", W[0])
row("stable_rank/nan", MG.stable_rank, VE, r"w: expected finite values", _nan(W))
row("expert_stable_ranks/name", MG.expert_stable_ranks, VE, r"name: expected one of \('in', 'gate', 'out'\), got 'w_in'", LM, "w_in")
row("expert_stable_ranks/no gate", MG.expert_stable_ranks, VE, r"name: the experts have no 'gate' matrix", LM, "gate")
row("expert_stable_ranks/dense", MG.expert_stable_ranks, VE, r"model: MoETransformerLM has no MoE layers", DENSE)

# ---- compress.trimming --------------------------------------------------------------------
row("residual_similarity/shape", TM.residual_similarity, VE, r"out: expected the shape of h \(5, 16\), got \(5, 8\)", X16, torch.randn(5, 8))
row("residual_similarity/nan", TM.residual_similarity, VE, r"h: expected finite values", _nan(X16), X16)
row("block_similarity/shape", TM.block_similarity, VE, r"h_out: expected the shape of h_in \(5, 16\), got \(4, 16\)", X16, X16[:4])
row("block_similarity/nan", TM.block_similarity, VE, r"h_out: expected finite values", X16, _nan(X16, INF))
row("best_contiguous_run/n=0", TM.best_contiguous_run, VE, r"n: expected an int in \[1, 2\], got 0", [X16, X16, X16], 0)
row("best_contiguous_run/n>L", TM.best_contiguous_run, VE, r"n: expected an int in \[1, 2\], got 3", [X16, X16, X16], 3)
row("expert_scores/calib None", TM.expert_scores, VE, r"calib: expected calibration data", LM, None)
row("expert_scores/dense", TM.expert_scores, VE, r"model: MoETransformerLM has no MoE layers .* to score", DENSE, CAL)
row("drop_experts/keep=0", TM.drop_experts, VE, r"keep: expected between k=2 and num_experts=4 experts per layer, got 0", LM, 0, calib=CAL)
row("drop_experts/keep=5", TM.drop_experts, VE, r"keep: expected between k=2 and num_experts=4 experts per layer, got 5", LM, 5, calib=CAL)
row("drop_experts/keep global", TM.drop_experts, VE, r"keep: expected between 4 \(k per layer\) and 8 experts in total over all layers, got 3", LM, 3, calib=CAL, scope="global")
row("drop_experts/keep=2.0", TM.drop_experts, VE, r"keep: a fraction must be in \(0, 1\], got 2\.0", LM, 2.0, calib=CAL)
row("drop_experts/scope", TM.drop_experts, VE, r"scope: expected one of \('layer', 'global'\), got 'model'", LM, 2, calib=CAL, scope="model")
row("drop_experts/calib None", TM.drop_experts, VE, r"calib: expected calibration data", LM, 2, calib=None)
row("drop_experts/calib empty", TM.drop_experts, VE, r"calib: the calibration data is empty", LM, 2, calib=EMPTY_CAL)
row("drop_experts/dense", TM.drop_experts, VE, r"model: MoETransformerLM has no MoE layers .* to trim", DENSE, 2, calib=CAL)
row("drop_experts/soft", TM.drop_experts, TE, r"model: expert drop needs sparse top-k MoE layers, got SoftMoE", SOFT, 2, calib=CAL)
row("drop_experts/quantized", TM.drop_experts, TE, r"model: drop_experts needs MoE layers with dense Experts.*quantize last", QM, 2, calib=CAL)
row("drop_experts/merged", TM.drop_experts, TE, r"model: drop_experts needs routers of type TopKRouter or SkippingRouter; MoE layer 0 was merged", MGM, 2, calib=CAL)
row("drop_experts/nan weights", TM.drop_experts, VE, r"model: expected finite weights", NANM, 2, calib=CAL)
row("layer_similarities/dense", TM.layer_similarities, VE, r"model: MoETransformerLM has no MoE layers", DENSE, CAL)
row("layer_similarities/calib empty", TM.layer_similarities, VE, r"calib: the calibration data is empty", LM, EMPTY_CAL)
row("layer_similarities/calib oov", TM.layer_similarities, VE, r"calib: batch 0 has token id 16", LM, OOV_CAL)
row("Skipped/index", TM.Skipped, VE, r"index: expected an integer in \[0, inf\], got -1", -1)
row("drop_layers/keep=0", TM.drop_layers, VE, r"keep: expected between 1 and 2 MoE layers, got 0", LM, 0, calib=CAL)
row("drop_layers/keep>L", TM.drop_layers, VE, r"keep: expected between 1 and 2 MoE layers, got 3", LM, 3, calib=CAL)
row("drop_layers/keep=1.5", TM.drop_layers, VE, r"keep: a fraction must be in \(0, 1\], got 1\.5", LM, 1.5, calib=CAL)
row("drop_layers/dense", TM.drop_layers, VE, r"model: MoETransformerLM has no MoE layers .* to trim", DENSE, 1, calib=CAL)
row("drop_layers/no blocks", TM.drop_layers, TE, r"model: expected a model with \.blocks", L(lambda: nn.Sequential(layer())), 1, calib=CAL)
row("drop_layers/calib None", TM.drop_layers, VE, r"calib: expected calibration data", LM, 1, calib=None)
row("block_hidden_states/no blocks", TM.block_hidden_states, TE, r"model: expected a model with \.blocks", SEQ, CAL)
row("block_hidden_states/calib None", TM.block_hidden_states, VE, r"calib: expected calibration data", LM, None)
row("drop_blocks/keep=0", TM.drop_blocks, VE, r"keep: expected between 1 and 2 blocks, got 0", LM, 0, calib=CAL)
row("drop_blocks/keep str", TM.drop_blocks, VE, r"keep: expected an int number of blocks or a fraction in \(0, 1\], got '1'", LM, "1", calib=CAL)
row("drop_blocks/dense", TM.drop_blocks, VE, r"model: MoETransformerLM has no MoE layers .* to trim", DENSE, 1, calib=CAL)
row("drop_blocks/calib empty", TM.drop_blocks, VE, r"calib: the calibration data is empty", LM, 1, calib=EMPTY_CAL)
row("drop_blocks/calib no tokens", TM.drop_blocks, VE, r"calib: batch 0 has no tokens", LM, 1, calib=NO_TOKENS_CAL)


# ---- inplace=True: a failing call must not leave a half-compressed model behind ------------
FRESH = L(lambda: copy.deepcopy(lm()))
row("quantize/inplace bits[1]", QU.quantize, VE, r"bits\[1\]: expected one of \(2, 3, 4, 8\), got 5", FRESH, [4, 5], inplace=True)
row("quantize/inplace group_size", QU.quantize, VE, r"group_size: must divide d_model=16", FRESH, 4, group_size=3, inplace=True)
row("prune_magnitude/inplace quantized", PR.prune_magnitude, TE, r"quantize last", L(lambda: copy.deepcopy(quantized())), 0.5, inplace=True)
row("prune_experts/inplace nan calib", PR.prune_experts, VE, r"calib \(batch 0\): expected finite values", L(lambda: copy.deepcopy(clf())), 2, calib=NAN_CCAL, inplace=True)
row("prune_experts/inplace keep", PR.prune_experts, VE, r"keep: expected between k=2 and num_experts=4", FRESH, 5, calib=CAL, inplace=True)
row("skip_experts/inplace twice", PR.skip_experts, TE, r"already skips experts", L(lambda: copy.deepcopy(skipping())), calib=CAL, inplace=True)
row("merge_experts/inplace keep[1]", MG.merge_experts, VE, r"keep\[1\]: expected between k=2 and num_experts=4 merged experts "
    r"per layer, got 9", FRESH, [2, 9], calib=CAL, inplace=True)
row("hc_smoe/inplace keep[1]", MG.hc_smoe, VE, r"keep\[1\]: expected between k=2 and num_experts=4 merged experts per layer, "
    r"got 1", FRESH, [3, 1], calib=CAL, inplace=True)
row("mc_smoe/inplace keep_sparse", MG.mc_smoe, VE, r"keep_sparse: expected a number in \[0, 1\), got 1\.5", FRESH, 2, calib=CAL,
    rank=2, keep_sparse=1.5, inplace=True)
row("mc_smoe/inplace similarity", MG.mc_smoe, VE, r"similarity: expected one of", FRESH, 2, calib=CAL, rank=2, keep_sparse=0.1, inplace=True, similarity="l1")
row("align_experts/inplace quantized", MG.align_experts, TE, r"apply it before other compressions", L(lambda: copy.deepcopy(quantized())), inplace=True)
row("lowrank_experts/inplace quantized", LR.lowrank_experts, TE, r"quantize last", L(lambda: copy.deepcopy(quantized())), 2, inplace=True)
row("share_experts/inplace keep", LR.share_experts, VE, r"keep: expected a rank in \[0, min\(d_model, d_hidden\) = 16\] \(an int\), got 99",
    FRESH, 99, inplace=True)
row("drop_experts/inplace merged", TM.drop_experts, TE, r"was merged", L(lambda: copy.deepcopy(merged())), 2, calib=CAL, inplace=True)
row("drop_layers/inplace keep", TM.drop_layers, VE, r"keep: expected between 1 and 2 MoE layers, got 0", FRESH, 0, calib=CAL, inplace=True)
row("drop_blocks/inplace calib", TM.drop_blocks, VE, r"calib: batch 0 has token id 16", FRESH, 1, calib=OOV_CAL, inplace=True)

# ---- more calibration mistakes ------------------------------------------------------------
row("prune_experts/calib DatasetDict", PR.prune_experts, TE, r"calib: got a DatasetDict with splits \['train'\]; pass one split", LM, 2, calib=L(lambda: _dataset_dict()))
row("prune_experts/calib float ids", PR.prune_experts, TE, r"input_ids must be an integer tensor, got torch.float32", LM, 2, calib={"input_ids": torch.zeros(2, 9)})
row("merge_experts/calib str", MG.merge_experts, TE, r"calib: expected a datasets.Dataset, a tensor, a dict of tensors or an iterable", LM, 2, calib="shakespeare")
row("drop_blocks/calib nan", TM.drop_blocks, VE, r"calib \(batch 0\): expected finite values", CLF, 1.0, calib=NAN_CCAL)
row("expert_scores/calib inf", TM.expert_scores, VE, r"calib \(batch 0\): expected finite values, got 0 NaN and 1 inf", CLF,
    L(lambda: {"x": _nan(clf_calib()["x"], INF)}))
row("skip_experts/calib wrong width", PR.skip_experts, VE, r"x: expected shape \[B, input_length=40\], got \(8, 30\)", CLF, calib={"x": torch.randn(8, 30)})


@cache
def _dataset_dict():
    import datasets

    return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": [[1] * 9, [2] * 9]})})


# ---- compress.recipes (pipeline) ----------------------------------------------------------
if RC is not None:
    row("pipeline/model", RC.pipeline, TE, r"model: expected an nn.Module, got str", "lm", [])
    row("pipeline/steps str", RC.pipeline, TE, r"steps: expected a list of \(name, kwargs\) pairs or callables, got str", LM, "quantize")
    row("pipeline/unknown step", RC.pipeline, VE, r"steps\[0\]: unknown step 'quantise'; allowed names: prune, ", LM, [("quantise", {"bits": 4})])
    row("pipeline/bad pair", RC.pipeline, VE, r"steps\[0\]: expected a \(name, kwargs\) pair or a callable", LM, [("quantize", 4, 32)])
    row("pipeline/unknown keyword", RC.pipeline, VE, r"steps\[0\] \(quantize\): unexpected keyword\(s\) \['bit'\]; allowed: ",
        LM, [("quantize", {"bit": 4})])
    row("pipeline/owned keyword", RC.pipeline, VE, r"steps\[0\] \(quantize\): unexpected keyword\(s\) \['inplace'\]",
        LM, [("quantize", {"bits": 4, "inplace": True})])
    row("pipeline/missing keyword", RC.pipeline, VE, r"steps\[0\] \(quantize\): missing required keyword\(s\) \['bits'\]",
        LM, [("quantize", {})])
    row("pipeline/lowrank missing", RC.pipeline, VE, r"steps\[0\] \(lowrank\): missing required keyword\(s\) \['keep'\]",
        LM, [("lowrank", {})])
    row("pipeline/kwargs type", RC.pipeline, VE, r"steps\[0\] \(quantize\): kwargs must be a dict, got int", LM, [("quantize", 4)])
    row("pipeline/needs calib", RC.pipeline, VE, r"steps\[0\] \(merge\): needs calibration data: pass calib=", LM,
        [("merge", {"keep": 2})])
    row("pipeline/bits=5", RC.pipeline, VE, r"steps\[0\] \(quantize\): bits must be one of \(2, 3, 4, 8\), got 5", LM,
        [("quantize", {"bits": 5})])
    row("pipeline/keep=0", RC.pipeline, VE, r"steps\[0\] \(lowrank\): keep must be >= 1, got 0", LM, [("lowrank", {"keep": 0})])
    row("pipeline/quantize then lowrank", RC.pipeline, VE, r"steps\[1\] \(lowrank\): needs plain experts, but steps\[0\] \(quantize\) "
        r"already stored them in a compressed form; put 'lowrank' before it", LM, [("quantize", {"bits": 4}), ("lowrank", {"keep": 2})])
    row("pipeline/quantize twice", RC.pipeline, VE, r"steps\[1\] \(quantize\): needs plain experts, but steps\[0\] \(quantize\)", LM,
        [("quantize", {"bits": 8}), ("quantize", {"bits": 4})])
    row("pipeline/quantize then merge", RC.pipeline, VE, r"steps\[1\] \(merge\): needs plain experts", LM,
        [("quantize", {"bits": 8}), ("merge", {"keep": 2})], calib=CAL)
    row("pipeline/merge then prune", RC.pipeline, TE, r"steps\[1\] \(prune\): model: prune_experts needs routers of type TopKRouter or "
        r"SkippingRouter; MoE layer 0 was merged", LM, [("merge", {"keep": 3}), ("prune", {"keep": 2})], calib=CAL)
    row("pipeline/dense model", RC.pipeline, VE, r"steps\[0\] \(quantize\): model: MoETransformerLM has no MoE layers", DENSE,
        [("quantize", {"bits": 4})])
    row("pipeline/keep too big", RC.pipeline, VE, r"steps\[0\] \(merge\): keep: expected between k=2 and "
        r"num_experts=4 merged experts per layer, got 9", LM, [("merge", {"keep": 9})], calib=CAL)
    row("pipeline/evaluate", RC.pipeline, TE, r"evaluate: expected a callable model -> float, got float", LM, [], evaluate=0.5)
    row("pipeline/callable returns None", RC.pipeline, TE, r"steps\[0\] \(callable\): returned NoneType, expected an nn.Module",
        LM, [lambda m: None])
    # A step that fails at run time (merge checks keep against the model only when it runs)
    # after an earlier step succeeded: with inplace=True the model must come back unchanged.
    row("pipeline/inplace half-applied", RC.pipeline, VE, r"steps\[1\] \(merge\): keep", L(lambda: copy.deepcopy(lm())),
        [("drop_layers", {"keep": 1}), ("merge", {"keep": 9})], calib=CAL, inplace=True)
    row("quantize_rest/bits", QU.quantize_rest, VE, r"bits: expected one of \(2, 3, 4, 8\), got 5", LM, 5)
    row("quantize_rest/embedding_bits", QU.quantize_rest, VE, r"embedding_bits: expected one of \(2, 3, 4, 8\), got 16", LM, embedding_bits=16)
    row("quantize_rest/group_size", QU.quantize_rest, VE, r"group_size: expected None or a positive int, got 0", LM, group_size=0)
    row("quantize_rest/dense", QU.quantize_rest, VE, r"model: MoETransformerLM has no MoE layers", DENSE)
    row("quantize_rest/nan inplace", QU.quantize_rest, VE, r"model: expected finite weights", L(lambda: _nan_param(copy.deepcopy(lm()), "blocks.1.mixer.qkv.weight")), inplace=True)
    row("describe_step/unknown", RC.describe_step, VE, r"step: unknown step 'quantise'; allowed names", ("quantise", {}))
    row("pareto_frontier/dict", RC.pareto_frontier, TE, r"points: expected a list of dicts, got dict", {"bytes": 1})
    row("pareto_frontier/item", RC.pareto_frontier, TE, r"points\[1\]: expected a dict, got int", [{"bytes": 1, "quality": 1.0}, 3])
    row("pareto_frontier/x", RC.pareto_frontier, TE, r"x, y: expected the names \(str\) of two keys", [], x=0)
    row("pareto_frontier/higher_is_better", RC.pareto_frontier, TE, r"higher_is_better: expected a bool, got 'yes'", [],
        higher_is_better="yes")
    row("compression_table/model_name", CT.compression_table, VE, r"model_name: expected one of \('shakespeare-moe', 'mnist1d-moe', 'digits-moe'\), "
        r"got 'gpt2'", "gpt2")
    row("compression_table/quick", CT.compression_table, TE, r"quick: expected a bool, got 'yes'", "mnist1d-moe", quick="yes")
    row("compression_table/serving", CT.compression_table, TE, r"serving: expected a bool, got 'yes'", "mnist1d-moe",
        serving="yes")
    row("compression_table/decode_tokens", CT.compression_table, VE, r"decode_tokens: expected a positive int, got 0",
        "mnist1d-moe", decode_tokens=0)


def _nan_param(model: nn.Module, name: str) -> nn.Module:
    with torch.no_grad():
        model.get_parameter(name).view(-1)[0] = NAN
    return model


# ---------------------------------------------------------------------------------- the test
def _resolve(v):
    return v.fn() if isinstance(v, L) else v


def _digest(obj, h) -> None:
    if isinstance(obj, nn.Module):
        h.update(repr(obj).encode())
        for name, t in sorted(obj.state_dict().items()):
            h.update(name.encode())
            _digest(t, h)
    elif torch.is_tensor(obj):
        t = obj.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            _digest(x, h)
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            _digest(obj[k], h)


def fingerprint(args, kwargs) -> str:
    """sha256 over every module (state_dict bytes in sorted key order + structure repr) and tensor argument."""
    h = hashlib.sha256()
    _digest(list(args), h)
    _digest(kwargs, h)
    return h.hexdigest()


@pytest.mark.parametrize("r", [pytest.param(r, id=r.id, marks=r.marks) for r in ROWS])
def test_bad_input_raises_early_and_leaves_input_unchanged(r: Row, single_thread):
    args = tuple(_resolve(a) for a in r.args)
    kwargs = {k: _resolve(v) for k, v in r.kwargs.items()}
    before = fingerprint(args, kwargs)
    with pytest.raises(r.exc, match=r.match):
        r.fn(*args, **kwargs)
    assert fingerprint(args, kwargs) == before, f"{r.id}: the failing call modified its input"


def test_row_ids_are_unique_and_table_is_large():
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    assert len(ROWS) >= 150


def table_summary() -> tuple[int, int]:
    """(functions/classes covered, rows): ``python -c 'from tests.test_bad_input import *; print(table_summary())'``."""
    return len({r.id.split("/")[0] for r in ROWS}), len(ROWS)
