"""Slot-indexed LoRA on MoE experts under expert parallelism.

Each local expert's fc1 / fc2 carries its own slot-indexed A and B (only this EP rank's experts, so the expert
axis is sharded across EP ranks like the experts themselves); all local experts' fc1 (fc2), base and LoRA, run
as one function with one grouped GEMM per LoRA product (ops.expert_linear, SlotLoRASequentialMLP below). The
slot of every token follows it through the token dispatcher: the dispatcher gathers and permutes an int slot-id
vector exactly as it gathers and permutes the tokens, and every expert must see its tokens grouped by slot (its
segments). A rank's own token-major tokens are (each adapter slot's samples are one block), so the allgather
dispatcher keeps megatron's permutation for them; tokens all-gathered from several ranks (or interleaved by
megatron's [s, b] layout) it permutes to take each expert's tokens in slot order, at no extra cost; after the
alltoall dispatcher (whose chunks from several ranks interleave slots) the experts wrapper sorts the tokens by
(expert, slot) around the base call and restores their order. No per-expert delta-W is ever formed. Both of
megatron's token dispatchers are followed: allgather (all-gather over TP x EP) and alltoall (all-to-all over EP
with the tokens' own split sizes, then the TP all-gather and the sort by local expert). All of it happens inside
the MoE layer's forward, so activation recompute and pipeline schedules replay it from the micro-batch's own
routing.
"""

from __future__ import annotations

import itertools

import torch
from megatron.core.tensor_parallel import all_to_all, gather_from_sequence_parallel_region
from megatron.core.transformer.mlp import MLP
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

    lora_grouped_by_slot = True  # its permutation hands each expert its tokens grouped by slot

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        self.lora_token_slots = _input_slots(hidden_states)
        # Without an all-gather the tokens are this rank's own, in the micro-batch's order, which the routing
        # knows to hold each slot's tokens in one block or not (no device check needed).
        routing = routing_lib.current()
        self.lora_tokens_grouped = (self.tp_size == 1 and self.ep_size == 1
                                    and (routing is None or routing.tokens_grouped_by_slot(hidden_states.shape)))
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
        if self.lora_tokens_grouped or not bool((slots != routing_lib.NO_ADAPTER).any()):
            # megatron's own permutation hands each expert its tokens in token order: grouped by slot already
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
    """Mixin in front of megatron's SequentialMLP: all local experts at once, each linear kind one grouped product.

    megatron runs each expert's MLP on its own rows (a split, then per expert fc1, activation, fc2, then a cat):
    a handful of autograd nodes per expert, and the LoRA would have to be handed into and out of that loop (the
    glue cost the expert LoRA more than its GEMMs at the tiny shape, tools/bench.py case 8). Here megatron's own
    MLP.forward runs ONCE over every local expert's rows, with `GroupedExpertLinears` in place of the expert's
    fc1 / fc2: each is every local expert's frozen weight on its rows (one output buffer, one autograd node) plus
    the LoRA of every (expert, slot) segment in one grouped GEMM (ops.expert_linear), so the activation, the
    probabilities and everything else between the two linears are megatron's, applied to all rows at once (they
    are row-wise, so this equals the loop)."""

    def forward(self, permuted_hidden, tokens_per_expert, permuted_probs):
        routing = routing_lib.current()
        slots = self.lora_dispatcher.lora_permuted_slots
        counts = tokens_per_expert.tolist()
        fc1, fc2 = self.lora_grouped.linear_fc1, self.lora_grouped.linear_fc2
        order = None
        if routing is not None:
            if not self.lora_dispatcher.lora_grouped_by_slot and bool((slots != routing_lib.NO_ADAPTER).any()):
                # alltoall: sort by (expert, slot) unless so already
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
            runs = self._expert_slot_runs(slots, counts)
            fc1.segments = routing.expert_segments(fc1.lora_kind, runs) if fc1.lora_kind else []
            fc2.segments = routing.expert_segments(fc2.lora_kind, runs) if fc2.lora_kind else []
        fc1.counts = fc2.counts = counts
        try:
            out, bias = MLP.forward(self.lora_grouped, permuted_hidden, permuted_probs)
        finally:
            fc1.segments = fc2.segments = ()
        if order is not None:
            out = ops.permute_rows(out, inverse, order)
        return out, bias

    @staticmethod
    def _expert_slot_runs(slots: torch.Tensor, counts: list[int]) -> list[tuple[int, int, int]]:
        """(local expert, slot, tokens) runs in token order, from the tokens' slots grouped by (expert, slot) and
        each local expert's token count (a run ends where the slot changes or an expert's tokens end)."""
        values, lengths = torch.unique_consecutive(slots, return_counts=True)
        ends = list(itertools.accumulate(counts))
        runs, expert, pos = [], 0, 0
        for slot, length in zip(values.tolist(), lengths.tolist()):
            while length:  # a run of one slot may span several experts' tokens
                while ends[expert] <= pos:
                    expert += 1
                take = min(length, ends[expert] - pos)
                runs.append((expert, slot, take))
                pos, length = pos + take, length - take
        return runs


