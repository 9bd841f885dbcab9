"""Decode-step expert compute at OLMoE's shapes on one device: the memory roofline against real kernels.

    python bench/gpu_kernels.py                 # the best device here (CUDA if present)
    python bench/gpu_kernels.py --device cpu --quick

One MoE layer at OLMoE-1B-7B's expert shapes (d 2048, f 1024, 64 SwiGLU experts, top-8). A decode
step of B tokens touches the distinct experts its tokens route to; each expert is three matrix
products (gate, up, down). Variants, all on the same random weights, in interleaved rounds:

* ``fp32`` / ``bf16``: plain ``x @ W.T`` per routed expert;
* ``int8 w-only``: ``torch._weight_int8pack_mm`` (int8 weights per output channel, bf16 activations);
* ``int4 w-only g128``: ``torch._weight_int4pack_mm`` (tinygemm's packed 4-bit groups; on CPU the
  ``_for_cpu`` twins);
* ``bf16 grouped_mm``: ``torch._grouped_mm`` over the routed experts (one kernel for all of them,
  as transformers' ``grouped_mm`` experts run), where the device supports it;
* each of the above once more replayed from a **CUDA graph** (CUDA only): a decode step launches
  24 small kernels, and at batch 1 the launches, not the bytes, can set the time.

Before timing, each variant's output is checked against the fp32 result on the same (dequantized)
weights. The roofline line predicts ``bytes of the routed experts' weights / copy bandwidth``, with
the bandwidth measured here by a large device-to-device copy. Variants an op or dtype does not
support on this device print why and are skipped.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

D, F, N, K = 2048, 1024, 64, 8


def timer(device: torch.device):
    if device.type == "cuda":
        def run(fn, reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / reps
    else:
        def run(fn, reps):
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            return (time.perf_counter() - t) * 1e3 / reps
    return run


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a large copy (GB/s)."""
    n = (1 << 28) if device.type == "cuda" else (1 << 25)
    a = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    b = torch.empty_like(a)
    run = timer(device)
    run(lambda: b.copy_(a), 3)
    ms = min(run(lambda: b.copy_(a), 10) for _ in range(3))
    return 2 * a.numel() * 4 / (ms * 1e-3) / 1e9


def quant_int8(w: torch.Tensor):
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127
    q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
    return q, scale.squeeze(1), q.float() * scale


def quant_int4(w: torch.Tensor, group: int):
    """tinygemm's affine 4-bit groups: w ~ (q - 8) * scale + zero, q in 0..15."""
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    q = torch.round((g - lo) / scale).clamp(0, 15)
    deq = (q * scale + lo).reshape(n, k)
    zero = lo + 8 * scale
    scales_zeros = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], dim=-1).transpose(0, 1).contiguous()
    return q.reshape(n, k).to(torch.int32), scales_zeros, deq


def pack_int4(q: torch.Tensor, device: torch.device):
    if device.type == "cpu":
        return torch._convert_weight_to_int4pack_for_cpu(q, 1)
    packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    return torch._convert_weight_to_int4pack(packed, 8)


