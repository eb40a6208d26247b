"""Slot-indexed LoRA on MoE experts: slot ids follow tokens through the dispatcher.

- Layout invariance: per-slot expert (and dense / shared-expert) LoRA gradients at EP=2, TP=2 x EP=2 with SP,
  and PP=2 (4 layers, 1F1B, activation recompute) equal EP=1.
- Batch invariance: a tenant's gradients in a mixed batch equal its gradients training alone.
- No per-expert delta-W (B @ A) is ever formed during forward or backward.
"""

import contextlib

import pytest
import torch

from tests import lora_world as W
from tests.distributed import run_world

N_SAMPLES, MBS = 8, 4  # micro-batches mix tenants ([a a b b], [c c base base])
TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "expert_fc1", "expert_fc2")


def _run(layout, base_dir, only_slot=None, recompute=False, watch_delta_w=False, starve=()):
    from megatron_multilora.lora import grads as grad_lib
    from megatron_multilora.lora.inject import lora_parameters
    from megatron_multilora.schedule import forward_backward

    layout = dict(layout)
    mbs = layout.pop("mbs", MBS)
    gpt, table = W.build("tiny-moe", layout, base_dir, TARGETS, recompute=recompute)
    if starve:
        _route_around(gpt, starve)
    params = [p for _, p in lora_parameters(gpt)]
    grads = grad_lib.GradBuffer(params)
    grads.zero()
    tokens, labels, slots = W.batch(N_SAMPLES)
    if only_slot is not None:  # the same tenant's samples, alone (the others' samples removed)
        keep = slots == only_slot
        tokens, labels, slots = tokens[keep], labels[keep], slots[keep]
    batches = W.micro_batches(tokens, labels, slots, table, mbs)
    watcher = _DeltaWWatcher(table) if watch_delta_w else None
    with watcher or contextlib.nullcontext():
        forward_backward(
            [gpt], batches, num_micro_batches=len(batches), seq_length=W.SEQ,
            micro_batch_size=batches[0]["tokens"].shape[0],
            before_forward=lambda b: b["routing"].activate(),
            after_forward=lambda b, out: b["routing"].bind_to_backward(out),
        )
    grads.sync(sorted(set(slots.tolist()) - {-1}))  # the step's slots, as the trainer does
    return dict(grads=W.gathered_grads(table), violations=watcher.violations if watcher else [],
                self_check=watcher.self_check() if watcher else None, slot_grouped=_slot_grouped(gpt),
                micro_batches=len(batches), own_permutation=[
                    layer.mlp.token_dispatcher.lora_tokens_grouped for layer in gpt.decoder.layers
                    if hasattr(layer.mlp, "token_dispatcher") and hasattr(layer.mlp.token_dispatcher, "local_map")])


def _slot_grouped(gpt):
    """For every local expert of the MoE layers with the allgather dispatcher: were its tokens (of the last
    micro-batch) already grouped by slot (each slot's tokens one block), as the dispatcher promises -- by its
    slot-ordered permutation, or by megatron's own when the tokens arrive grouped?"""
    out = []
    for layer in gpt.decoder.layers:
        dispatcher = getattr(layer.mlp, "token_dispatcher", None)
        if dispatcher is not None and hasattr(dispatcher, "local_map"):  # allgather
            per_expert = dispatcher.lora_permuted_slots.split(dispatcher.local_map.sum(0).tolist())
            # (the micro-batch's base-only samples are one block too: they count as a slot here)
            out += [(s.unique_consecutive().numel() == s.unique().numel(), s.unique().numel() > 1) for s in per_expert]
    return out  # [(grouped, several slots)] per local expert


def _route_around(gpt, experts):
    """Routers never pick `experts` (their logits pushed down): those experts, and an EP rank holding only
    them, receive no tokens."""
    from megatron.core.transformer.moe.router import TopKRouter

    for router in (m for m in gpt.modules() if isinstance(m, TopKRouter)):
        gating = router.gating

        def pushed_down(x, gating=gating):
            logits = gating(x)
            return logits.index_fill(-1, torch.tensor(experts), -1e4)

        router.gating = pushed_down


def _DeltaWWatcher(table):
    """Flags every op that combines only LoRA weights (or their gradients) into a tensor at least as large as
    one expert's delta-W: that is B @ A, however it is spelled."""
    from torch.utils._python_dispatch import TorchDispatchMode

    experts = [layer for layer in table.layers if layer.lora_kind.startswith("expert_")]
    smallest = min(layer.lora_A.shape[-1] * layer.lora_B.shape[-2] for layer in experts)
    storages = set()
    for layer in experts:
        for p in (layer.lora_A, layer.lora_B):
            storages.add(p.untyped_storage().data_ptr())
            if p.grad is not None:
                storages.add(p.grad.untyped_storage().data_ptr())

    class Watcher(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.violations = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if len(tensors) >= 2 and all(t.untyped_storage().data_ptr() in storages for t in tensors):
                if isinstance(out, torch.Tensor) and out.numel() >= smallest:
                    self.violations.append((str(func), tuple(out.shape)))
            return out

        def self_check(self):
            """The watcher does see a delta-W when one is formed."""
            layer = experts[0]
            before = len(self.violations)
            with self:
                _ = layer.lora_B[0] @ layer.lora_A[0]
            found = len(self.violations) > before
            del self.violations[before:]
            return found

    return Watcher()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("moe_base"))
    out = run_world(_run, 1, {}, base, None, False, True)[0]
    return base, out


