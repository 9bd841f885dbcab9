"""The course's compression table (chapter 11, ``moe-course table``): every technique at a
representative setting and the best combinations, measured on a zoo model.

Application code on top of the library: it trains or loads the zoo model (:mod:`moe_course.zoo`),
builds the variants with :func:`moe_course.compress.recipes.pipeline` and measures them (true bytes,
validation quality, latency).
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from moe_course import zoo
from moe_course.compress.recipes import pipeline
from moe_course.layers import moe_layers, require_moe_layers
from moe_course.metrics import generation_quality, latency, latency_race, routing_flip_rate
from moe_course.train import evaluate

__all__ = ["compression_table", "table_recipes", "TABLE_MODELS", "ROW_KEYS", "QUANT_STEPS"]

TABLE_MODELS = ("shakespeare-moe", "mnist1d-moe", "digits-moe")
ROW_KEYS = ("technique", "steps", "bytes", "ratio", "quality", "metric", "higher_is_better", "latency_ms",
            "decode_tok_s_b1", "decode_tok_s_b32", "gen_perplexity", "repetition", "sample", "flip_rate")
#: the quantization steps: a variant's flip rate compares it with the model before the first of them
QUANT_STEPS = ("quantize", "quantize_rest")


def _group_size(model: nn.Module) -> int | None:
    dims = {d for layer in moe_layers(model) for d in (layer.experts.d_model, layer.experts.d_hidden)}
    return next((g for g in (32, 16, 8) if all(d % g == 0 for d in dims)), None)


def table_recipes(model: nn.Module, quick: bool = False) -> list[tuple[str, list]]:
    """The variants of :func:`compression_table`: ``[(technique, steps), ...]`` (baseline first).

    Single techniques at a representative setting (a quarter of the experts removed or merged,
    one MoE layer or block dropped, rank half the break-even rank df/(d+f), 4 and 3 bits), then
    combinations in the spirit of He et al. (2024, trim then quantize) and MC-SMoE (Li et al., 2024).
    """
    layers = require_moe_layers(model, "compress")
    E = min(layer.num_experts for layer in layers)
    keep = max(min(layer.k for layer in layers), E - max(1, E // 4))
    g = _group_size(model)
    # Half the break-even rank: a rank-r factor of a d x f matrix stores r(d + f) numbers, so it
    # saves bytes only below r = df / (d + f); at half of that it halves the expert matrices.
    d, f = layers[0].experts.d_model, layers[0].experts.d_hidden
    rank = max(1, d * f // (d + f) // 2)
    q = lambda b, **kw: ("quantize", {"bits": b, "group_size": g, **kw})  # noqa: E731
    rest = ("quantize_rest", {"bits": 8, "group_size": g})
    rest4 = ("quantize_rest", {"bits": 4, "group_size": g, "embedding_bits": 8})
    L = len(layers)
    # one MoE layer dropped (a model with a single MoE layer trims experts instead)
    trim = ("drop_layers", {"keep": L - 1}) if L > 1 else ("drop_experts", {"keep": keep})
    recipes = [
        ("baseline (fp32)", []),
        ("quantize experts", [q(4)]),
        ("quantize everything", [q(4), rest4]),
        ("expert drop", [("drop_experts", {"keep": keep})]),
        *([("layer drop", [trim])] if L > 1 else []),
        ("merge (M-SMoE)", [("merge", {"keep": keep})]),
        ("trim + quantize", [trim, q(3), rest4]),
    ]
    if quick:
        return recipes
    recipes[3:3] = [("quantize experts 3-bit", [q(3)]), ("quantize experts 2-bit", [q(2)])]
    recipes += [
        ("prune (NAEE)", [("prune", {"keep": keep, "method": "naee"})]),
        *([("block drop", [("drop_blocks", {"keep": len(model.blocks) - 1})])] if L > 1 else []),
        ("merge (HC-SMoE)", [("hc_smoe", {"keep": keep})]),
        ("MC-SMoE", [("mc_smoe", {"keep": keep, "rank": rank, "keep_sparse": 0.1})]),
        ("low-rank (SVD)", [("lowrank", {"keep": rank})]),
        ("weight sharing", [("share", {"keep": rank // 2})]),
        ("3-bit experts, 8-bit rest", [q(3), rest]),
        ("3-bit experts, 4-bit rest", [q(3), rest4]),
        ("2-bit experts, 8-bit rest", [q(2), rest]),
        ("NAEE + quantize", [("prune", {"keep": keep, "method": "naee"}), q(4), rest4]),
        ("merge + quantize", [("merge", {"keep": keep}), q(4), rest4]),
        ("trim + quantize, 8-bit rest", [trim, q(3), rest]),
        ("trim + quantize + KD", [trim, ("distill", {"steps": 40, "batch_size": 16}), q(3), rest4]),
    ]
    return recipes


def _zoo_setup(model_name: str, preset: str | None, cache_dir: Any, quick: bool,
               n_val: int | None) -> dict[str, Any]:
    if model_name not in TABLE_MODELS:
        raise ValueError(f"model_name: expected one of {TABLE_MODELS}, got {model_name!r}")
    preset = "auto" if preset is None else preset
    model = zoo.pretrained(model_name, preset=preset, cache_dir=cache_dir, progress=False).eval()
    data = zoo.data(model_name, preset=preset)
    lm = model_name == "shakespeare-moe"
    metric = "perplexity" if lm else "accuracy"
    val, train = data["validation"], data["train"]
    if n_val is None:
        n_val = (128 if lm else 500) if quick else len(val)
    val = val.select(range(min(len(val), n_val)))
    calib = train.shuffle(seed=0).select(range(min(len(train), 32 if lm else 256)))
    lat_rows = min(len(val), 16 if lm else 64)
    lat_batch = {k: v for k, v in val[:lat_rows].items()}
    return {"model": model, "metric": metric, "val": val, "calib": calib, "train": train, "lat_batch": lat_batch,
            "evaluate": lambda m: evaluate(m, val, batch_size=256)[metric], "higher_is_better": not lm,
            "lm": lm}


def _split(steps: list) -> tuple[list, list]:
    """``steps`` -> (the steps before the first quantization step, the rest)."""
    names = [s[0] if isinstance(s, tuple) else None for s in steps]
    i = next((j for j, n in enumerate(names) if n in QUANT_STEPS), len(steps))
    return list(steps[:i]), list(steps[i:])


def _decode_race(models: list[nn.Module], prompt: Any, batch: int, new_tokens: int,
                 rounds: int) -> list[float]:
    """Generated tokens per second of KV-cache greedy decoding (``generate``, temperature 0),
    ``batch`` prompts at a time, every variant timed once per round in a rotated order."""
    p = prompt[:batch]
    runs = {str(i): (lambda m=m: m.generate(p, new_tokens, temperature=0.0)) for i, m in enumerate(models)}
    race = latency_race(runs, None, rounds=rounds, warmup=0)  # the median absorbs a cold first round
    return [p.shape[0] * new_tokens / (race[str(i)].median_ms / 1e3) for i in range(len(models))]


def compression_table(model_name: str, *, preset: str | None = None, cache_dir: Any = None,
                      quick: bool = False, latency_repeats: int | None = None,
                      serving: bool = True, n_val: int | None = None,
                      decode_tokens: int = 8, decode_rounds: int = 3) -> list[dict[str, Any]]:
    """Baseline, every single technique at a representative setting and the best combinations
    (:func:`table_recipes`) on a zoo model, measured: one dict per row with the keys
    :data:`ROW_KEYS`: ``technique``, ``steps``, true ``bytes``, ``ratio`` = fp32 baseline bytes /
    bytes, ``quality``, ``metric``, ``higher_is_better``, measured ``latency_ms`` of one batch
    (best of the repeats), and what serving sees (``serving=True``; NaN or ``""`` where a column
    does not apply or ``serving=False``):

    * ``decode_tok_s_b1``, ``decode_tok_s_b32`` (language model): generated tokens per second of
      KV-cache greedy decoding (``generate`` at temperature 0, ``decode_tokens`` new tokens after
      an 8-token prompt, whose prefill is included; no warm-up round) for 1 and 32 validation prompts at a time,
      the median of ``decode_rounds`` interleaved rounds (:func:`moe_course.metrics.latency_race`).
    * ``gen_perplexity``, ``repetition``, ``sample`` (language model): the generation judge
      (:func:`moe_course.metrics.generation_quality`): 32 tokens sampled at temperature 1 and
      seed 0 after each of 8 validation prompts of 16 tokens, the fp32 model's perplexity on
      them, their share of repeated 4-grams, and the first continuation as text.
    * ``flip_rate`` (variants with quantization steps, every model): the share of tokens whose
      top-k expert set changes (:func:`moe_course.metrics.routing_flip_rate`, each model routing
      its own hidden states, mean over the MoE layers) on 32 validation blocks / 256 rows,
      against the same variant before its first quantization step (the fp32 model, or the
      trimmed fp32 model of a trim-then-quantize recipe).

    Quality is measured on the zoo model's validation split (its first ``n_val`` rows; default
    all, or with ``quick`` 128 LM blocks / 500 classifier rows, and fewer variants); calibration
    and KD recovery use the training split. ``latency_ms`` is the best (minimum) of
    ``latency_repeats`` forward passes of one validation batch (16 LM blocks of 64 tokens / 64
    MNIST-1D signals or digit images), measured round-robin over all variants so that a change in
    the machine's load hits every variant alike; the minimum is the run least disturbed by other
    processes (as ``timeit`` recommends). The single techniques follow He et al. (2024)
    (expert/layer/block drop, quantization), Li et al. (2024) (M-SMoE, MC-SMoE), Lu et al. (2024)
    (NAEE) and Chen et al. (2025) (HC-SMoE).

    Args:
        model_name: ``"shakespeare-moe"``, ``"mnist1d-moe"`` or ``"digits-moe"``.
        preset: the zoo preset (default ``"auto"``).
        cache_dir: the zoo cache directory (default: ``$MOE_COURSE_CACHE`` / the user cache).
        quick: fewer variants and a smaller evaluation set (for a fast look or CI).
        latency_repeats: timed runs per variant (default 3 with ``quick``, else 7).
        serving: measure decode speed, the generation judge and the routing flip rate.
        n_val: validation rows for ``quality`` (default: see above).
        decode_tokens: new tokens per timed ``generate`` call.
        decode_rounds: interleaved timing rounds of the decode race.
    """
    if not isinstance(model_name, str) or model_name not in TABLE_MODELS:
        raise ValueError(f"model_name: expected one of {TABLE_MODELS}, got {model_name!r}")
    if not isinstance(quick, bool):
        raise TypeError(f"quick: expected a bool, got {quick!r}")
    if not isinstance(serving, bool):
        raise TypeError(f"serving: expected a bool, got {serving!r}")
    if latency_repeats is None:
        latency_repeats = 3 if quick else 7
    for name, v in (("latency_repeats", latency_repeats), ("decode_tokens", decode_tokens),
                    ("decode_rounds", decode_rounds), ("n_val", 1 if n_val is None else n_val)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    s = _zoo_setup(model_name, preset, cache_dir, quick, n_val)
    nan = float("nan")
    rows, models, refs = [], [], []
    # the fp32 part of a recipe (the steps before its first quantization step), run once and
    # shared by the recipes that start with it; it is also the flip rate's reference
    prefixes: dict[str, tuple[nn.Module, list[str]]] = {"[]": (s["model"], [])}
    for technique, steps in table_recipes(s["model"], quick=quick):
        head, tail = _split(steps)
        key = repr(head)
        if key not in prefixes:
            pre = pipeline(s["model"], head, calib=s["calib"], train_data=s["train"])
            prefixes[key] = (pre.model, [r["step"] for r in pre.rows[1:]])
        ref, labels = prefixes[key]
        res = pipeline(ref, tail, calib=s["calib"], train_data=s["train"])
        b = int(res.final["bytes"])
        rows.append({
            "technique": technique,
            "steps": " -> ".join(labels + [r["step"] for r in res.rows[1:]]) or "none",
            "bytes": b,
            "ratio": (rows[0]["bytes"] if rows else b) / b,
            "quality": float(s["evaluate"](res.model)),
            "metric": s["metric"],
            "higher_is_better": s["higher_is_better"],
            "latency_ms": nan,
            "decode_tok_s_b1": nan, "decode_tok_s_b32": nan,
            "gen_perplexity": nan, "repetition": nan, "sample": "", "flip_rate": nan,
        })
        models.append(res.model)
        refs.append(ref if tail else None)
    times: list[list[float]] = [[] for _ in models]
    for m in models:  # warm-up
        latency(m, s["lat_batch"], repeats=1, warmup=1)
    for _ in range(latency_repeats):
        for i, m in enumerate(models):
            times[i].append(latency(m, s["lat_batch"], repeats=1, warmup=0).median_ms)
    for row, t in zip(rows, times):
        row["latency_ms"] = float(min(t))
    if not serving:
        return rows
    flip_data = s["val"].select(range(min(len(s["val"]), 32 if s["lm"] else 256)))
    for row, m, ref in zip(rows, models, refs):
        if ref is not None:
            row["flip_rate"] = float(routing_flip_rate(ref, m, flip_data).overall)
    if s["lm"]:
        import torch

        ids = torch.as_tensor(s["val"][:32]["input_ids"])
        judge_prompts = ids[:8, :16]
        for row, m in zip(rows, models):
            g = generation_quality(m, judge_prompts, reference=s["model"], new_tokens=32, seed=0)
            row.update(gen_perplexity=g.perplexity, repetition=g.repetition, sample=(g.texts or [""])[0])
        for batch, col in ((1, "decode_tok_s_b1"), (32, "decode_tok_s_b32")):
            for row, v in zip(rows, _decode_race(models, ids[:, :8], batch, decode_tokens, decode_rounds)):
                row[col] = float(v)
    return rows