class GroupedExpertLinears:
    """One linear kind (fc1 or fc2) of every local expert, called as megatron's MLP calls its linear_fc1 /
    linear_fc2 (x -> (y, None)): the experts' frozen weights on their rows, then, for a micro-batch with
    adapters, their LoRA added in place (lora_kind None: this kind carries no LoRA). The experts wrapper sets the
    per-forward `counts` (rows per local expert) and `segments` (the LoRA's (expert, slot) segments)."""

    def __init__(self, linears: list, training_of):
        self.linears, self.training_of = linears, training_of
        lora = [lin for lin in linears if hasattr(lin, "lora_kind")]
        if lora and len(lora) != len(linears):
            raise NotImplementedError("expert LoRA targets every local expert's linear of a kind or none")
        self.lora_kind = lora[0].lora_kind if lora else None
        # (the LoRA parameters are fixed objects -- the optimizer and checkpoints hold them -- so listed once)
        self.lora_a = tuple(lin.lora_A for lin in lora)
        self.lora_b = tuple(lin.lora_B for lin in lora)
        self.counts, self.segments = [], ()

    def __call__(self, x):
        weights = [lin.weight for lin in self.linears]
        if not self.segments:
            return ops.expert_linear(x, weights, self.counts), None
        return ops.expert_linear(x, weights, self.counts, self.lora_a, self.lora_b, self.segments,
                                 self.training_of.training), None


class _GroupedExperts:
    """What megatron's MLP.forward reads of its `self` -- config, activation_func, linear_fc1, linear_fc2 -- for
    all local experts at once (the activation of expert 0, which every local expert shares)."""

    def __init__(self, experts):
        first = experts.local_experts[0]
        self.config, self.activation_func = first.config, first.activation_func
        self.linear_fc1 = GroupedExpertLinears([e.linear_fc1 for e in experts.local_experts], experts)
        self.linear_fc2 = GroupedExpertLinears([e.linear_fc2 for e in experts.local_experts], experts)


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
    for expert in experts.local_experts:
        if type(expert).forward is not MLP.forward:
            raise NotImplementedError(f"expert LoRA runs megatron's MLP.forward over all local experts at once, "
                                      f"not {type(expert).__name__}.forward")
        for linear in (expert.linear_fc1, expert.linear_fc2):
            if getattr(linear, "bias", None) is not None:
                raise NotImplementedError("expert LoRA's grouped experts take no expert bias (add_bias_linear)")
    dispatcher.__class__ = _with_mixin(mixin, type(dispatcher))
    experts.__class__ = _with_mixin(SlotLoRASequentialMLP, type(experts))
    experts.lora_dispatcher = dispatcher
    experts.lora_grouped = _GroupedExperts(experts)
