"""Decode tokens/s for every variant side by side in one run, at the course model's and OLMoE's shapes.

    python bench/decode.py            # 5 interleaved rounds
    python bench/decode.py --quick    # 2 rounds, fewer tokens

1. The trained course model (``shakespeare-moe``, d 96, f 64, 8 experts, top-2): greedy ``generate``
   with the KV cache, at batch 1 and 32 sequences, for fp32, bf16, int8 and 4-bit experts
   (``quantize``), experts merged 8 -> 4 and dropped 8 -> 6. Tokens/s counts every sequence's tokens.
   Tiny experts: every path is overhead-bound here.
2. One MoE layer at OLMoE-1B-7B's shapes (d 2048, f 1024, 64 SwiGLU experts, top-8), one decode step
   of B tokens through ``dispatch(..., "auto")``: fp32, bf16, int8 / 4-bit through torch's weight-only
   kernels (bf16 activations) and through dequantize-then-matmul (fp32 activations). Tokens/s =
   B / step time for one layer (a 16-layer model's experts would run 16x slower).
All variants of a table run in interleaved rounds (``metrics.latency_race``): median [p10-p90].
``--device cuda --skip-course`` runs part 2 on a GPU (bf16 against int8 / int4 weight-only kernels,
where torch provides them there; the line "kernels for bf16 activations" says which ran).
"""

from __future__ import annotations

import argparse
import copy

import torch

from moe_course import metrics, zoo
from moe_course.compress.merging import merge_experts
from moe_course.compress.quantization import QuantizedExperts, quantize
from moe_course.compress.trimming import drop_experts
from moe_course.dispatch import dispatch
from moe_course.layers import Experts


def _row(name: str, r, tokens: int, base) -> str:
    rate = tokens / r.median_ms * 1e3
    lo, hi = tokens / r.p90_ms * 1e3, tokens / r.p10_ms * 1e3
    verdict = "(baseline)" if r is base else metrics.speedup_verdict(base, r)
    return f"  {name:<30}{rate:10.1f} tok/s [{lo:.1f}-{hi:.1f}]  {verdict}"


def course_model(rounds: int, new: int) -> None:
    lm = zoo.pretrained("shakespeare-moe", progress=False).eval()
    data = zoo.data("shakespeare-moe")
    calib = data["train"].shuffle(seed=0).select(range(32))
    variants = {"fp32": lm, "bf16": copy.deepcopy(lm).to(torch.bfloat16),
                "int8 experts": quantize(lm, 8), "4-bit experts (g32)": quantize(lm, 4, group_size=32),
                "merged 8->4": merge_experts(lm, 4, calib=calib), "dropped 8->6": drop_experts(lm, 6, calib=calib)}
    ids = torch.stack([torch.as_tensor(r) for r in data["validation"].select(range(32))["input_ids"]])
    for batch in (1, 32):
        prompt = ids[:batch, :16]
        runs = {name: (lambda m=m: m.generate(prompt, new, temperature=0)) for name, m in variants.items()}
        race = metrics.latency_race(runs, None, rounds=rounds, warmup=1)
        print(f"course model, batch {batch}, {new} new tokens after a 16-token prompt (KV cache):")
        for name, r in race.items():
            print(_row(name, r, batch * new, race["fp32"]))


def olmoe_layer(rounds: int, device: torch.device) -> None:
    d, f, n, k = 2048, 1024, 64, 8
    torch.manual_seed(0)
    fp32 = Experts(n, d, f, "swiglu").requires_grad_(False)
    int8, int4 = QuantizedExperts(fp32, 8).to(device), QuantizedExperts(fp32, 4, group_size=32).to(device)
    fp32 = fp32.to(device)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    x0 = torch.zeros(1, d, device=device, dtype=torch.bfloat16)
    print(f"kernels for bf16 activations on {device.type}: int8 experts -> {int8.kernel_kind(0, device)}, "
          f"4-bit experts -> {int4.kernel_kind(0, device)} (runs_kernels: {int8.runs_kernels(x0)}, "
          f"{int4.runs_kernels(x0)})")
    cases = {"fp32": (fp32, torch.float32), "bf16": (bf16, torch.bfloat16),
             "int8, kernel (bf16 act.)": (int8, torch.bfloat16), "int8, dequantize": (int8, torch.float32),
             "4-bit, kernel (bf16 act.)": (int4, torch.bfloat16), "4-bit, dequantize": (int4, torch.float32)}
    for batch in (1, 8):
        g = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, d, generator=g).to(device)
        w, idx = torch.softmax(torch.randn(batch, n, generator=g), -1).topk(k, dim=-1)
        w, idx = w.to(device), idx.to(device)
        runs = {name: (lambda e=e, xx=x.to(dt): dispatch(xx, w, idx, e, "auto")) for name, (e, dt) in cases.items()}
        with torch.inference_mode():
            race = metrics.latency_race(runs, None, rounds=rounds, warmup=1, device=device)
        print(f"OLMoE-shaped MoE layer (d={d}, f={f}, N={n}, k={k}), decode step of B={batch}:")
        for name, r in race.items():
            print(_row(name, r, batch, race["fp32"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", help="device of the OLMoE-shaped layer (e.g. cuda)")
    parser.add_argument("--skip-course", action="store_true", help="only the OLMoE-shaped layer")
    args = parser.parse_args()
    rounds = 2 if args.quick else 5
    print(f"{torch.get_num_threads()} threads, {rounds} interleaved rounds; median [p10-p90]")
    if not args.skip_course:
        course_model(rounds, 16 if args.quick else 32)
    olmoe_layer(rounds if torch.device(args.device).type == "cpu" else 20, torch.device(args.device))


if __name__ == "__main__":
    main()
