"""Decoding with and without the KV cache, side by side in one run.

    python bench/kv_cache.py            # 7 interleaved rounds
    python bench/kv_cache.py --quick    # 3 rounds

Two models: the course's trained Shakespeare MoE (``cpu`` preset, context 64) and the ``gpu``
preset's architecture (context 256, d_model 384, 6 layers; untrained: time does not depend on the
weights). Each round generates from an 8-token prompt until the window is full (greedy), once with
``use_cache=True`` and once with ``use_cache=False``, alternating, so machine noise hits both alike.
Prints the median and p10-p90 of tokens/s and the speed-up; checks both produced the same tokens.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from moe_course import models, zoo
from moe_course.metrics import timed_ms


def race(model, rounds: int, device: torch.device) -> dict:
    ctx = model.config.context_length
    prompt = torch.randint(1, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0)).to(device)
    new = ctx - 8
    times = {True: [], False: []}
    outputs = {}
    for _ in range(rounds):
        for use_cache in (True, False):
            ms = timed_ms(lambda: outputs.__setitem__(use_cache, model.generate(prompt, new, temperature=0,
                                                                                 use_cache=use_cache)), device)
            times[use_cache].append(new / ms * 1e3)

    def spread(xs):
        q = statistics.quantiles(xs, n=10) if len(xs) > 1 else xs * 9
        return statistics.median(xs), q[0], q[-1]

    cached, plain = spread(times[True]), spread(times[False])
    return {"context": ctx, "new_tokens": new, "cached": cached, "plain": plain,
            "speedup": cached[0] / plain[0], "same_tokens": torch.equal(outputs[True], outputs[False])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 7")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    rounds = 3 if args.quick else 7
    lm_small = zoo.pretrained("shakespeare-moe", preset="cpu", progress=False)
    cfg, _ = zoo.preset_configs("gpu", "shakespeare-moe")
    torch.manual_seed(0)
    lm_large = models.MoETransformerLM(cfg.replace(vocab_size=lm_small.config.vocab_size))
    print(f"device {device}, {torch.get_num_threads()} threads, {rounds} interleaved rounds; tokens/s median [p10-p90]")
    for name, model in (("zoo shakespeare-moe (cpu preset)", lm_small), ("gpu-preset architecture", lm_large)):
        model = model.to(device).eval()
        r = race(model, rounds, device)
        print(f"{name}: context {r['context']}, {r['new_tokens']} new tokens")
        for label, key in (("  KV cache   ", "cached"), ("  recompute  ", "plain")):
            med, lo, hi = r[key]
            print(f"{label}{med:8.1f} tok/s [{lo:.1f}-{hi:.1f}]")
        print(f"  speed-up {r['speedup']:.2f}x, same tokens: {r['same_tokens']}")


if __name__ == "__main__":
    main()
