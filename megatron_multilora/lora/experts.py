"""Slot-indexed LoRA on MoE experts under expert parallelism.

Each local expert's fc1 / fc2 carries its own slot-indexed A and B (only this EP rank's experts, so the expert
axis is sharded across EP ranks like the experts themselves); the LoRA of all local experts runs in one grouped
GEMM per product (ops.expert_lora, SlotLoRASequentialMLP below). The slot of
every token follows it through the token dispatcher: the dispatcher gathers and permutes an int slot-id vector
exactly as it gathers and permutes the tokens, and every expert must see its tokens grouped by slot (its
segments). The allgather dispatcher's own permutation is made to take each expert's tokens in slot order, which
costs nothing extra; after the alltoall dispatcher (whose chunks from several ranks interleave slots) the
experts wrapper sorts the tokens by (expert, slot) around the base call and restores their order. No
per-expert delta-W is ever formed. Both of megatron's token dispatchers are followed: allgather
(all-gather over TP x EP) and alltoall (all-to-all over EP with the tokens' own split sizes, then the TP
all-gather and the sort by local expert). All of it happens inside the MoE layer's forward, so activation
recompute and pipeline schedules replay it from the micro-batch's own routing.
"""

from __future__ import annotations

import itertools

import torch
from megatron.core.tensor_parallel import all_to_all, gather_from_sequence_parallel_region
from megatron.core.transformer.moe.moe_utils import sort_chunks_by_idxs

from . import ops, routing as routing_lib


def _input_slots(hidden_states) -> torch.Tensor:
    """The slot of every token of this rank's MoE input in the dispatcher's flattened order (of [s, b, h] or
    token-major [b * s, 1, h])."""
    routing = routing_lib.current()
    if routing is None:
        tokens = hidden_states.shape[0] * hidden_states.shape[1]
        return torch.full((tokens,), routing_lib.NO_ADAPTER, dtype=torch.long, device=hidden_states.device)
    return routing.token_slots(hidden_states.shape).to(hidden_states.device)


class SlotTrackingAllGatherDispatcher:
    """Mixin in front of megatron's MoEAllGatherTokenDispatcher: carries token slot ids along
    (all-gather over TP x EP, then the local permutation)."""

    lora_grouped_by_slot = True  # its permutation hands each expert its tokens in slot order

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        self.lora_token_slots = _input_slots(hidden_states)
        return super().dispatch_preprocess(hidden_states, routing_map, probs)

    def token_dispatch(self, hidden_states, probs):
        if self.tp_size > 1 or self.ep_size > 1:  # the same all-gather megatron does for the tokens
            with torch.no_grad():
                self.lora_token_slots = gather_from_sequence_parallel_region(
                    self.lora_token_slots, group=self.tp_ep_group
                )
        return super().token_dispatch(hidden_states, probs)

    def dispatch_postprocess(self, hidden_states, probs):
        slots = self.lora_token_slots
        if not bool((slots != routing_lib.NO_ADAPTER).any()):
            out = super().dispatch_postprocess(hidden_states, probs)
            self.lora_permuted_slots = slots[self.reversed_local_input_permutation_mapping]
            return out
        # megatron's (unfused) permutation with one change: each expert takes its tokens in slot order rather
        # than token order, so the experts find them grouped by slot and need no sort of their own. The
        # combine (unpermute) scatters through the same mapping, so any order within an expert is exact.
        self.hidden_shape_before_permute = hidden_states.shape
        local = slice(self.local_expert_indices[0], self.local_expert_indices[-1] + 1)
        self.local_map = self.routing_map[:, local].contiguous()
        by_slot = torch.argsort(slots, stable=True)
        expert_map = self.local_map[by_slot].T  # [local experts, tokens in slot order]
        mapping = by_slot.expand(expert_map.shape[0], -1).masked_select(expert_map)
        self.reversed_local_input_permutation_mapping = mapping
        self.local_probs = probs[by_slot, local].T.masked_select(expert_map)
        self.routing_map = None
        self.lora_permuted_slots = slots[mapping]
        tokens_per_expert = self.local_map.sum(dim=0).long().cpu()
        return hidden_states.index_select(0, mapping), tokens_per_expert, self.local_probs


