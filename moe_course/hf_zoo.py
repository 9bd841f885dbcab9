"""Real checkpoints for chapter 12: the course's Shakespeare LM as a transformers Mixtral model,
the memory a checkpoint needs computed from its config, and tiny random stand-ins of real
architectures for running the online cells offline.

* :func:`shakespeare_mixtral` trains (once, deterministically, cached next to the zoo's entries)
  a small ``transformers.MixtralForCausalLM`` with the course's character tokenizer on the same
  Shakespeare blocks as ``zoo.pretrained("shakespeare-moe")``, and loads it with
  ``from_pretrained`` afterwards. Same sizes as the zoo's ``cpu`` LM (d = 96, 4 layers, N = 8
  experts, top-2, f = 64, 64 tokens of context), but Mixtral's own blocks: RMSNorm, rotary
  positions, grouped-query attention, SwiGLU experts, the Switch balance loss.
* :func:`memory_table` counts the parameters of a config on the ``meta`` device (no weights are
  allocated or downloaded) and gives the bytes of each storage variant and whether it fits a
  GPU (a Colab T4 by default).
* :data:`CONFIGS` holds the published sizes of two real MoE checkpoints (their ``config.json``
  fields that decide the parameter count), so the chapter computes their memory offline;
  :func:`tiny_random_checkpoint` saves a tiny random model of the same architecture to disk.

Everything here needs ``transformers`` (the ``[hf]`` extra).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_course import zoo
from moe_course.hf import require_transformers

__all__ = ["shakespeare_mixtral", "mixtral_config", "memory_table", "param_counts", "CONFIGS",
           "tiny_random_checkpoint", "T4_BYTES", "HF_ZOO_VERSION"]

HF_ZOO_VERSION = 1
NAME = "shakespeare-mixtral"
TRAIN_THREADS = 1  # one thread: the same weights on every machine, and no spinning on a busy one
T4_BYTES = 15 * 2**30  # a Colab T4 has 16 GB (15 GiB visible to PyTorch after the CUDA context)

# The fields of the published config.json files that decide the parameter count (model cards
# of allenai/OLMoE-1B-7B-0125 and ibm-granite/granite-3.0-1b-a400m-base/-instruct).
CONFIGS: dict[str, dict[str, Any]] = {
    "allenai/OLMoE-1B-7B-0125": dict(
        model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
        tie_word_embeddings=False, max_position_embeddings=4096),
    "ibm-granite/granite-3.0-1b-a400m": dict(
        model_type="granitemoe", vocab_size=49155, hidden_size=1024, intermediate_size=512, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=8, num_local_experts=32, num_experts_per_tok=8,
        tie_word_embeddings=True, max_position_embeddings=4096),
}


def mixtral_config(vocab_size: int, preset: str = "cpu"):
    """The ``MixtralConfig`` of :func:`shakespeare_mixtral` (the zoo LM's sizes at ``preset``)."""
    t = require_transformers()
    lm_cfg, _ = zoo.preset_configs(preset, "shakespeare-moe")
    return t.MixtralConfig(
        vocab_size=vocab_size, hidden_size=lm_cfg.d_model, intermediate_size=lm_cfg.d_hidden,
        num_hidden_layers=lm_cfg.n_layers, num_attention_heads=lm_cfg.n_heads,
        num_key_value_heads=max(1, lm_cfg.n_heads // 2), num_local_experts=lm_cfg.num_experts,
        num_experts_per_tok=lm_cfg.k, max_position_embeddings=lm_cfg.context_length, rope_theta=10000.0,
        router_aux_loss_coef=0.01, tie_word_embeddings=False, initializer_range=0.02,
        pad_token_id=0, bos_token_id=None, eos_token_id=None)


class _Trainer(nn.Module):
    """``compute_loss`` for :func:`moe_course.train.fit`: next-character cross-entropy plus
    Mixtral's own balance loss times ``router_aux_loss_coef``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def compute_loss(self, batch):
        ids = batch["input_ids"]
        out = self.model(input_ids=ids[:, :-1], use_cache=False, output_router_logits=True)
        ce = F.cross_entropy(out.logits.flatten(0, 1).float(), ids[:, 1:].reshape(-1))
        aux = out.aux_loss if out.aux_loss is not None else ce.new_zeros(())
        loss = ce + self.model.config.router_aux_loss_coef * aux
        return loss, {"ce": float(ce.detach()), "balance": float(aux.detach())}


def _spec(preset: str) -> dict[str, Any]:
    lm_cfg, train_cfg = zoo.preset_configs(preset, "shakespeare-moe")
    return {"name": NAME, "preset": preset, "architecture": "MixtralForCausalLM",
            "lm_config": lm_cfg.to_dict(), "train_config": train_cfg.to_dict(),
            "data": zoo._data_spec("shakespeare-moe", preset, lm_cfg), "version": HF_ZOO_VERSION,
            "transformers_major": int(require_transformers().__version__.split(".")[0])}


def _entry(preset: str, cache_dir: str | os.PathLike | None) -> tuple[Path, dict[str, Any], str]:
    spec = _spec(preset)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    return zoo.cache_dir(cache_dir) / f"{NAME}-{preset}-{key[:12]}", spec, key


def _load(entry: Path, key: str) -> nn.Module | None:
    t = require_transformers()
    from moe_course.data import CharTokenizer

    try:
        info = json.loads((entry / "metadata.json").read_text())
        if info.get("key") != key or zoo._sha256(entry / "model.safetensors") != info["weights_sha256"]:
            return None
        model = t.MixtralForCausalLM.from_pretrained(entry, dtype=torch.float32)
        model.tokenizer = CharTokenizer.load(entry / "tokenizer.json")
    except Exception:  # noqa: BLE001 - any unreadable piece means: train again
        return None
    model.zoo_info = {**info, "path": str(entry), "source": "cache"}
    return model.eval()


def _train(spec: dict[str, Any], key: str, entry: Path, progress: bool) -> None:
    from moe_course.device import seed_everything
    from moe_course.train import evaluate, fit

    t = require_transformers()
    preset = spec["preset"]
    _, train_cfg = zoo.preset_configs(preset, "shakespeare-moe")
    start = time.perf_counter()
    splits, tok = zoo._build_data("shakespeare-moe", preset)
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        seed_everything(train_cfg.seed)
        model = t.MixtralForCausalLM(mixtral_config(tok.vocab_size, preset)).float()
        trainer = _Trainer(model)
        history = fit(trainer, splits["train"], splits["validation"], train_cfg, device="cpu", progress=progress)
        final = evaluate(trainer, splits["validation"], batch_size=256)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.generation_config.pad_token_id = 0
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    try:
        os.chmod(tmp, 0o755)
        model.save_pretrained(tmp)
        tok.save(tmp / "tokenizer.json")
        meta = {"name": NAME, "preset": preset, "key": key, "spec": spec, "torch_version": torch.__version__,
                "transformers_version": t.__version__, "num_threads": TRAIN_THREADS,
                "train_seconds": time.perf_counter() - start, "fit_seconds": history.wall_time,
                "num_parameters": sum(p.numel() for p in model.parameters()), "final_eval": final,
                "weights_sha256": zoo._sha256(tmp / "model.safetensors"), "run_id": uuid.uuid4().hex,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        zoo._publish(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def shakespeare_mixtral(preset: str = "cpu", cache_dir: str | os.PathLike | None = None, retrain: bool = False,
                        progress: bool = False) -> nn.Module:
    """The course's Shakespeare LM as a trained ``transformers.MixtralForCausalLM`` (fp32, eval mode).

    Trained the first time (600 steps: about two minutes on one free CPU core for
    ``preset="cpu"``; ``"test"`` is seconds) with the zoo LM's data, tokenizer, optimiser and schedule, then cached as a plain
    transformers checkpoint (``save_pretrained``) in ``<cache>/shakespeare-mixtral-<preset>-<hash>``
    and loaded with ``from_pretrained``. The model carries ``.tokenizer`` (the course's
    :class:`~moe_course.data.CharTokenizer`) and ``.zoo_info`` (training seconds, final
    validation loss and perplexity, path). Training runs on one CPU thread, so the weights are
    the same on every machine with the same library versions.
    """
    if preset not in ("cpu", "test"):
        raise ValueError(f"preset: expected 'cpu' or 'test', got {preset!r}")
    entry, spec, key = _entry(preset, cache_dir)
    if not retrain:
        model = _load(entry, key)
        if model is not None:
            return model
    with zoo._locked(entry):
        model = None if retrain else _load(entry, key)
        if model is None:
            zoo._remove_leftovers(entry)
            _train(spec, key, entry, progress)
            model = _load(entry, key)
            if model is None:
                raise RuntimeError(f"{entry} could not be read back after training")
            model.zoo_info["source"] = "trained"
    return model


# --------------------------------------------------------------------------------------------
# memory from a config
# --------------------------------------------------------------------------------------------
def _config(config: Any):
    t = require_transformers()
    if isinstance(config, str):
        config = CONFIGS[config]
    if isinstance(config, dict):
        fields = dict(config)
        return t.AutoConfig.for_model(fields.pop("model_type"), **fields)
    return config


def param_counts(config: Any) -> dict[str, int]:
    """Parameters of a model built from ``config`` (a transformers config, a dict with
    ``model_type``, or a key of :data:`CONFIGS`), counted on the ``meta`` device (nothing is
    allocated): ``experts`` (routed expert stacks), ``active_experts`` (the ``k`` of ``N`` a token
    runs), ``rest`` (everything else, once: tied embeddings count once), ``total``, ``active``."""
    t = require_transformers()
    cfg = _config(config)
    with torch.device("meta"):
        model = t.AutoModelForCausalLM.from_config(cfg)
    seen, experts, rest = set(), 0, 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if ".experts." in name:
            experts += p.numel()
        else:
            rest += p.numel()
    n = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None) or getattr(cfg, "n_routed_experts")
    active_experts = experts * int(cfg.num_experts_per_tok) // int(n)
    return {"experts": experts, "active_experts": active_experts, "rest": rest, "total": experts + rest,
            "active": active_experts + rest}


def memory_table(config: Any, gpu_bytes: int = T4_BYTES, group_size: int = 32) -> list[dict[str, Any]]:
    """Bytes of the weights of ``config`` in four storage variants, computed from the parameter
    counts (:func:`param_counts`): fp32; bf16; routed experts at 4 bits (codes plus an fp16 scale
    and a uint8 zero per ``group_size`` weights: ``4 + 24/group_size`` bits) with the rest in
    bf16; and the same with half of the experts dropped. ``fits`` says whether the weights take
    at most 80 % of ``gpu_bytes`` (the rest is left for activations, the KV cache and the CUDA
    context)."""
    c = param_counts(config)
    q4 = (4 + 24 / group_size) / 8
    rows = [("fp32", 4 * c["total"]), ("bf16", 2 * c["total"]),
            ("4-bit experts, bf16 rest", q4 * c["experts"] + 2 * c["rest"]),
            ("half the experts dropped, 4-bit, bf16 rest", q4 * c["experts"] / 2 + 2 * c["rest"])]
    return [{"variant": v, "GiB": b / 2**30, "bytes": int(b), "fits": b <= 0.8 * gpu_bytes} for v, b in rows]


def tiny_random_checkpoint(model_id: str, path: str | os.PathLike, vocab_size: int = 96, seed: int = 0) -> str:
    """Save a tiny random model of ``model_id``'s architecture (a key of :data:`CONFIGS`) to ``path``
    with ``save_pretrained`` and return ``path``: the same code path as the real checkpoint
    (``from_pretrained`` from a directory), in seconds and offline. Sizes: d = 64, 2 layers,
    8 experts of width 32, the real top-k capped at 2."""
    t = require_transformers()
    real = dict(CONFIGS[model_id])
    kind = real.pop("model_type")
    experts = "num_experts" if "num_experts" in real else "num_local_experts"
    cfg = t.AutoConfig.for_model(kind, vocab_size=vocab_size, hidden_size=64, intermediate_size=32,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=128, tie_word_embeddings=real["tie_word_embeddings"],
                                 pad_token_id=0, bos_token_id=None, eos_token_id=None,
                                 **{experts: 8, "num_experts_per_tok": 2})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = t.AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    return str(path)
