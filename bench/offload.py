"""Expert offloading on the course's language model: a trace-driven study, then measured decoding.

    python bench/offload.py            # full validation trace, 3 decode rounds
    python bench/offload.py --quick    # shorter trace, 1 round

1. Routing traces: each variant (fp32, 4-bit experts, experts merged 8 -> 4 per layer, experts
   dropped 8 -> 6 per layer) routes held-out plays; the traces replay through per-layer caches of
   C experts (LRU and LFU). Bytes per token = misses x bytes of one expert (true storage bytes,
   so 4-bit experts move about 1/7 of fp32's).
2. Measured: the fp32 model with its experts in a memory-mapped safetensors file and C in RAM,
   decoding with the KV cache (``generate``), interleaved with the same model fully in memory.
Writes ``offload.png`` (hit rate and bytes per token against C) when --plot is given.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from moe_course import zoo
from moe_course.compress.merging import merge_experts
from moe_course.compress.quantization import quantize
from moe_course.compress.trimming import drop_experts
from moe_course.metrics import routing_stats, size_report, timed_ms
from moe_course.serving.offload import cache_stats, offload, simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--plot", metavar="PNG", help="write the hit-rate / bytes figure here")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = zoo.pretrained("shakespeare-moe", preset="cpu", progress=False).eval()
    data = zoo.data("shakespeare-moe", preset="cpu")
    val = data["validation"].select(range(16 if args.quick else 64))
    calib = data["train"].shuffle(seed=0).select(range(32))
    variants = {
        "fp32": model,
        "4-bit experts": quantize(model, 4, group_size=32),
        "merged 8->4": merge_experts(model, 4, calib=calib),
        "dropped 8->6": drop_experts(model, 6, calib=calib),
    }
    sizes = (1, 2, 3, 4, 6, 8)
    print("trace-driven: hit rate | bytes moved per token, by experts cached per layer (C)")
    print(f"{'variant':<16}{'policy':<7}" + "".join(f"{'C=' + str(c):>18}" for c in sizes))
    curves = {}
    for name, m in variants.items():
        rep = size_report(m)
        expert_bytes = rep.expert_bytes // sum(rep.experts_per_layer)
        trace = [layer.indices for layer in routing_stats(m, val, batch_size=16, max_tokens=4096).layers]
        for policy in ("lru", "lfu"):
            row = []
            for c in sizes:
                if c > max(rep.experts_per_layer):
                    row.append(None)
                    continue
                row.append(simulate(trace, c, policy, expert_bytes))
            curves[(name, policy)] = row
            cells = "".join(f"{'-':>18}" if r is None else f"{r['hit_rate']:>8.1%} {r['bytes_per_token'] / 1e3:>6.1f} kB"
                            for r in row)
            print(f"{name:<16}{policy:<7}{cells}")

    rounds = 1 if args.quick else 3
    prompt = torch.tensor(model.tokenizer.encode("ROMEO:\nBut soft, what light"))
    new = 40
    print(f"\nmeasured decode (fp32, KV cache, {new} tokens, {rounds} interleaved round(s)): tokens/s median")
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"in memory": model}
        for c in (2, 4):
            runs[f"offloaded, C={c}"] = offload(model, Path(tmp) / f"c{c}.safetensors", c)
        speeds = {k: [] for k in runs}
        outs = {}
        for _ in range(rounds):
            for name, m in runs.items():
                ms = timed_ms(lambda: outs.__setitem__(name, m.generate(prompt, new, temperature=0)))
                speeds[name].append(new / ms * 1e3)
        for name, m in runs.items():
            extra = ""
            if name != "in memory":
                stats = cache_stats(m)
                hits = sum(s.hits for s in stats)
                misses = sum(s.misses for s in stats)
                moved = sum(s.bytes_moved for s in stats)
                extra = f"  hit rate {hits / (hits + misses):.1%}, {moved / 1e6:.2f} MB read from the file"
            same = torch.equal(outs[name], outs["in memory"])
            print(f"  {name:<18}{statistics.median(speeds[name]):8.1f} tok/s  same tokens: {same}{extra}")
    if args.plot:
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
        for (name, policy), row in curves.items():
            xs = [c for c, r in zip(sizes, row) if r is not None]
            style = "-" if policy == "lru" else "--"
            a.plot(xs, [r["hit_rate"] for r in row if r is not None], style, marker="o", label=f"{name} ({policy})")
            b.plot(xs, [r["bytes_per_token"] / 1e3 for r in row if r is not None], style, marker="o")
        a.set(xlabel="experts cached per layer (C)", ylabel="hit rate")
        b.set(xlabel="experts cached per layer (C)", ylabel="kB moved per token")
        a.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
