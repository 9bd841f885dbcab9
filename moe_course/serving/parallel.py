r"""Expert parallelism on ``torch.distributed`` (chapter 13, "Serving a compressed MoE").

When the experts of one MoE layer outgrow a device, each of the ``P`` ranks of a process group keeps
a contiguous shard of them (GShard, Lepikhin et al. 2021; DeepSpeed-MoE, Rajbhandari et al. 2022)
while the router, the shared experts and everything outside the MoE layer stay replicated. One
forward on rank ``r`` with its own tokens ``X_r``:

1. route locally: :math:`(w, i) = \mathrm{TopK}(\mathrm{softmax}(X_r W_g), k)`, capacity mask on
   the local batch, :math:`C = \lceil cf \cdot T_r k / N \rceil` (GShard's per-group capacity);
2. **dispatch all-to-all**: every kept assignment (token ``t``, expert ``e``) sends the row
   :math:`x_t` to the rank owning ``e``; split sizes differ per rank pair (``all_to_all_single``
   with uneven splits, preceded by an all-to-all of the counts);
3. each rank runs its experts on the rows it received (any dispatch strategy);
4. **combine all-to-all**: results travel back along the reverse splits, and
   :math:`y_t = \sum_j w_{t,j} E_{i_{t,j}}(x_t)` (+ shared experts) is formed where the token lives.

So rank ``r``'s output equals ``SparseMoE(X_r)`` on the same weights, and the gradient of an
expert's weights is the sum over all ranks' tokens routed to it (tests: 2 and 4 CPU processes).
Both all-to-alls are differentiable (torch's functional ``all_to_all_single_autograd``).
Per step, :attr:`ExpertParallelMoE.last_comm` records the rows and bytes each exchange sent to
*other* ranks: the quantity that compression changes (fewer active experts, capacity limits and a
lower-precision ``payload_dtype`` all shrink it).

Running on several GPUs or nodes (NCCL), one process per GPU::

    torchrun --nproc-per-node 4 my_script.py        # my_script calls dist.init_process_group("nccl")
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint HOST:29500 my_script.py

and in the script ``ep = ExpertParallelMoE.from_sparse(moe).to(f"cuda:{local_rank}")``. The course
tests this module with gloo on CPU processes of one machine only; the NCCL and multi-node paths are
the same code but have not been run at that scale.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn

from moe_course.dispatch import capacity_mask, dispatch
from moe_course.layers import CompressedExperts, Experts, MoELayer, SparseMoE

__all__ = ["ExpertParallelMoE", "shard_bounds", "alltoall_bytes"]


def shard_bounds(num_experts: int, world_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``: contiguous expert ranges per rank, sizes differing by at most one."""
    if world_size < 1 or num_experts < world_size:
        raise ValueError(f"world_size: expected 1 <= world_size <= num_experts={num_experts}, got {world_size}")
    base, extra = divmod(num_experts, world_size)
    bounds, start = [], 0
    for rank in range(world_size):
        stop = start + base + (rank < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def _all_to_all(x: torch.Tensor, send_counts: list[int], recv_counts: list[int], group) -> torch.Tensor:
    """Differentiable uneven all-to-all of the rows of ``x`` (its backward is the reverse exchange)."""
    group = group if group is not None else dist.group.WORLD
    try:  # torch >= 2.3: the functional collective with autograd
        from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor
    except ImportError:  # older torch: the autograd wrapper in torch.distributed.nn
        from torch.distributed.nn.functional import all_to_all_single

        out = x.new_empty((sum(recv_counts), *x.shape[1:]))
        return all_to_all_single(out, x, output_split_sizes=recv_counts, input_split_sizes=send_counts, group=group)
    return wait_tensor(all_to_all_single_autograd(x.contiguous(), recv_counts, send_counts, group))


class ExpertParallelMoE(MoELayer):
    """A :class:`~moe_course.layers.SparseMoE` whose experts are sharded over a process group.

    Build it with :meth:`from_sparse` on every rank (same weights everywhere, e.g. the same zoo
    model); each rank then calls it on its own tokens. ``payload_dtype`` (e.g. ``torch.bfloat16``)
    sends the rows in that precision and computes the experts in the input's dtype again.
    """

    def __init__(self, router, experts: Experts, shared: Experts | None, *, num_experts: int, start: int,
                 bounds: list[tuple[int, int]], capacity_factor: float | None, dispatch_strategy: str,
                 group=None, payload_dtype: torch.dtype | None = None):
        super().__init__()
        self.router, self.experts, self.shared = router, experts, shared
        self.total_experts, self.start, self.bounds = num_experts, start, bounds
        self.capacity_factor, self.dispatch, self.group, self.payload_dtype = (
            capacity_factor, dispatch_strategy, group, payload_dtype)
        self.last_comm: dict[str, int] = {}

    @classmethod
    def from_sparse(cls, moe: SparseMoE, group=None, *, payload_dtype: torch.dtype | None = None
                    ) -> "ExpertParallelMoE":
        """This rank's shard of ``moe`` (copied; ``moe`` is not modified). Call on every rank of ``group``."""
        if not isinstance(moe, SparseMoE):
            raise TypeError(f"moe: expected a moe_course.layers.SparseMoE, got {type(moe).__name__}")
        if isinstance(moe.experts, CompressedExperts):
            raise TypeError("moe: its experts are compressed (quantized or low-rank); shard the fp32 layer, "
                            "then compress each rank's shard")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call dist.init_process_group first "
                               "(gloo on CPU, nccl on GPUs), e.g. under torchrun")
        if payload_dtype is not None and not (isinstance(payload_dtype, torch.dtype) and payload_dtype.is_floating_point):
            raise TypeError(f"payload_dtype: expected None or a floating torch.dtype, got {payload_dtype!r}")
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        bounds = shard_bounds(moe.num_experts, world)
        start, stop = bounds[rank]
        src = moe.experts
        shard = Experts(stop - start, src.d_model, src.d_hidden, src.activation)
        with torch.no_grad():
            for name in ("w_in", "w_gate", "w_out"):
                if getattr(src, name) is not None:
                    getattr(shard, name).copy_(getattr(src, name)[start:stop])
        shard.to(src.w_in.device)
        return cls(copy.deepcopy(moe.router), shard, copy.deepcopy(moe.shared), num_experts=moe.num_experts,
                   start=start, bounds=bounds, capacity_factor=moe.capacity_factor, dispatch_strategy=moe.dispatch,
                   group=group, payload_dtype=payload_dtype)

    @property
    def num_experts(self) -> int:  # the layer's experts, not this rank's shard
        return self.total_experts

    def capacity(self, num_tokens: int) -> int | None:
        return SparseMoE.capacity(self, num_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self._flatten_input(x)
        r = self.router(flat)
        cap = self.capacity(flat.shape[0])
        if cap is not None:
            r = replace(r, keep=capacity_mask(r.indices, self.num_experts, cap))
        # 1. the kept assignments, ordered by the rank that owns their expert
        tokens = torch.arange(flat.shape[0], device=flat.device).repeat_interleave(self.k)
        experts, gates = r.indices.reshape(-1), r.weights.reshape(-1)
        if r.keep is not None:
            kept = r.keep.reshape(-1)
            tokens, experts, gates = tokens[kept], experts[kept], gates[kept]
        starts = torch.tensor([b[0] for b in self.bounds[1:]], device=flat.device)
        owner = torch.bucketize(experts, starts, right=True)
        order = torch.argsort(owner, stable=True)
        tokens, experts, gates, owner = tokens[order], experts[order], gates[order], owner[order]
        world = len(self.bounds)
        send = torch.bincount(owner, minlength=world)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)  # how many rows each rank will get
        send_counts, recv_counts = send.tolist(), recv.tolist()
        # 2. dispatch all-to-all: token rows and the expert ids they are for
        rows = flat[tokens]
        rows = rows if self.payload_dtype is None else rows.to(self.payload_dtype)
        got_rows = _all_to_all(rows, send_counts, recv_counts, self.group).to(flat.dtype)
        got_ids = torch.empty(sum(recv_counts), dtype=experts.dtype, device=flat.device)
        dist.all_to_all_single(got_ids, experts, recv_counts, send_counts, group=self.group)
        # 3. this rank's experts on what it received (each row goes to exactly one expert, weight 1)
        local = got_ids - self.start
        out = dispatch(got_rows, torch.ones_like(local, dtype=got_rows.dtype)[:, None], local[:, None],
                       self.experts, self.dispatch)
        out = out if self.payload_dtype is None else out.to(self.payload_dtype)
        # 4. combine all-to-all back along the reverse splits, then mix with the gates where tokens live
        back = _all_to_all(out, recv_counts, send_counts, self.group).to(flat.dtype)
        y = torch.zeros_like(flat).index_add(0, tokens, back * gates[:, None].to(flat.dtype))
        if self.shared is not None:
            y = y + self.shared.forward_all(flat).sum(dim=0)
        rank = dist.get_rank(self.group)
        width = flat.shape[1] * (rows.element_size())
        self.last_comm = {
            "rows_sent": sum(n for p, n in enumerate(send_counts) if p != rank),
            "rows_received": sum(n for p, n in enumerate(recv_counts) if p != rank),
            # both exchanges: rows out and results back (plus 8-byte expert ids out)
            "bytes_sent": sum(n for p, n in enumerate(send_counts) if p != rank) * (width + 8)
            + sum(n for p, n in enumerate(recv_counts) if p != rank) * width,
        }
        self._record(r)
        return y.reshape(x.shape)

    def extra_repr(self) -> str:
        stop = self.start + self.experts.num_experts
        return (f"experts {self.start}..{stop - 1} of {self.total_experts}, k={self.k}, "
                f"capacity_factor={self.capacity_factor}, payload_dtype={self.payload_dtype}")