def test_expert_grads_are_meaningful_and_no_delta_w(reference):
    _, out = reference
    assert out["self_check"], "the delta-W watcher cannot see B @ A"
    assert out["violations"] == []
    # the allgather dispatcher hands every expert its tokens grouped by slot (no sort in the experts): here, one
    # process with token-major micro-batches whose slots are blocks ([a a b b], [c c base base]), through
    # megatron's own permutation (the layouts below, which all-gather tokens, take the slot-ordered one)
    assert out["own_permutation"] and all(out["own_permutation"]), out["own_permutation"]
    assert all(grouped for grouped, _ in out["slot_grouped"]), out["slot_grouped"]
    assert any(several for _, several in out["slot_grouped"]), "no expert saw two slots: the check proves nothing"
    expert = {k: g for k, g in out["grads"].items() if ".experts.local_experts." in k[0]}
    assert len(expert) == 4 * 4 * 2 * 2  # layers x experts x (fc1, fc2) x (A, B)
    assert any(".shared_experts." in k[0] for k in out["grads"])
    for (layer, which), g in expert.items():
        assert not g[3].any(), f"idle slot has a gradient in {layer}.{which}"
    # a tenant's expert targets decide which expert linears learn for it ('c' does not target expert_fc2)
    for slot, (name, _rank, _alpha, targets) in enumerate(W.TENANTS):
        for kind in ("fc1", "fc2"):
            grads = [g[slot] for (layer, _), g in expert.items() if layer.endswith("linear_" + kind)]
            targeted = targets is None or f"expert_{kind}" in targets
            assert any(bool(g.any()) for g in grads) == targeted, (name, kind)


LAYOUTS = [
    pytest.param(dict(ep=2), 2, False, id="ep2"),
    # DP 4 over EP 2: each expert's LoRA gradient is summed over its expert-data-parallel pair of ranks
    pytest.param(dict(ep=2), 4, False, id="ep2-expert-dp2"),
    pytest.param(dict(tp=2, ep=2, sp=True), 4, False, id="tp2-ep2-sp"),
    pytest.param(dict(pp=2), 2, True, id="pp2-recompute"),
    # the alltoall dispatcher (megatron's choice on GPU): all-to-all over EP, TP all-gather, sort by expert
    pytest.param(dict(ep=2, dispatcher="alltoall"), 2, False, id="alltoall-ep2"),
    pytest.param(dict(tp=2, ep=2, sp=True, dispatcher="alltoall"), 4, False, id="alltoall-tp2-ep2-sp"),
    # micro-batches of 2: DP 2 leaves each rank 4 samples, and 1F1B must run micro-batches in flight together
    pytest.param(dict(ep=2, pp=2, dispatcher="alltoall", mbs=2), 4, True, id="alltoall-ep2-pp2-recompute"),
]


@pytest.mark.parametrize("layout,world,recompute", LAYOUTS)
def test_expert_grads_are_layout_invariant(reference, layout, world, recompute):
    base, ref = reference
    outs = run_world(_run, world, layout, base, None, recompute)
    if layout.get("pp", 1) > 1:  # the pipeline schedule interleaves micro-batches (the dispatchers' state)
        assert all(o["micro_batches"] >= 2 for o in outs)
    grads = W.merge([o["grads"] for o in outs])
    assert set(grads) == set(ref["grads"])
    for key, r in ref["grads"].items():
        assert _rel(grads[key], r) <= 1e-5, (key, _rel(grads[key], r))
    if layout.get("tp", 1) * layout.get("ep", 1) > 1:  # all-gathered tokens take the slot-ordered permutation
        assert not any(flag for o in outs for flag in o["own_permutation"])


@pytest.mark.parametrize("slot", [0, 2])
def test_expert_grads_are_batch_invariant(reference, slot):
    base, ref = reference
    alone = run_world(_run, 1, {}, base, slot)[0]["grads"]
    for key, r in ref["grads"].items():
        assert _rel(alone[key][slot], r[slot]) <= 1e-5, (key, _rel(alone[key][slot], r[slot]))
        others = [s for s in range(4) if s != slot]
        assert not alone[key][others].any()


STARVED = (2, 3)  # at EP=2 these are all of rank 1's experts


@pytest.fixture(scope="module")
def starved_reference(reference):
    base, _ = reference
    return run_world(_run, 1, {}, base, None, False, False, STARVED)[0]["grads"]