class SlotTrackingAlltoAllDispatcher:
    """Mixin in front of megatron's MoEAlltoAllTokenDispatcher: the slot ids take the tokens' path
    (permutation 1, all-to-all over EP with the same splits, all-gather over TP, sort by local expert)."""

    lora_grouped_by_slot = False  # chunks from several EP ranks interleave slots within an expert

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        slots = _input_slots(hidden_states)
        out = super().dispatch_preprocess(hidden_states, routing_map, probs)
        self.lora_token_slots = slots[self.reversed_local_input_permutation_mapping]
        return out

    def token_dispatch(self, permuted_tokens, permuted_probs):
        out = super().token_dispatch(permuted_tokens, permuted_probs)  # the split sizes are on the host now
        with torch.no_grad():
            self.lora_token_slots = all_to_all(
                self.ep_group, self.lora_token_slots, self.output_splits, self.input_splits
            )
        return out

    def dispatch_postprocess(self, global_tokens, global_probs):
        out = super().dispatch_postprocess(global_tokens, global_probs)
        slots = self.lora_token_slots
        with torch.no_grad():
            if self.tp_size > 1:
                splits = None if self.output_splits_tp is None else self.output_splits_tp.tolist()
                slots = gather_from_sequence_parallel_region(slots, group=self.tp_group, output_split_sizes=splits)
            if self.num_local_experts > 1:
                slots, _ = sort_chunks_by_idxs(
                    slots, self.num_global_tokens_per_local_expert.ravel(), self.sort_input_by_local_experts
                )
        self.lora_permuted_slots = slots
        return out


class SlotLoRASequentialMLP:
    """Mixin in front of megatron's SequentialMLP: every local expert's LoRA in one grouped product per linear.

    megatron runs the experts one after another; a LoRA call per expert linear (one matmul per (expert, slot)
    segment and product) cost 5.2x the LoRA of a dense MLP over the same tokens x rank (tools/bench.py case 8,
    tiny shape; 1.24x at d=1024). Here the tokens of all local experts, grouped by (expert, slot), go through one
    grouped GEMM per product: fc1's LoRA delta is computed for every expert before megatron's loop and added to
    each expert's fc1 output (before the activation), and fc2's LoRA, linear in fc2's input, is computed after
    the loop from the inputs the expert fc2s handed over and added to the experts' joint output (before the
    combine, as megatron adds each expert's)."""

    def forward(self, permuted_hidden, tokens_per_expert, permuted_probs):
        routing = routing_lib.current()
        slots = self.lora_dispatcher.lora_permuted_slots
        if routing is None or not bool((slots != routing_lib.NO_ADAPTER).any()):
            return super().forward(permuted_hidden, tokens_per_expert, permuted_probs)
        counts = tokens_per_expert.tolist()
        order = None
        if not self.lora_dispatcher.lora_grouped_by_slot:  # alltoall: sort by (expert, slot) unless already so
            expert_of = torch.repeat_interleave(torch.arange(len(counts), device=slots.device),
                                                torch.as_tensor(counts, device=slots.device))
            keys = expert_of * (int(slots.max()) + 2) + (slots + 1)
            if not bool((keys[1:] >= keys[:-1]).all()):
                order = torch.argsort(keys, stable=True)
                slots = slots[order]
                inverse = torch.empty_like(order)
                inverse[order] = torch.arange(order.numel(), device=order.device)
                permuted_hidden = ops.permute_rows(permuted_hidden, order, inverse)
                permuted_probs = permuted_probs[order]
        io1, io2 = self.lora_io
        fc1, fc2 = io1.linears, io2.linears
        runs = self._expert_slot_runs(slots, counts)
        seg1 = routing.expert_segments(fc1[0].lora_kind, runs) if fc1 else []
        seg2 = routing.expert_segments(fc2[0].lora_kind, runs) if fc2 else []
        try:
            if seg1:
                delta = ops.expert_lora(None, permuted_hidden, [lin.lora_A for lin in fc1],
                                        [lin.lora_B for lin in fc1], seg1, self.training)
                io1.deltas = delta.split(counts)
            if seg2:
                io2.inputs = [None] * len(fc2)
            out, bias = super().forward(permuted_hidden, tokens_per_expert, permuted_probs)
            if seg2:
                act = torch.cat(io2.inputs)
                out = ops.expert_lora(out, act, [lin.lora_A for lin in fc2], [lin.lora_B for lin in fc2], seg2,
                                      self.training)
        finally:
            io1.deltas = io2.inputs = None
        if order is not None:
            out = ops.permute_rows(out, inverse, order)
        return out, bias

    @staticmethod
    def _expert_slot_runs(slots: torch.Tensor, counts: list[int]) -> list[tuple[int, int, int]]:
        """(local expert, slot, tokens) runs in token order, from the tokens' slots grouped by (expert, slot) and
        each local expert's token count (a run ends where the slot changes or an expert's tokens end)."""
        ends = list(itertools.accumulate(counts))
        changes = (slots[1:] != slots[:-1]).nonzero().flatten().add_(1).tolist()
        starts = sorted(set(changes).union(ends[:-1], [0]) - {ends[-1]}) if ends and ends[-1] else []
        runs, expert = [], 0
        for start, end, slot in zip(starts, starts[1:] + ends[-1:], slots[starts].tolist()):
            while ends[expert] <= start:
                expert += 1
            runs.append((expert, slot, end - start))
        return runs


