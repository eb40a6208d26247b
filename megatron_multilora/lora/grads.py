"""LoRA gradients after all micro-batches of a step: sum the partial ones, like megatron's finalize_model_grads.

Gradients are token-SUMS (never means) until the optimizer scales each slot by its own token count, so plain
all-reduce sums are exactly right: over the data-parallel group (the expert-data-parallel group for expert
LoRA), and over the (expert) tensor-parallel group for replicated factors whose gradient is a partial sum
(a sequence shard, or an expert's share under the dispatcher's communication).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def zero_grads(params, slots=None) -> None:
    """Allocate (once) and zero the gradient buffers the LoRA ops accumulate into. `slots`: only those rows
    (the slots that had samples in the last step -- the only rows that can be nonzero), so idle resident
    slots cost nothing here."""
    index = None if slots is None else torch.as_tensor(sorted(slots), dtype=torch.long)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        elif index is None:
            p.grad.zero_()
        elif len(index):
            p.grad.index_fill_(0, index.to(p.grad.device), 0.0)


def _all_reduce_coalesced(tensors, group) -> None:
    if not tensors or dist.get_world_size(group) == 1:
        return
    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat, group=group)
    for t, synced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        t.copy_(synced)


def sync_grads(params) -> None:
    from megatron.core import parallel_state as ps

    grads = [p.grad for p in params]
    by_group = {}
    for p in params:
        group = getattr(p, "partial_grad_group", None)
        if group is not None:
            by_group.setdefault(group, []).append(p.grad)
    for group in sorted(by_group, key=lambda g: dist.get_process_group_ranks(g)):  # same order on every rank
        _all_reduce_coalesced(by_group[group], group)
    expert = [g for p, g in zip(params, grads) if getattr(p, "norm_group", "dense") == "expert"]
    dense = [g for p, g in zip(params, grads) if getattr(p, "norm_group", "dense") != "expert"]
    _all_reduce_coalesced(dense, ps.get_data_parallel_group())
    _all_reduce_coalesced(expert, ps.get_expert_data_parallel_group())