@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
def test_experts_and_ranks_without_tokens(reference, starved_reference, dispatcher):
    """An expert / EP rank that receives no tokens gets exact zero gradients, and nobody waits for it."""
    base, _ = reference
    outs = run_world(_run, 2, dict(ep=2, dispatcher=dispatcher), base, None, False, False, STARVED, timeout=300)
    grads = W.merge([o["grads"] for o in outs])
    assert set(grads) == set(starved_reference)
    starved = [k for k in grads if any(f".local_experts.{e}." in k[0] for e in STARVED)]
    fed = [k for k in grads if ".local_experts." in k[0] and k not in starved]
    assert starved and fed
    for key in starved:
        assert not grads[key].any() and not starved_reference[key].any(), key
    assert any(bool(grads[k].any()) for k in fed)
    for key, r in starved_reference.items():
        assert _rel(grads[key], r) <= 1e-5, (key, _rel(grads[key], r))


def _grouped_vs_plain(base_dir):
    """The experts of a LoRA-wrapped MoE layer (all local experts' linears in one function each, megatron's
    MLP.forward once over all rows) on base-only tokens, and a plain per-expert PyTorch computation."""
    from megatron_multilora.lora import routing as routing_lib

    gpt, _ = W.build("tiny-moe", {}, base_dir, TARGETS)
    experts = gpt.decoder.layers[0].mlp.experts
    counts = [5, 0, 9, 3][:experts.num_local_experts]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(sum(counts), experts.config.hidden_size, generator=g)
    probs = torch.rand(sum(counts), generator=g)
    gy = torch.randn(sum(counts), experts.config.hidden_size, generator=g)
    experts.lora_dispatcher.lora_permuted_slots = torch.full((sum(counts),), routing_lib.NO_ADAPTER)
    xi = x.clone().requires_grad_(True)
    out, bias = experts(xi, torch.tensor(counts), probs)
    (out * gy).sum().backward()
    xr = x.clone().requires_grad_(True)
    ref = []
    for expert, rows, p in zip(experts.local_experts, xr.split(counts), probs.split(counts)):
        gate, up = (rows @ expert.linear_fc1.weight.t()).chunk(2, dim=-1)
        ref.append((torch.nn.functional.silu(gate) * up * p.unsqueeze(-1)) @ expert.linear_fc2.weight.t())
    ref = torch.cat(ref)
    (ref * gy).sum().backward()
    return dict(out=_rel(out.detach(), ref.detach()), grad=_rel(xi.grad, xr.grad), bias=bias)


def test_grouped_experts_equal_a_plain_per_expert_loop(tmp_path):
    """megatron's SequentialMLP would run each expert's MLP on its rows; the grouped experts (which the LoRA needs)
    must give the same outputs and input gradients, including an expert without tokens."""
    out = run_world(_grouped_vs_plain, 1, str(tmp_path))[0]
    assert out["out"] <= 1e-6 and out["grad"] <= 1e-6 and out["bias"] is None, out


@pytest.mark.parametrize("flag,value", [("moe_apply_probs_on_input", True), ("fp8", "e4m3"),
                                        ("moe_permute_fusion", True), ("moe_pad_expert_input_to_capacity", True)])
def test_unsupported_expert_configs_are_refused_by_name(flag, value):
    """Configs under which the experts would see other tokens than the dispatcher's (scaled, padded) or another
    permutation than the one slot ids replay are refused up front, naming the setting."""
    from types import SimpleNamespace

    from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher

    from megatron_multilora.lora.experts import track_expert_slots

    layer = SimpleNamespace(token_dispatcher=object.__new__(MoEAllGatherTokenDispatcher), experts=None,
                            config=SimpleNamespace(**{flag: value}))
    with pytest.raises(NotImplementedError, match=flag):
        track_expert_slots(layer)


def test_expert_slot_runs_split_at_slot_changes_and_expert_ends():
    """The (local expert, slot, tokens) runs the experts' LoRA segments come from equal a plain per-expert grouping,
    including experts without tokens and one slot continuing across an expert boundary."""
    import itertools

    from megatron_multilora.lora.experts import SlotLoRASequentialMLP

    def plain(slots, counts):
        runs, pos = [], 0
        for expert, count in enumerate(counts):
            for slot, group in itertools.groupby(slots[pos:pos + count].tolist()):
                runs.append((expert, slot, len(list(group))))
            pos += count
        return runs

    cases = [([0, 0, 1, 1, 1, 2], [2, 4]), ([1, 1, 1, 1], [2, 0, 2, 0]), ([], [0, 0]), ([-1, -1, 0], [3])]
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        counts = torch.randint(0, 5, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
        cases.append(([s for c in counts for s in sorted(torch.randint(-1, 3, (c,), generator=g).tolist())], counts))
    for slots, counts in cases:
        slots = torch.tensor(slots, dtype=torch.long)
        assert SlotLoRASequentialMLP._expert_slot_runs(slots, counts) == plain(slots, counts), (slots, counts)