class ExpertLoRAHandover:
    """What a MoE layer's experts wrapper and its expert fc1s (or fc2s) hand each other during one forward: fc1's
    LoRA delta per local expert (added to that expert's fc1 output), or the inputs of the fc2s (their LoRA runs
    after megatron's expert loop). A plain object the linears share, set up once (per-forward module attributes
    would cost a Module.__setattr__ per linear)."""

    def __init__(self, linears: list):
        self.linears = linears  # the wrapped expert linears of one kind, by local expert
        self.deltas = None  # fc1: local expert -> its rows of the LoRA delta
        self.inputs = None  # fc2: local expert -> the input it saw


_CLASSES: dict[tuple[type, type], type] = {}


def _with_mixin(mixin: type, base: type) -> type:
    if (mixin, base) not in _CLASSES:
        _CLASSES[(mixin, base)] = type(f"{mixin.__name__}{base.__name__}", (mixin, base), {})
    return _CLASSES[(mixin, base)]


def track_expert_slots(moe_layer) -> None:
    """Make the MoE layer's dispatcher carry slot ids and its experts group tokens by slot."""
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.token_dispatcher import (
        MoEAllGatherTokenDispatcher,
        MoEAlltoAllTokenDispatcher,
    )

    dispatcher, experts, config = moe_layer.token_dispatcher, moe_layer.experts, moe_layer.config
    mixins = {MoEAllGatherTokenDispatcher: SlotTrackingAllGatherDispatcher,
              MoEAlltoAllTokenDispatcher: SlotTrackingAlltoAllDispatcher}
    mixin = next((m for cls, m in mixins.items() if isinstance(dispatcher, cls)), None)
    if mixin is None:
        raise NotImplementedError(
            f"expert LoRA follows tokens through the allgather and alltoall dispatchers, not "
            f"{type(dispatcher).__name__}: set moe_token_dispatcher_type to 'allgather' or 'alltoall'"
        )
    # The slot ids replay megatron's unfused permutation with the reversed mapping as token indices, and the experts'
    # LoRA sees exactly the tokens megatron hands the experts (no padding, no probabilities applied on the input).
    for flag in ("moe_permute_fusion", "moe_pad_expert_input_to_capacity", "moe_router_padding_for_quantization",
                 "moe_apply_probs_on_input", "fp8", "fp4"):
        if getattr(config, flag, None):
            raise NotImplementedError(f"expert LoRA does not support {flag}={getattr(config, flag)!r}")
    if not isinstance(experts, SequentialMLP):
        raise NotImplementedError(f"expert LoRA needs SequentialMLP experts, not {type(experts).__name__}")
    dispatcher.__class__ = _with_mixin(mixin, type(dispatcher))
    experts.__class__ = _with_mixin(SlotLoRASequentialMLP, type(experts))
    experts.lora_dispatcher = dispatcher
    experts.lora_io = tuple(
        ExpertLoRAHandover([lin for e in experts.local_experts if hasattr(lin := getattr(e, name), "lora_kind")])
        for name in ("linear_fc1", "linear_fc2"))
    for io in experts.lora_io:
        for index, linear in enumerate(io.linears):
            linear.lora_expert_io, linear.lora_expert_index = io, index