def alltoall_bytes(indices: torch.Tensor, num_experts: int, world_size: int, d_model: int, *,
                   payload_bytes: int = 4, capacity_factor: float | None = None,
                   split: list[int] | None = None) -> dict[str, float]:
    """What :class:`ExpertParallelMoE` would send between ranks for these routing decisions, without
    starting any process.

    ``indices`` ``[T, k]`` are a layer's expert choices for ``T`` tokens, split over ``world_size``
    ranks in contiguous chunks (``torch.chunk``, or ``split`` tokens per rank); experts are
    sharded by :func:`shard_bounds`. An assignment whose expert lives on another rank sends its row
    out and its result back (``d_model * payload_bytes`` each way) plus an 8-byte expert id, the
    accounting of :attr:`ExpertParallelMoE.last_comm`. ``capacity_factor`` applies each rank's
    capacity mask first. Returns ``{"bytes_per_token", "cross_rows_per_token", "kept_fraction"}``.
    """
    if not torch.is_tensor(indices) or indices.dim() != 2:
        raise ValueError("indices: expected a [T, k] tensor of expert ids")
    bounds = shard_bounds(num_experts, world_size)
    starts = torch.tensor([b[0] for b in bounds[1:]], dtype=indices.dtype)
    cross = kept_total = 0
    chunks = indices.chunk(world_size) if split is None else indices.split(list(split))
    if len(chunks) > world_size:
        raise ValueError(f"split: expected at most world_size={world_size} parts, got {len(chunks)}")
    for rank, chunk in enumerate(chunks):
        if chunk.numel() == 0:
            continue
        keep = torch.ones_like(chunk, dtype=torch.bool)
        if capacity_factor is not None:
            cap = math.ceil(capacity_factor * chunk.shape[0] * chunk.shape[1] / num_experts)
            keep = capacity_mask(chunk, num_experts, cap)
        owner = torch.bucketize(chunk, starts, right=True)
        cross += int(((owner != rank) & keep).sum())
        kept_total += int(keep.sum())
    tokens = indices.shape[0]
    return {"bytes_per_token": cross * (2 * d_model * payload_bytes + 8) / tokens,
            "cross_rows_per_token": cross / tokens, "kept_fraction": kept_total / indices.numel()}
