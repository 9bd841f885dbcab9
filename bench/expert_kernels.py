"""Decode-shaped expert compute: fp32, bf16 and packed int8 / int4 experts, side by side in one run.

    python bench/expert_kernels.py            # OLMoE's shapes and the course model's, 7 rounds
    python bench/expert_kernels.py --quick    # 3 rounds

One MoE layer's experts at OLMoE-1B-7B's shapes (d_model 2048, expert width 1024, 64 SwiGLU
experts, top-8) and at the course's Shakespeare model's (96, 64, 8 experts, top-2), for T = 1 and
8 tokens (decode). Variants, all through ``moe_course.dispatch.dispatch(..., "auto")``: fp32
weights; bf16 weights and activations; ``QuantizedExperts`` int8 per channel and 4-bit in groups of
32, run by torch's weight-only kernels with bf16 activations (where the one-time probe of
``kernel_available`` finds them working on the device), and with fp32 activations by the teaching
path (dequantize the routed experts only, then a float matmul). ``--device cuda`` runs it on a
GPU. Rounds are interleaved so machine noise hits every variant alike; we print the median and
p10-p90 in ms and the speed-up over fp32. Small models are overhead-bound: read the OLMoE rows for what the kernels can do.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from moe_course.compress.quantization import QuantizedExperts
from moe_course.dispatch import dispatch
from moe_course.layers import Experts
from moe_course.metrics import timed_ms


def variants(d: int, f: int, n: int, device: torch.device):
    torch.manual_seed(0)
    dense = Experts(n, d, f, "swiglu").requires_grad_(False)
    bf16 = Experts(n, d, f, "swiglu").requires_grad_(False)
    bf16.load_state_dict(dense.state_dict())
    bf16.to(torch.bfloat16)
    int8 = QuantizedExperts(dense, 8)
    int4 = QuantizedExperts(dense, 4, group_size=32)
    dense, bf16, int8, int4 = (m.to(device) for m in (dense, bf16, int8, int4))
    return {"fp32": (dense, torch.float32), "bf16": (bf16, torch.bfloat16),
            "int8, fp32 act": (int8, torch.float32), "int8, bf16 act": (int8, torch.bfloat16),
            "int4 g32, fp32 act": (int4, torch.float32), "int4 g32, bf16 act": (int4, torch.bfloat16)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    rounds = 3 if args.quick else 7
    print(f"{torch.get_num_threads()} threads, {rounds} interleaved rounds; ms per layer call, median [p10-p90]")
    for label, (d, f, n, k) in {"OLMoE shapes": (2048, 1024, 64, 8), "course model": (96, 64, 8, 2)}.items():
        cases = variants(d, f, n, device)
        q8, q4 = cases["int8, bf16 act"][0], cases["int4 g32, bf16 act"][0]
        print(f"{label}: kernels on {device.type} with bf16 activations: int8 -> {q8.kernel_kind(0, device)}, "
              f"int4 -> {q4.kernel_kind(0, device)}")
        for tokens in (1, 8):
            g = torch.Generator().manual_seed(tokens)
            x = torch.randn(tokens, d, generator=g).to(device)
            w, idx = torch.softmax(torch.randn(tokens, n, generator=g), -1).topk(k, dim=-1)
            w, idx = w.to(device), idx.to(device)
            times = {name: [] for name in cases}
            with torch.inference_mode():
                for name, (experts, dtype) in cases.items():  # warm-up: builds the kernels' weight layouts
                    dispatch(x.to(dtype), w, idx, experts, "auto")
                for _ in range(rounds):
                    for name, (experts, dtype) in cases.items():
                        xx = x.to(dtype)
                        times[name].append(timed_ms(lambda: dispatch(xx, w, idx, experts, "auto"), device))
            base = statistics.median(times["fp32"])
            print(f"{label}: d={d}, f={f}, {n} experts, top-{k}, T={tokens}")
            for name, ts in times.items():
                q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) > 1 else ts * 9
                med = statistics.median(ts)
                print(f"  {name:<20}{med:9.3f} ms [{q[0]:.3f}-{q[-1]:.3f}]  {base / med:5.2f}x fp32")


if __name__ == "__main__":
    main()
