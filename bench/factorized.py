"""μMoE layers at a fixed parameter budget against one dense linear layer of the same in/out size.

    python bench/factorized.py                 # d=1024, 1024 tokens, 7 rounds
    python bench/factorized.py --quick         # 3 rounds
    python bench/factorized.py --d 512 --tokens 4096 --device cuda

The budget is the dense layer's ``d*d + d`` parameters. For 64, 256, 1024 and 4096 experts we build
gated single-layer CPμMoE and TRμMoE (gate + LayerNorm + entmax-1.5 + factorised layer) with the
largest rank that fits the budget (:func:`cp_rank_for_budget`, :func:`tr_rank_for_budget`, TR
expert ranks 4), flat (one expert mode of N) and hierarchical (two modes of sqrt(N)). A flat
layer whose gate alone (d*N weights) leaves no room for rank 1 is reported as "does not fit".
Forward passes only (inference mode), all variants interleaved round-robin in one process so
that machine noise hits them alike; we report medians and the ratios to the dense layer.
Aim (issue 5): at 4096 experts, within 2x of the dense layer's time with parameters within 1.1x.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch

from moe_course.factorized import MuMoE, cp_rank_for_budget, tr_rank_for_budget
from moe_course.metrics import timed_ms

EXPERTS = (64, 256, 1024, 4096)



def build_variants(d: int, device: torch.device) -> tuple[dict, dict]:
    """``{name: module}`` and ``{name: description}`` for every layer that fits the budget."""
    budget = d * d + d
    torch.manual_seed(0)
    layers = {"dense": torch.nn.Linear(d, d)}
    info = {"dense": {"experts": 1, "rank": "-"}}
    skipped = {}
    for n in EXPERTS:
        root = math.isqrt(n)
        for modes, label in (((n,), "flat"), ((root, root), f"{root}x{root}")):
            for fac in ("cp", "tr"):
                name = f"{fac.upper()} {n:>4} {label}"
                try:
                    if fac == "cp":
                        rank = cp_rank_for_budget(budget, d, d, modes)
                        layer = MuMoE(d, d, modes, "cp", rank=rank)
                    else:
                        rank = tr_rank_for_budget(budget, d, d, modes)
                        layer = MuMoE(d, d, modes, "tr", ranks=rank)
                except ValueError:
                    skipped[name] = (f"does not fit: the gate ({d * sum(modes):,} weights) leaves no room for rank 1 "
                                     f"in {budget:,}")
                    continue
                layers[name] = layer
                info[name] = {"experts": n, "rank": rank}
    for layer in layers.values():
        layer.to(device).eval()
    return layers, info, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=1024, help="in and out features (default 1024)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per forward (default 1024)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: moe_course.device.get_device())")
    args = parser.parse_args()
    from moe_course.device import get_device

    device = get_device(args.device)
    rounds = 3 if args.quick else args.rounds
    layers, info, skipped = build_variants(args.d, device)
    x = torch.randn(args.tokens, args.d, device=device)
    times: dict[str, list[float]] = {name: [] for name in layers}
    with torch.inference_mode():
        for layer in layers.values():  # warm-up
            layer(x)
        for _ in range(rounds):
            for name, layer in layers.items():
                times[name].append(timed_ms(lambda: layer(x), device))
    med = {name: statistics.median(v) for name, v in times.items()}
    params = {name: sum(p.numel() for p in layer.parameters()) for name, layer in layers.items()}

    print(f"device={device.type}, threads={torch.get_num_threads()}, d_in=d_out={args.d}, tokens={args.tokens}, "
          f"rounds={rounds}, torch {torch.__version__}")
    print(f"budget = dense Linear({args.d}, {args.d}) = {params['dense']:,} parameters; medians of interleaved rounds")
    print(f"{'layer':22s} {'rank(s)':>14} {'params':>11} {'x dense':>8} {'ms':>9} {'x dense':>8}")
    for name in layers:
        print(f"{name:22s} {str(info[name]['rank']):>14} {params[name]:>11,} {params[name] / params['dense']:>8.3f} "
              f"{med[name]:>9.2f} {med[name] / med['dense']:>8.2f}")
    for name, why in skipped.items():
        print(f"{name:22s} {why}")
    best = None
    for name in layers:
        if info[name]["experts"] == 4096:
            ok = med[name] <= 2 * med["dense"] and params[name] <= 1.1 * params["dense"]
            print(f"aim at 4096 experts (time <= 2x dense, params <= 1.1x dense): {name.strip()}: "
                  f"{'met' if ok else 'not met'} ({med[name] / med['dense']:.2f}x time, "
                  f"{params[name] / params['dense']:.3f}x params)")
            best = ok if best is None else best or ok
    print(f"aim met by at least one 4096-expert layer: {bool(best)}")


if __name__ == "__main__":
    main()
