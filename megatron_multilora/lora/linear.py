"""Slot-indexed LoRA on megatron-core's column- and row-parallel linears (TP and sequence-parallel correct).

Sharding (the one place that decides it; checkpoints and initialisation follow `global_shape` / `shard`):
- Column-parallel base (linear_qkv, linear_fc1; W is split on its output rows): A [r, in] is replicated and
  B [out, r] is split on its rows exactly like W, so B's rows keep W's layout (fused QKV groups, SwiGLU
  [gate; up] per rank). Only the rank-sized h = x A^T crosses ranks: without SP it enters the TP region with
  megatron's copy (backward all-reduce, so dA sees every rank's dY B); with SP it is all-gathered along the
  sequence (backward reduce-scatter) and dA, computed from local tokens, is partial: A is marked
  `partial_grad_group` so its gradient is summed over the TP group once per step, as megatron does for norms
  under sequence parallelism.
- Row-parallel base (linear_proj, linear_fc2; W split on its input columns): A [r, in] is split on its
  columns like W and B [out, r] is replicated. h = x_i A_i^T is a partial sum: all-reduced without SP,
  reduce-scattered along the sequence with SP (then B's gradient is partial and B is marked
  `partial_grad_group`).
Either way each factor is sharded along the same axis as the base weight and the other is replicated, and the
only collective is on h, which is rank-sized, not hidden-sized.
"""

from __future__ import annotations

import torch

from . import ops, routing as routing_lib
from .slots import EXPERT_TARGETS


