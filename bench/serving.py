"""Serving beyond one device's memory, side by side in one run: decode tokens/s with expert offloading
at several cache sizes, and all-to-all bytes per token of expert parallelism per compression variant.

    python bench/serving.py            # 3 interleaved rounds
    python bench/serving.py --quick    # 1 round, 16 new tokens

1. Offloading (``moe_course.serving.offload``): the trained course model with its experts in a
   memory-mapped safetensors file and C experts per layer in RAM (LRU), greedy decoding with the KV
   cache, interleaved with the model fully in memory; hit rate and MB read from the file.
2. Expert parallelism (``moe_course.serving.parallel.alltoall_bytes``): from each variant's routing
   of held-out text in its first MoE layer, the bytes the two all-to-alls of ``ExpertParallelMoE``
   send to other ranks per token at P = 2 and 4 ranks (the same accounting as
   ``ExpertParallelMoE.last_comm``; ``bench/expert_parallel.py`` measures it on gloo processes).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from moe_course import metrics, zoo
from moe_course.compress.merging import merge_experts
from moe_course.compress.quantization import quantize
from moe_course.compress.trimming import drop_experts
from moe_course.layers import moe_layers
from moe_course.serving.offload import cache_stats, offload
from moe_course.serving.parallel import alltoall_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds, new = (1, 16) if args.quick else (3, 32)
    lm = zoo.pretrained("shakespeare-moe", progress=False).eval()
    data = zoo.data("shakespeare-moe")
    val = data["validation"].select(range(16 if args.quick else 32))
    calib = data["train"].shuffle(seed=0).select(range(32))
    prompt = torch.as_tensor(val[0]["input_ids"][:16])

    print(f"1. offloading: {new} new tokens, LRU cache of C experts per layer, {rounds} interleaved round(s)")
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"in memory": lm}
        for c in (1, 2, 4, 6):
            runs[f"offloaded, C={c}"] = offload(lm, Path(tmp) / f"c{c}.safetensors", c)
        outs = {}
        race = metrics.latency_race(
            {n: (lambda n=n, m=m: outs.__setitem__(n, m.generate(prompt, new, temperature=0))) for n, m in runs.items()},
            None, rounds=rounds, warmup=1)
        for name, r in race.items():
            extra = ""
            if name != "in memory":
                st = cache_stats(runs[name])
                hits, misses = sum(s.hits for s in st), sum(s.misses for s in st)
                extra = (f"  hit rate {hits / (hits + misses):.1%}, "
                         f"{sum(s.bytes_moved for s in st) / 1e6:.2f} MB read in all")
            same = torch.equal(outs[name], outs["in memory"])
            print(f"  {name:<20}{new / r.median_ms * 1e3:8.1f} tok/s [{new / r.p90_ms * 1e3:.1f}-"
                  f"{new / r.p10_ms * 1e3:.1f}]  same tokens: {same}{extra}")

    print("\n2. expert parallelism: all-to-all bytes per token to other ranks (first MoE layer)")
    variants = {"fp32": lm, "4-bit experts": quantize(lm, 4, group_size=32),
                "merged 8->4": merge_experts(lm, 4, calib=calib), "dropped 8->6": drop_experts(lm, 6, calib=calib)}
    cases = {"fp32 rows": ("fp32", 4, None), "bf16 rows": ("fp32", 2, None), "capacity factor 1.0": ("fp32", 4, 1.0),
             "4-bit experts": ("4-bit experts", 4, None), "merged 8->4": ("merged 8->4", 4, None),
             "dropped 8->6": ("dropped 8->6", 4, None)}
    first = {}
    for name, m in variants.items():
        stats = metrics.routing_stats(m, val, batch_size=16, max_tokens=2048)
        first[name] = (stats.layers[0].indices, moe_layers(m)[0].num_experts)
    print(f"  {'variant':<22}{'P=2':>10}{'P=4':>10}{'vs fp32 (P=4)':>15}")
    base = None
    for label, (variant, payload, cf) in cases.items():
        idx, n = first[variant]
        b = [alltoall_bytes(idx, n, p, lm.config.d_model, payload_bytes=payload, capacity_factor=cf)["bytes_per_token"]
             for p in (2, 4)]
        base = base or b[1]
        print(f"  {label:<22}{b[0]:>10.0f}{b[1]:>10.0f}{b[1] / base:>15.2f}")


if __name__ == "__main__":
    main()
