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


# --------------------------------------------------------------------------------------------
# --grid: every strategy on every shape of fine-grained and coarse MoEs (inference, forward only)
# --------------------------------------------------------------------------------------------
SHAPES = {"course": (96, 64), "OLMoE": (2048, 1024)}  # (d, f)
GRID_N, GRID_K, GRID_T = (8, 64), (1, 2, 8), (1, 8, 64, 4096)
NAIVE_MAX_ASSIGNMENTS = 512  # naive is one matmul per (token, choice): skipped above this


def _hf_experts(experts: Experts):
    """transformers' OLMoE experts holding the same weights (``None`` without transformers)."""
    try:
        from transformers import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeExperts
    except Exception:  # noqa: BLE001 - optional dependency
        return None, None
    cfg = OlmoeConfig(hidden_size=experts.d_model, intermediate_size=experts.d_hidden,
                      num_experts=experts.num_experts, hidden_act="silu")
    hf = OlmoeExperts(cfg).requires_grad_(False)
    with torch.no_grad():
        hf.gate_up_proj.copy_(torch.cat([experts.w_gate, experts.w_in], dim=2).transpose(1, 2))
        hf.down_proj.copy_(experts.w_out.transpose(1, 2))
    return hf, cfg


def grid_cells(quick: bool, shapes=SHAPES, ns=GRID_N, ks=GRID_K, ts=GRID_T):
    """``(shape, d, f, N, k, T)`` of the grid; ``--quick`` leaves out OLMoE's shapes at T=4096."""
    for shape, (d, f) in shapes.items():
        for n in ns:
            for k in ks:
                for t in ts:
                    if k > n or (quick and shape == "OLMoE" and t >= 4096):
                        continue
                    yield shape, d, f, n, k, t


def grid(quick: bool, device: torch.device, hf: bool = True, only: str | None = None) -> list[dict]:
    from moe_course.metrics import latency_race

    rows, built = [], {}
    shapes = {only: SHAPES[only]} if only else SHAPES
    cells = list(grid_cells(quick, shapes))
    for shape, d, f, n, k, t in cells:
        key = (shape, n)
        if key not in built:
            built.clear()  # one model in memory at a time (OLMoE's 64 experts: 1.6 GB in fp32)
            torch.manual_seed(0)
            experts = Experts(n, d, f, "swiglu").requires_grad_(False).to(device)
            built[key] = (experts, *(_hf_experts(experts) if hf else (None, None)))
        experts, hf_ex, cfg = built[key]
        g = torch.Generator().manual_seed(t * 100 + k)
        x = torch.randn(t, d, generator=g).to(device)
        w, idx = torch.softmax(torch.randn(t, n, generator=g), -1).topk(k, dim=-1)
        w, idx = w.to(device), idx.to(device)
        runs = {s: (lambda s=s: dispatch(x, w, idx, experts, s)) for s in ("loop", "grouped")}
        if t * k <= NAIVE_MAX_ASSIGNMENTS:
            runs["naive"] = lambda: dispatch(x, w, idx, experts, "naive")
        if hf_ex is not None:
            def hf_run(impl):
                def fn():
                    cfg._experts_implementation = impl
                    return hf_ex(x, idx, w)
                return fn
            runs["hf eager"], runs["hf grouped_mm"] = hf_run("eager"), hf_run("grouped_mm")
        runs["auto"] = lambda: dispatch(x, w, idx, experts, "auto")
        big = d * f * min(n, t * k) * t >= 2 ** 31  # seconds per call: few rounds
        rounds = (3 if big else 5) if shape == "OLMoE" else (15 if quick else 25)
        race = latency_race(runs, None, rounds=rounds, warmup=1, device=device)
        best = min((s for s in race if s != "auto"), key=lambda s: race[s].median_ms)
        ours = min((s for s in ("naive", "loop", "grouped") if s in race), key=lambda s: race[s].median_ms)
        pick = resolve_strategy("auto", device, t * k, num_experts=n, tokens=t)
        rows.append({"shape": shape, "d": d, "f": f, "N": n, "k": k, "T": t, "race": race, "best": best,
                     "ours": ours, "pick": pick})
        print(_grid_line(rows[-1]), flush=True)
    return rows


GRID_COLS = ("naive", "loop", "grouped", "hf eager", "hf grouped_mm", "auto")


def grid_header() -> str:
    return (f"{'shape':<7}{'N':>3}{'k':>3}{'T':>6}  " + "".join(f"{c:>14}" for c in GRID_COLS)
            + f"  {'auto picks':<10} {'best':<14}{'auto/best':>10}{'pick/best':>10}")


def _grid_line(row) -> str:
    race = row["race"]
    cells = "".join(f"{race[c].median_ms:14.3f}" if c in race else f"{'-':>14}" for c in GRID_COLS)
    best = race[row["best"]]
    return (f"{row['shape']:<7}{row['N']:>3}{row['k']:>3}{row['T']:>6}  {cells}  {row['pick']:<10} "
            f"{row['best']:<14}{race['auto'].median_ms / best.median_ms:10.2f}"
            f"{race[row['pick']].median_ms / best.median_ms:10.2f}")


def grid_report(quick: bool, device: torch.device, hf: bool, only: str | None = None) -> None:
    print(f"grid: SwiGLU experts, forward at inference, ms per call (median of interleaved rounds);"
          f" naive only where T*k <= {NAIVE_MAX_ASSIGNMENTS}"
          + ("; --quick leaves out OLMoE's shapes at T=4096" if quick else ""))
    print(grid_header())
    rows = grid(quick, device, hf, only)
    ratios = [r["race"]["auto"].median_ms / r["race"][r["best"]].median_ms for r in rows]
    picks = [r["race"][r["pick"]].median_ms / r["race"][r["best"]].median_ms for r in rows]
    ours = [r["race"][r["pick"]].median_ms / r["race"][r["ours"]].median_ms for r in rows]
    print(f"\n{len(rows)} cells. auto/best: median {statistics.median(ratios):.2f}, max {max(ratios):.2f}; "
          f"cells over 1.10: {sum(x > 1.10 for x in ratios)}")
    print(f"auto's pick vs the best of naive/loop/grouped (same race): max {max(ours):.2f}, "
          f"cells over 1.10: {sum(x > 1.10 for x in ours)}")
    for r, a, p in zip(rows, ratios, picks):
        if a > 1.10:
            res = r["race"]
            print(f"  over: {r['shape']} N={r['N']} k={r['k']} T={r['T']}: auto "
                  f"{res['auto'].median_ms:.3f} [{res['auto'].p10_ms:.3f}-{res['auto'].p90_ms:.3f}] vs "
                  f"{r['best']} {res[r['best']].median_ms:.3f} [{res[r['best']].p10_ms:.3f}-"
                  f"{res[r['best']].p90_ms:.3f}] ms; auto's pick {r['pick']} at {p:.2f}x best")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--grid", action="store_true", help="the (shape, N, k, T) grid, inference")
    parser.add_argument("--no-hf", action="store_true", help="leave out transformers' experts")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 keeps a busy shared machine's timings meaningful)")
    parser.add_argument("--only", default=None, help="--grid: only this shape (course or OLMoE)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"grouped_mm available: {hasattr(F, 'grouped_mm')}")
    if args.grid:
        return grid_report(args.quick, device, not args.no_hf, args.only)
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