class SlotLoRALinear:
    """Mixin placed in front of a megatron parallel linear's class: same module, same base state-dict keys,
    plus `lora_A` [slots, max_rank, in_local] and `lora_B` [slots, out_local, max_rank]."""

    lora_kind: str
    global_name: str

    def attach_lora(
        self, table, kind: str, global_name: str, *, column: bool, tp_group, sequence_parallel: bool,
        expert: bool = False,
    ):
        self.lora_kind, self.global_name, self.lora_column = kind, global_name, column
        self.lora_tp_group = tp_group
        self.lora_tp_size, self.lora_tp_rank = tp_group.size(), tp_group.rank()
        self.lora_sequence_parallel = sequence_parallel and self.lora_tp_size > 1
        # Experts under TP/EP leave their communication to the token dispatcher (megatron's
        # explicit_expert_comm): the dispatcher's all-gather / reduce-scatter already sum the partial inputs'
        # gradients and outputs, so h needs no collective of its own -- only the replicated factor's gradient,
        # computed from this rank's partial products, is summed over the (expert) TP group at step time.
        self.lora_dispatcher_comm = getattr(self, "explicit_expert_comm", False)
        # A gated fc1 stores [gate; up] and each TP rank holds [gate_i; up_i]: B's rows are split the same way.
        self.lora_out_blocks = 2 if kind.endswith("fc1") and self.config.gated_linear_unit else 1
        dtype, device = self.weight.dtype, self.weight.device
        a_shape = self.local_shape("a", table.max_rank)
        b_shape = self.local_shape("b", table.max_rank)
        self.lora_A = torch.nn.Parameter(torch.zeros(table.max_slots, *a_shape, dtype=dtype, device=device))
        self.lora_B = torch.nn.Parameter(torch.zeros(table.max_slots, *b_shape, dtype=dtype, device=device))
        sharded, replicated = (self.lora_B, self.lora_A) if column else (self.lora_A, self.lora_B)
        sharded.tensor_model_parallel = self.lora_tp_size > 1
        sharded.partition_dim = 1 if column else 2
        sharded.partition_stride = 1
        replicated.tensor_model_parallel = False
        replicated.norm_duplicate = self.lora_tp_rank != 0  # counted once in per-slot grad norms
        partial = self.lora_tp_size > 1 and (self.lora_sequence_parallel or self.lora_dispatcher_comm)
        # A gradient that is a partial sum over this TP group (summed once per step by lora.grads).
        replicated.partial_grad_group = tp_group if partial else None
        for p in (self.lora_A, self.lora_B):
            p.lora_param = True
            p.norm_group = "expert" if expert else "dense"
            if expert:
                p.allreduce = False  # megatron's mark of expert-parallel parameters

    # ---- sharding rules ----------------------------------------------------------------------------------
    def _full_in_out(self) -> tuple[int, int]:
        return self.input_size, self.output_size

    def _shard_axis(self, which: str) -> int | None:
        """Axis of the unsliced [r, in] (a) / [out, r] (b) tensor split over TP, None if replicated."""
        if self.lora_tp_size == 1:
            return None
        if self.lora_column:
            return 0 if which == "b" else None
        return 1 if which == "a" else None

    def global_shape(self, which: str, rank: int) -> tuple[int, ...]:
        fan_in, fan_out = self._full_in_out()
        return (rank, fan_in) if which == "a" else (fan_out, rank)

    def local_shape(self, which: str, rank: int) -> tuple[int, ...]:
        shape = list(self.global_shape(which, rank))
        axis = self._shard_axis(which)
        if axis is not None:
            shape[axis] //= self.lora_tp_size
        return tuple(shape)

    def shard(self, which: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's piece of a full (unsharded) A or B."""
        axis = self._shard_axis(which)
        if axis is None:
            return full
        blocks = full.chunk(self.lora_out_blocks if which == "b" else 1, dim=axis)
        return torch.cat([blk.chunk(self.lora_tp_size, dim=axis)[self.lora_tp_rank] for blk in blocks], dim=axis)

    def unshard(self, which: str, pieces: list[torch.Tensor]) -> torch.Tensor:
        """The inverse of `shard`: every TP rank's piece (in rank order) back to the full tensor."""
        axis = self._shard_axis(which)
        if axis is None:
            return pieces[0]
        blocks = self.lora_out_blocks if which == "b" else 1
        split = [p.chunk(blocks, dim=axis) for p in pieces]
        return torch.cat([torch.cat([s[i] for s in split], dim=axis) for i in range(blocks)], dim=axis)

    def shard_info(self, which: str) -> tuple[int | None, int, int]:
        """(axis, rank, size) of this rank's piece, for checkpoint offsets."""
        return self._shard_axis(which), self.lora_tp_rank, self.lora_tp_size

    # ---- slot access -----------------------------------------------------------------------------------
    def zero_slot(self, slot: int) -> None:
        with torch.no_grad():
            self.lora_A[slot].zero_()
            self.lora_B[slot].zero_()

    def set_slot(self, slot: int, a: torch.Tensor | None = None, b: torch.Tensor | None = None) -> None:
        """Write full (unsharded, rank-sliced) A [r, in] / B [out, r] into the slot; the rest of it is zero."""
        with torch.no_grad():
            if a is not None:
                self.lora_A[slot].zero_()
                self.lora_A[slot, : a.shape[0]] = self.shard("a", a).to(self.lora_A.dtype)
            if b is not None:
                self.lora_B[slot].zero_()
                self.lora_B[slot, :, : b.shape[1]] = self.shard("b", b).to(self.lora_B.dtype)

    def slot_shards(self, slot: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's pieces of the slot's A [r, in_local] and B [out_local, r], sliced to rank."""
        return self.lora_A[slot, :rank], self.lora_B[slot, :, :rank]

    # ---- forward ---------------------------------------------------------------------------------------
    def forward(self, input_, *args, **kwargs):
        if self.lora_kind in EXPERT_TARGETS:
            raise RuntimeError(f"{self.global_name}: an expert linear with LoRA runs only inside its MoE layer's "
                               "experts (lora/experts.py), which compute all local experts' linears at once")
        output, bias = super().forward(input_, *args, **kwargs)
        routing = routing_lib.current()
        if routing is None:
            return output, bias
        segments = routing.segments(self.lora_kind, routing.tokens_per_sample(input_.shape))
        if segments:
            output = ops.lora_add(output, input_, self.lora_A, self.lora_B, segments, self._middle, self.training,
                                  token_major=routing.token_major(input_.shape), dropout_shard=self._input_shard())
        return output, bias

    def _input_shard(self) -> tuple[int, int, int] | None:
        """(dim of [L, N, in], rank, size) when this rank's LoRA input is a feature slice of the whole one drawn
        from the generator state all TP ranks share: a row-parallel input without sequence parallelism. (Under
        sequence parallelism megatron runs the layers in its model-parallel RNG, a stream per TP rank, so
        each rank's own draw is already independent of the others'.)"""
        if self.lora_tp_size == 1 or self.lora_column or self.lora_sequence_parallel:
            return None
        return 2, self.lora_tp_rank, self.lora_tp_size

    def _middle(self, h: torch.Tensor) -> torch.Tensor:
        """The tensor-parallel communication of the packed rank-sized h (see the module docstring)."""
        from megatron.core import tensor_parallel as tpm

        group = self.lora_tp_group
        if self.lora_tp_size == 1 or self.lora_dispatcher_comm:
            return h
        if self.lora_column:
            if self.lora_sequence_parallel:
                return tpm.gather_from_sequence_parallel_region(h, group=group)
            return tpm.copy_to_tensor_model_parallel_region(h, group=group)
        if self.lora_sequence_parallel:
            return tpm.reduce_scatter_to_sequence_parallel_region(h, group=group)
        return tpm.reduce_from_tensor_model_parallel_region(h, group=group)


_LORA_CLASSES: dict[type, type] = {}


def lora_class(base_cls: type) -> type:
    """`SlotLoRA<Base>`: the base linear's class with the LoRA mixin in front (one per base class)."""
    if base_cls not in _LORA_CLASSES:
        _LORA_CLASSES[base_cls] = type(f"SlotLoRA{base_cls.__name__}", (SlotLoRALinear, base_cls), {})
    return _LORA_CLASSES[base_cls]
