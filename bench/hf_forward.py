"""The bridged model (moe_course.hf) against transformers' own experts implementations, side by side.

    python bench/hf_forward.py                  # CPU, OLMoE shapes / 4, T = 1, 64, 4096
    python bench/hf_forward.py --quick          # fewer rounds
    python bench/hf_forward.py --device cuda --dtype bfloat16 --scale 1   # OLMoE-1B-7B layer shapes

Model: an ``OlmoeForCausalLM`` built offline from a config with OLMoE-1B-7B's expert shapes divided
by ``--scale`` (hidden 2048, expert width 1024, 64 experts, top-8 at scale 1), ``--layers`` decoder
layers, random weights (speed does not depend on the values). Variants, all in one process on the
same weights (the bridged model's experts are views of the transformers tensors):

* ``hf:eager`` / ``hf:grouped_mm`` / ``hf:batched_mm``: transformers' ``experts_implementation``
  (``batched_mm`` gathers one weight matrix per token-expert pair, so it only runs for T <= 64);
* ``course:auto`` / ``course:loop`` / ``course:grouped``: :func:`moe_course.hf.from_hf` with that
  dispatch strategy.

Two measurements per token count T: the MoE block of layer 0 alone on ``[1, T, hidden]`` (the only
code that differs) and the whole model's forward on ``T`` token ids. Rounds are interleaved
(round-robin over the variants, the order rotated every round: ``batched_mm``'s gathered weights
evict the caches and slowed whichever variant ran next by up to 25%) so machine noise hits all
alike; we print the median, the spread (min-max) and each variant's median relative to
``course:auto``.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from moe_course.metrics import timed_ms

HF = ("eager", "grouped_mm", "batched_mm")
COURSE = ("auto", "loop", "grouped")


def build(scale: int, layers: int, device: torch.device, dtype: torch.dtype):
    import transformers

    from moe_course import hf

    h, inter = 2048 // scale, 1024 // scale
    cfg = transformers.OlmoeConfig(vocab_size=4096, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                                   num_attention_heads=max(1, 16 // scale), num_key_value_heads=max(1, 16 // scale),
                                   num_experts=64, num_experts_per_tok=8, max_position_embeddings=8192,
                                   initializer_range=0.02)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    bridged = {d: hf.from_hf(model, dispatch=d) for d in COURSE}  # views: no weight is copied
    return model, bridged, cfg


def race(model, bridged, cfg, tokens: int, rounds: int, device: torch.device, dtype: torch.dtype, whole: bool):
    gen = torch.Generator().manual_seed(tokens)
    x = (torch.randn(1, tokens, cfg.hidden_size, generator=gen) * 0.5).to(device, dtype)
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), generator=gen).to(device)
    variants = {}
    for impl in HF:
        if impl == "batched_mm" and tokens > 64:
            continue

        def run(impl=impl):
            model.config._experts_implementation = impl  # the experts modules read it at every call
            if whole:
                model(input_ids=ids, use_cache=False)
            else:
                model.model.layers[0].mlp(x)
        variants[f"hf:{impl}"] = run
    for d, b in bridged.items():
        def run(b=b):
            if whole:
                b(input_ids=ids, use_cache=False)
            else:
                b.model.layers[0].mlp(x)
        variants[f"course:{d}"] = run
    times = {name: [] for name in variants}
    with torch.inference_mode():
        for fn in variants.values():  # warm-up
            fn()
        names = list(variants)
        for i in range(rounds):  # rotate the order: each variant follows each other one equally often
            for name in names[i % len(names):] + names[:i % len(names)]:
                times[name].append(timed_ms(variants[name], device))
    model.config._experts_implementation = "grouped_mm"
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--scale", type=int, default=4, help="divide OLMoE's hidden size and expert width by this")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 4096])
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    import transformers

    model, bridged, cfg = build(args.scale, args.layers, device, dtype)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {device} {args.dtype}, "
          f"threads {torch.get_num_threads()}; OLMoE/{args.scale}: hidden {cfg.hidden_size}, expert width "
          f"{cfg.intermediate_size}, {cfg.num_experts} experts, top-{cfg.num_experts_per_tok}, {args.layers} layers")
    with torch.inference_mode():  # the same function first: logits of every variant against transformers'
        x = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0)).to(device)
        model.config._experts_implementation = "eager"
        ref = model(input_ids=x).logits.float()
        model.config._experts_implementation = "grouped_mm"
        scale = float(ref.abs().max())
        diffs = {"hf:grouped_mm": float((model(input_ids=x).logits.float() - ref).abs().max())}
        for d, b in bridged.items():
            diffs[f"course:{d}"] = float((b(input_ids=x).logits.float() - ref).abs().max())
    print("max |logits - hf:eager logits| (max |logit| " + f"{scale:.3g}): "
          + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    for whole in (False, True):
        for tokens in args.tokens:
            big = tokens * cfg.hidden_size * cfg.intermediate_size > 2**27 and device.type == "cpu"
            rounds = (3 if big else 7) if args.quick else (5 if big else 21)
            times = race(model, bridged, cfg, tokens, rounds, device, dtype, whole)
            ref = statistics.median(times["course:auto"])
            what = "whole model" if whole else "MoE block (layer 0)"
            print(f"\n{what}, T={tokens}, {rounds} interleaved rounds")
            print(f"  {'variant':<18}{'median ms':>11}{'min-max ms':>22}{'x course:auto':>15}")
            for name, ts in times.items():
                med = statistics.median(ts)
                print(f"  {name:<18}{med:>11.3f}{f'{min(ts):.3f}-{max(ts):.3f}':>22}{med / ref:>15.2f}")


if __name__ == "__main__":
    main()
