"""Race the dispatch strategies against each other and against the dense ideal.

    python bench/dispatch.py            # T=4096 and T=64, forward and forward+backward
    python bench/dispatch.py --quick    # fewer rounds

Setup (from the foundation issue): d_model=256, d_hidden=512, 8 SwiGLU experts, top-2, fp32.
The dense ideal is one SwiGLU MLP of hidden width k*d_hidden: the same active FLOPs with no
routing at all. All variants run interleaved (round-robin) in one process so that machine noise
hits them alike; we report medians and the ratios naive/default, loop/grouped, default/dense.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from moe_course.dispatch import dispatch, resolve_strategy
from moe_course.metrics import timed_ms
from moe_course.layers import Experts, TopKRouter


def make_case(tokens: int, d: int, h: int, e: int, k: int, device: torch.device):
    torch.manual_seed(0)
    experts = Experts(e, d, h, "swiglu").to(device)
    router = TopKRouter(d, e, k).to(device)
    dense = Experts(1, d, k * h, "swiglu").to(device)  # same active FLOPs per token
    x = torch.randn(tokens, d, device=device)
    return experts, router, dense, x



def race(tokens: int, backward: bool, rounds: int, naive_rounds: int, device: torch.device):
    experts, router, dense, x = make_case(tokens, 256, 512, 8, 2, device)
    with torch.no_grad():
        r = router(x)
    weights, indices = r.weights, r.indices

    def run(strategy):
        def fn():
            if backward:
                xx = x.detach().requires_grad_(True)
                y = dispatch(xx, weights, indices, experts, strategy)
                (y * y).sum().backward()  # a real loss: grouped_mm rejects stride-0 grads
            else:
                with torch.inference_mode():
                    dispatch(x, weights, indices, experts, strategy)
        return fn

    def dense_fn():
        if backward:
            xx = x.detach().requires_grad_(True)
            y = dense.expert_forward(0, xx)
            (y * y).sum().backward()
        else:
            with torch.inference_mode():
                dense.expert_forward(0, x)

    variants = {"dense": dense_fn, "loop": run("loop"), "grouped": run("grouped"), "naive": run("naive")}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for name, fn in variants.items():  # warm-up
        fn()
    for i in range(rounds):
        for name, fn in variants.items():
            if name == "naive" and i >= naive_rounds:
                continue
            times[name].append(timed_ms(fn, device))
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"grouped_mm available: {hasattr(F, 'grouped_mm')}")
    for tokens in (4096, 64):
        default = resolve_strategy("auto", device, tokens * 2)
        print(f"\n== T={tokens}: auto -> {default!r}")
        for backward in (False, True):
            rounds = (5 if args.quick else 15) if tokens == 4096 else (20 if args.quick else 60)
            naive_rounds = 1 if (tokens == 4096 and backward) else (2 if tokens == 4096 else rounds)
            med = race(tokens, backward, rounds, naive_rounds, device)
            label = "fwd+bwd" if backward else "fwd"
            print(f"\nT={tokens} {label}: " + ", ".join(f"{n} {v:.2f} ms" for n, v in med.items()))
            print(f"  naive/default {med['naive'] / med[default]:.1f}x | loop/grouped "
                  f"{med['loop'] / med['grouped']:.2f}x | default/dense {med[default] / med['dense']:.2f}x")


if __name__ == "__main__":
    main()
