"""Which experts to remove: five scores side by side on every zoo model, a global budget against
uniform per-layer counts, the super-expert check, and router-only recovery.

    python bench/expert_scores.py           # every zoo model, full validation sets, recovery
    python bench/expert_scores.py --quick   # every zoo model, smaller validation sets, no recovery

For each zoo model (shakespeare-moe: validation perplexity, lower is better; mnist1d-moe and
digits-moe: validation accuracy in %, higher is better):

1. Expert pruning at 25 % and 50 % of the experts removed, by ``frequency``, mean router
   probability (``router_prob``, chapter 9's expert drop), ``activation`` (mean output norm),
   ``reap`` (gate x output norm) and ``naee`` (chapter 4's layer-wise reconstruction), each layer
   keeping the same count: the quality of each, and the best criterion per budget.
2. The same total budgets ranked globally across layers (``drop_experts(scope="global")``, raw
   REAP and router-probability scores, at least k experts kept per layer) against the uniform
   per-layer count.
3. The super-expert check: experts whose largest output is >= 10x their layer's median, and the
   quality when the largest one alone is removed.
4. (not with ``--quick``) Router-only distillation (``distillation.recover_routers``) after 50 %
   REAP pruning and after merging to half the experts (M-SMoE): quality before and after, steps
   and seconds.
"""

from __future__ import annotations

import argparse
import time

import torch

from moe_course import zoo
from moe_course.compress.distillation import recover_routers
from moe_course.compress.merging import merge_experts
from moe_course.compress.pruning import keep_experts, prune_experts, super_experts
from moe_course.compress.trimming import drop_experts
from moe_course.course_table import TABLE_MODELS
from moe_course.layers import moe_layers
from moe_course.train import TrainConfig, evaluate

CRITERIA = ("frequency", "router_prob", "activation", "reap", "naee")


def quality(model, val, lm: bool) -> float:
    r = evaluate(model, val)
    return r["perplexity"] if lm else 100 * r["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    t_start = time.perf_counter()
    for name in TABLE_MODELS:
        model, data = zoo.pretrained(name, progress=False), zoo.data(name)
        lm = "input_ids" in data["train"].column_names
        cal = data["train"].shuffle(seed=0).select(range(64 if lm else 512))
        n_val = (128 if lm else 1000) if args.quick else (512 if lm else 2000)
        val = data["validation"].select(range(min(n_val, len(data["validation"]))))
        metric = "perplexity (lower is better)" if lm else "accuracy % (higher is better)"
        better = min if lm else max
        base = quality(model, val, lm)
        layers = moe_layers(model)
        n = layers[0].num_experts
        print(f"\n== {name}: {metric}; unpruned {base:.4f}; {n} experts per layer, "
              f"{len(layers)} MoE layers, top-{layers[0].k}; {len(cal)} calibration and "
              f"{len(val)} validation examples")
        print(f"{'removed':>8} {'kept/layer':>10} " + " ".join(f"{m:>11}" for m in CRITERIA)
              + "  best")
        for frac in (0.25, 0.5):
            keep = n - round(frac * n)
            row = {m: quality(prune_experts(model, keep, calib=cal, method=m), val, lm)
                   for m in CRITERIA}
            best = better(row, key=row.get)
            print(f"{frac:>8.0%} {keep:>10} " + " ".join(f"{row[m]:>11.4f}" for m in CRITERIA)
                  + f"  {best}")
        print("global vs uniform per-layer drop (same total number of experts kept):")
        print(f"{'removed':>8} {'kept':>5} {'criterion':>12} {'uniform':>9} {'global':>9}  "
              "kept per layer (global)")
        for frac in (0.25, 0.5):
            keep = n - round(frac * n)
            total = keep * len(layers)
            for crit in ("reap", "router_prob"):
                uni = quality(drop_experts(model, keep, calib=cal, criterion=crit), val, lm)
                glob = drop_experts(model, total, calib=cal, scope="global", criterion=crit)
                print(f"{frac:>8.0%} {total:>5} {crit:>12} {uni:>9.4f} "
                      f"{quality(glob, val, lm):>9.4f}  "
                      f"{[layer.num_experts for layer in moe_layers(glob)]}")
        hits = super_experts(model, cal)
        if not hits:
            print("super experts (>= 10x the layer's median peak output): none")
        else:
            l, e, peak, ratio = hits[0]
            cut = prune_experts(model, n, calib=cal)  # a copy with every expert
            layer = moe_layers(cut)[l]
            keep_experts(layer, [i for i in range(layer.num_experts) if i != e])
            print(f"super experts: {[(h[0], h[1], round(h[3], 1)) for h in hits]}; removing "
                  f"layer {l} expert {e} (peak {peak:.3g}, {ratio:.0f}x median): "
                  f"{quality(cut, val, lm):.4f}")
        if args.quick:
            continue
        steps = 100
        cfg = TrainConfig(steps=steps, batch_size=32, lr=1e-3, warmup_steps=0, eval_every=0)
        for label, student in (("REAP 50%", prune_experts(model, n // 2, calib=cal, method="reap")),
                               ("M-SMoE 50%", merge_experts(model, n // 2, calib=cal))):
            before = quality(student, val, lm)
            t0 = time.perf_counter()
            recover_routers(student, model, data["train"], cfg=cfg, progress=False)
            secs = time.perf_counter() - t0
            print(f"router-only recovery after {label}: {before:.4f} -> "
                  f"{quality(student, val, lm):.4f} in {steps} steps, {secs:.1f} s")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
