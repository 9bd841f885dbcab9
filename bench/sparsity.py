"""Wanda against magnitude pruning of the experts, unstructured and 2:4, on the zoo models.

    python bench/sparsity.py            # both zoo models
    python bench/sparsity.py --quick    # the language model only
    python bench/sparsity.py --timing-only   # the 2:4 kernel timing alone (CUDA)

For each variant: the quality (perplexity, or error rate in %), the experts' true bytes (2:4:
fp16 kept values plus 2-bit positions; unstructured: CSR with int32 indices, as
``pruning.sparsity_report`` counts it) and, where CUDA is present, the time of one expert matmul
with ``torch.sparse.to_sparse_semi_structured`` against the dense fp16 one (interleaved rounds).
Without CUDA the timing line says so: 2:4 kernels exist only for sparse tensor cores.
"""

from __future__ import annotations

import argparse

import torch

from moe_course import metrics, zoo
from moe_course.compress.pruning import sparsity_report
from moe_course.compress.sparsity import sparsify
from moe_course.layers import moe_layers
from moe_course.train import evaluate


def quality(model, val, name):
    r = evaluate(model, val)
    return r["perplexity"] if name == "shakespeare-moe" else 100 * (1 - r["accuracy"])


def expert_bytes(model) -> int:
    return sum(b.numel() * b.element_size() for layer in moe_layers(model) for b in
               list(layer.experts.buffers()) + list(layer.experts.parameters()))


def cuda_timing() -> None:
    if not torch.cuda.is_available():
        print("2:4 kernel timing: no CUDA device here (torch.sparse.to_sparse_semi_structured needs "
              "sparse tensor cores, compute capability 8.0+)")
        return
    from torch.sparse import to_sparse_semi_structured

    from moe_course.compress.sparsity import nm_mask

    for d, f, t in [(2048, 1024, 64), (2048, 1024, 4096)]:
        w = torch.randn(f, d, device="cuda", dtype=torch.float16)
        w = w * nm_mask(w.T.abs().float()).T.to(w.dtype)
        sw = to_sparse_semi_structured(w)
        x = torch.randn(t, d, device="cuda", dtype=torch.float16)
        res = metrics.latency_race({"dense fp16": lambda: x @ w.T, "2:4 fp16": lambda: (sw @ x.T).T},
                                   None, rounds=50, device="cuda")
        print(f"d={d} f={f} T={t}: dense {res['dense fp16'].median_ms:.3f} ms, 2:4 "
              f"{res['2:4 fp16'].median_ms:.3f} ms -> "
              f"{metrics.speedup_verdict(res['dense fp16'], res['2:4 fp16'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--timing-only", action="store_true", help="only the CUDA 2:4 kernel timing")
    args = ap.parse_args()
    if args.timing_only:
        return cuda_timing()
    torch.manual_seed(0)
    for name in (["shakespeare-moe"] if args.quick else ["shakespeare-moe", "mnist1d-moe"]):
        model, data = zoo.pretrained(name, progress=False), zoo.data(name)
        n_cal, n_val = (64, 256) if name == "shakespeare-moe" else (512, 2000)
        cal = data["train"].shuffle(seed=0).select(range(n_cal))
        val = data["validation"].select(range(min(n_val, len(data["validation"]))))
        base = quality(model, val, name)
        print(f"\n{name}: fp32 {base:.4f}, experts {expert_bytes(model):,} B")
        print(f"{'variant':<28} {'quality':>9} {'expert bytes':>13}")
        for label, kw in [("magnitude 50% unstructured", dict(score="magnitude")),
                          ("Wanda 50% unstructured", dict(score="wanda")),
                          ("magnitude 2:4", dict(score="magnitude", pattern="2:4")),
                          ("Wanda 2:4", dict(score="wanda", pattern="2:4"))]:
            m = sparsify(model, 0.5, calib=cal, **kw)
            size = (expert_bytes(m) if kw.get("pattern") == "2:4"
                    else int(sparsity_report(m, index_bytes=4)["csr bytes"]))
            print(f"{label:<28} {quality(m, val, name):>9.4f} {size:>13,}")
    cuda_timing()


if __name__ == "__main__":
    main()
