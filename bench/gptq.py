"""GPTQ and activation-aware scaling (AWQ) against round-to-nearest on the zoo models: quality
increase at equal bytes.

    python bench/gptq.py                 # both zoo models, 4/3/2 bits, per-row and groups of 32
    python bench/gptq.py --quick         # the language model only, groups of 32
    python bench/gptq.py --act-order     # GPTQ visits columns by decreasing Hessian diagonal

For every (bits, group size) the routed experts are quantized by RTN
(``quantization.quantize``), by AWQ (``awq.awq``: searched scales folded into the norm and
``w_in``, then RTN), and by GPTQ (``gptq.gptq``, calibrated on 64 training sequences or
512 training signals), stored in the same packed format, so the bytes are equal; the table gives
the perplexity (or error rate) increase over fp32 of each and the tokens each expert saw. It
ends with the two targets of the GPTQ section: GPTQ 3-bit at or below RTN 4-bit's increase, and
GPTQ 2-bit at most half of RTN 2-bit's.
"""

from __future__ import annotations

import argparse
import time

import torch

from moe_course import metrics, zoo
from moe_course.compress.awq import awq
from moe_course.compress.gptq import gptq
from moe_course.compress.quantization import quantize
from moe_course.train import evaluate


def quality(model, val, name):
    r = evaluate(model, val)
    return r["perplexity"] if name == "shakespeare-moe" else 100 * (1 - r["accuracy"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--act-order", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    models = ["shakespeare-moe"] if args.quick else ["shakespeare-moe", "mnist1d-moe"]
    groups = [32] if args.quick else [None, 32]
    for name in models:
        model = zoo.pretrained(name, progress=False)
        data = zoo.data(name)
        n_cal, n_val = (64, 256) if name == "shakespeare-moe" else (512, 2000)
        cal = data["train"].shuffle(seed=0).select(range(n_cal))
        val = data["validation"].select(range(min(n_val, len(data["validation"]))))
        metric = "perplexity" if name == "shakespeare-moe" else "error %"
        base = quality(model, val, name)
        print(f"\n{name}: fp32 {metric} {base:.4f}; calibration {n_cal} training examples")
        print(f"{'bits':>4} {'group':>6} {'bytes':>10} {'RTN +':>9} {'AWQ +':>9} {'GPTQ +':>9} {'GPTQ s':>7}"
              "  tokens/expert")
        inc = {}
        for g in groups:
            for bits in (4, 3, 2):
                rtn = quantize(model, bits, group_size=g)
                t0 = time.perf_counter()
                gq = gptq(model, bits, calib=cal, group_size=g, act_order=args.act_order)
                secs = time.perf_counter() - t0
                aw = awq(model, bits, calib=cal, group_size=g)
                r, q = quality(rtn, val, name) - base, quality(gq, val, name) - base
                a = quality(aw, val, name) - base
                inc[bits, g] = (r, q)
                toks = [t for layer in gq.gptq_report.tokens for t in layer]
                print(f"{bits:>4} {str(g):>6} {metrics.size_report(gq).bytes:>10,} {r:>+9.4f} {a:>+9.4f} {q:>+9.4f} "
                      f"{secs:>7.1f}  {min(toks)}..{max(toks)}")
        for g in groups:
            (r4, _), (_, q3), (r2, q2) = inc[4, g], inc[3, g], inc[2, g]
            print(f"group {g}: GPTQ 3-bit {q3:+.4f} vs RTN 4-bit {r4:+.4f} -> "
                  f"{'met' if q3 <= r4 else 'not met'}; GPTQ 2-bit {q2:+.4f} vs half RTN 2-bit "
                  f"{r2 / 2:+.4f} -> {'met' if q2 <= r2 / 2 else 'not met'}")


if __name__ == "__main__":
    main()