def build(device: torch.device, group: int):
    torch.manual_seed(0)
    mats = {name: torch.randn(N, rows, cols, device=device) * cols ** -0.5
            for name, rows, cols in (("gate", F, D), ("up", F, D), ("down", D, F))}
    out = {"fp32": {}, "bf16": {}, "int8": {}, "int4": {}, "ref8": {}, "ref4": {}}
    for name, w in mats.items():
        out["fp32"][name] = w
        out["bf16"][name] = w.to(torch.bfloat16)
        q8 = [quant_int8(w[e]) for e in range(N)]
        out["int8"][name] = [(q, s.to(torch.bfloat16)) for q, s, _ in q8]
        out["ref8"][name] = torch.stack([d for _, _, d in q8])
        try:
            q4 = [quant_int4(w[e], group) for e in range(N)]
            out["int4"][name] = [(pack_int4(q, device), sz.to(torch.bfloat16)) for q, sz, _ in q4]
            out["ref4"][name] = torch.stack([d for _, _, d in q4])
        except (RuntimeError, AttributeError, NotImplementedError) as err:
            out["int4"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            break
    return out


def swiglu(mm, x, routes):
    """``routes``: expert -> indices of the tokens routed to it (gate weights left out: equal cost)."""
    y = torch.zeros_like(x)
    for e, tok in routes.items():
        xe = x[tok]
        h = torch.nn.functional.silu(mm("gate", e, xe)) * mm("up", e, xe)
        y.index_add_(0, tok, mm("down", e, h))
    return y


def variants(w, device: torch.device, group: int):
    out = {}
    out["fp32"] = (lambda n, e, x: x @ w["fp32"][n][e].T, torch.float32, "fp32")
    out["bf16"] = (lambda n, e, x: x @ w["bf16"][n][e].T, torch.bfloat16, "fp32")
    if hasattr(torch, "_weight_int8pack_mm"):
        out["int8 w-only"] = (lambda n, e, x: torch._weight_int8pack_mm(x, *w["int8"][n][e]), torch.bfloat16, "ref8")
    if isinstance(w["int4"], dict):
        op = torch._weight_int4pack_mm_for_cpu if device.type == "cpu" else torch._weight_int4pack_mm
        out[f"int4 w-only g{group}"] = (lambda n, e, x: op(x, w["int4"][n][e][0], group, w["int4"][n][e][1]),
                                        torch.bfloat16, "ref4")
    else:
        print(f"int4 packing unavailable here: {w['int4']}")
    return out


def grouped_plan(routes, device):
    """Index tensors made once, outside the timed (and graph-captured) step."""
    ex = torch.tensor(list(routes), device=device)
    tok = torch.cat(list(routes.values()))
    offs = torch.tensor([len(t) for t in routes.values()], device=device).cumsum(0).to(torch.int32)
    return ex, tok, offs


def grouped(w, x, plan):
    """Every routed (token, expert) pair in three grouped GEMMs (torch._grouped_mm, bf16)."""
    ex, tok, offs = plan
    xs = x[tok]
    gate = torch._grouped_mm(xs, w["bf16"]["gate"][ex].transpose(1, 2), offs=offs)
    up = torch._grouped_mm(xs, w["bf16"]["up"][ex].transpose(1, 2), offs=offs)
    h = torch.nn.functional.silu(gate) * up
    y = torch._grouped_mm(h, w["bf16"]["down"][ex].transpose(1, 2), offs=offs)
    return torch.zeros_like(x).index_add_(0, tok, y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--group", type=int, default=128)
    args = ap.parse_args()
    device = torch.device(args.device)
    rounds, reps = (3, 5) if args.quick else (7, 20)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    bw = copy_bandwidth(device)
    print(f"torch {torch.__version__} on {name}; copy bandwidth {bw:.0f} GB/s (read + write)")
    w = build(device, args.group)
    run = timer(device)
    for batch in (1, 8, 32):
        g = torch.Generator().manual_seed(batch)
        routed = torch.rand(batch, N, generator=g).topk(K, dim=-1).indices
        routes = {e: (routed == e).any(-1).nonzero().flatten().to(device) for e in routed.unique().tolist()}
        experts = list(routes)
        x32 = torch.randn(batch, D, generator=g).to(device)
        cases = variants(w, device, args.group)
        fns, bytes_per = {}, {"fp32": 4, "bf16": 2, "int8 w-only": 1 + 2 / D}
        ref = swiglu(lambda n, e, x: x @ w["fp32"][n][e].T, x32, routes)
        for label, (mm, dt, ref_key) in cases.items():
            x = x32.to(dt)
            try:
                y = swiglu(mm, x, routes).float()
                truth = ref if ref_key == "fp32" else swiglu(lambda n, e, xx: xx @ w[ref_key][n][e].T, x32, routes)
                err = ((y - truth).norm() / truth.norm()).item()
                if err > 0.05:
                    print(f"  {label}: output off by {err:.3f} (relative); skipped")
                    continue
                fns[label] = (lambda mm=mm, x=x: swiglu(mm, x, routes))
            except (RuntimeError, NotImplementedError) as exc:
                print(f"  {label}: unavailable on {device.type} ({str(exc).splitlines()[0][:120]})")
        if device.type == "cuda" and hasattr(torch, "_grouped_mm"):
            xb = x32.to(torch.bfloat16)
            try:
                plan = grouped_plan(routes, device)
                y = grouped(w, xb, plan).float()
                err = ((y - ref).norm() / ref.norm()).item()
                if err < 0.05:
                    fns["bf16 grouped_mm"] = lambda xb=xb, plan=plan: grouped(w, xb, plan)
                else:
                    print(f"  bf16 grouped_mm: output off by {err:.3f}; skipped")
            except (RuntimeError, NotImplementedError) as exc:
                print(f"  bf16 grouped_mm: unavailable ({str(exc).splitlines()[0][:120]})")
        if device.type == "cuda":
            for label, fn in list(fns.items()):
                try:
                    fn()
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        fn()
                    fns[f"{label} (CUDA graph)"] = graph.replay
                except (RuntimeError, NotImplementedError) as exc:
                    print(f"  {label}: no CUDA graph ({str(exc).splitlines()[0][:100]})")
        times = {label: [] for label in fns}
        for fn in fns.values():
            run(fn, 2)
        for r in range(rounds):
            order = list(fns)[r % len(fns):] + list(fns)[:r % len(fns)]
            for label in order:
                times[label].append(run(fns[label], reps))
        n_bytes = lambda per: len(experts) * 3 * D * F * per
        print(f"\nB={batch}: {len(experts)} distinct experts of {N} touched; median [min-max] over {rounds} rounds")
        base = statistics.median(times["fp32"])
        for label, ts in times.items():
            med = statistics.median(ts)
            kind = label.split(" (")[0]
            per = bytes_per.get(kind, 0.5 + 4 / args.group if kind.startswith("int4") else None)
            roof = f"roofline {n_bytes(per) / (bw * 1e9) * 1e3:7.3f} ms" if per else ""
            print(f"  {label:<32}{med:8.3f} ms [{min(ts):.3f}-{max(ts):.3f}]  {base / med:5.2f}x fp32  {roof}")


if __name__ == "__main__":
    main()
