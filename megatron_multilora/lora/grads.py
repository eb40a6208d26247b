"""LoRA gradients: where they live, and summing the partial ones after all micro-batches of a step (like
megatron's finalize_model_grads).

Gradients are token-SUMS (never means) until the optimizer scales each slot by its own token count, so plain
all-reduce sums are exactly right: over the data-parallel group (the expert-data-parallel group for expert
LoRA), and over the (expert) tensor-parallel group for replicated factors whose gradient is a partial sum
(a sequence shard, or an expert's share under the dispatcher's communication).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..optim import norm_group, slot_runs


class _Flat:
    """One [slots, width] buffer: the gradients of params of one norm group and dtype, side by side."""

    def __init__(self, params, norm_group: str):
        self.norm_group = norm_group
        # Columns: per partial-sum TP group (None first), norm-duplicate params last within each, so that
        # every collective and the norm reduce a column range.
        order = sorted(params, key=lambda p: (self.partial_key(p), bool(getattr(p, "norm_duplicate", False))))
        widths = [p[0].numel() for p in order]
        self.buffer = torch.zeros(order[0].shape[0], sum(widths), dtype=order[0].dtype, device=order[0].device)
        self.params, self.views = order, []
        self.partial: dict[tuple, tuple[object, int, int]] = {}  # ranks -> (group, first col, end col)
        self.norm_cols: list[tuple[int, int]] = []  # column ranges counted in the norm
        col = 0
        for p, width in zip(order, widths):
            view = self.buffer[:, col:col + width].view(p.shape)
            p.grad = view
            self.views.append(view)
            group, key = getattr(p, "partial_grad_group", None), self.partial_key(p)
            if group is not None:
                first = self.partial.get(key, (group, col, col))[1]
                self.partial[key] = (group, first, col + width)
            if not getattr(p, "norm_duplicate", False):
                if self.norm_cols and self.norm_cols[-1][1] == col:
                    self.norm_cols[-1] = (self.norm_cols[-1][0], col + width)
                else:
                    self.norm_cols.append((col, col + width))
            col += width

    @staticmethod
    def partial_key(p) -> tuple:
        group = getattr(p, "partial_grad_group", None)
        return () if group is None else tuple(dist.get_process_group_ranks(group))

    def check(self) -> None:
        for p, view in zip(self.params, self.views):
            if p.grad is not view:
                raise RuntimeError("a LoRA parameter's .grad was replaced; the flat gradient buffer no longer "
                                   "backs it (zero gradients with GradBuffer.zero, never by assigning .grad)")

    def all_reduce_rows(self, slots: list[int], group, cols: tuple[int, int] | None = None) -> None:
        """Sum rows `slots` (columns `cols`, default all) over `group`: one collective, in place when the
        rows and columns form one contiguous block."""
        lo, hi = cols if cols is not None else (0, self.buffer.shape[1])
        runs = slot_runs(slots)
        whole = lo == 0 and hi == self.buffer.shape[1]
        if len(runs) == 1 and whole:
            dist.all_reduce(self.buffer.narrow(0, *runs[0]), group=group)
            return
        index = torch.tensor(slots, dtype=torch.long, device=self.buffer.device)
        rows = self.buffer.index_select(0, index)
        block = rows if whole else rows[:, lo:hi].contiguous()
        dist.all_reduce(block, group=group)
        if not whole:
            rows[:, lo:hi] = block
        self.buffer.index_copy_(0, index, rows)


class GradBuffer:
    """The LoRA gradients of a model in flat [slots, width] buffers (one per norm group and dtype) that every
    LoRA parameter's `.grad` is a view into, as megatron's DDP keeps its grads in one contiguous buffer. Row k
    holds slot k's gradient of every parameter, so the per-step work is per active slot, not per parameter:
    zeroing, the all-reduces (one collective per group, over the rows of the step's slots only: idle resident
    slots are never communicated) and the per-slot squared norms the optimizer clips by."""

    def __init__(self, params):
        params = list(params)
        keys: dict[tuple, list] = {}
        for p in params:
            keys.setdefault((norm_group(p), p.dtype), []).append(p)
        self.flats = [_Flat(ps, group) for (group, _), ps in keys.items()]

    def zero(self, slots=None) -> None:
        """Zero the rows of `slots` (the slots that had samples in the last step -- the only rows that can be
        nonzero), or every row; idle resident slots cost nothing."""
        for flat in self.flats:
            flat.check()
            if slots is None:
                flat.buffer.zero_()
            else:
                for first, count in slot_runs(sorted(slots)):
                    flat.buffer.narrow(0, first, count).zero_()

    def sync(self, slots) -> None:
        """After all micro-batches: sum the partial gradients of the rows of `slots` (every rank passes the
        same slots: the step's)."""
        from megatron.core import parallel_state as ps

        slots = sorted(slots)
        if not slots:
            return
        for flat in self.flats:
            flat.check()
            for key in sorted(flat.partial):  # the same order on every rank
                group, lo, hi = flat.partial[key]
                if dist.get_world_size(group) > 1:
                    flat.all_reduce_rows(slots, group, (lo, hi))
            dp = ps.get_expert_data_parallel_group() if flat.norm_group == "expert" else ps.get_data_parallel_group()
            if dist.get_world_size(dp) > 1:
                flat.all_reduce_rows(slots, dp)

    def sq_norms(self, slots: list[int]) -> dict[str, torch.Tensor]:
        """{norm group: fp32 [len(slots)]} squared L2 norms of the raw gradient rows of `slots` (sorted), over
        the parameters counted in the norm (not the replicas marked norm_duplicate). Each row is reduced on
        its own, so a slot's value does not depend on which other slots are asked for."""
        out: dict[str, torch.Tensor] = {}
        for flat in self.flats:
            flat.check()
            sq = torch.zeros(len(slots), dtype=torch.float32, device=flat.buffer.device)
            at = 0
            for first, count in slot_runs(slots):
                rows = flat.buffer.narrow(0, first, count)
                for lo, hi in flat.norm_cols:
                    norm = torch.linalg.vector_norm(rows[:, lo:hi], 2, dim=1, dtype=torch.float32)
                    sq[at:at + count] += norm.square()
                at += count
            out[flat.norm_group] = out[flat.norm_group] + sq if flat.norm_group in out else sq
        return out
