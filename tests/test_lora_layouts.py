"""Layout invariance of slot-indexed LoRA: per-slot A/B gradients of a whole tiny GPT (every target linear,
3 tenants of ranks 4/8/16 with different alphas and targets, one idle slot, one base-only sample) are the same at
TP=2, TP=2 with SP, PP=2 (1F1B, with activation recompute) and DP=2 as on one process. A missing backward
all-reduce of the rank-sized middle tensor (the bug REFERENCE.md section 2 suspects in Megatron-Bridge) or a
missing tensor-parallel sum of a sequence-parallel factor fails this test."""

import pytest
import torch

from tests import lora_world as W
from tests.distributed import run_world

N_SAMPLES, MBS = 8, 4  # micro-batches mix tenants ([a a b b], [c c base base])
TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def _run(layout, base_dir, recompute=False, dropout=None):
    from megatron.core import parallel_state as ps

    from megatron_multilora.lora import grads as grad_lib
    from megatron_multilora.lora.inject import lora_parameters
    from megatron_multilora.schedule import forward_backward

    gpt, table = W.build("tiny-dense", layout, base_dir, TARGETS, recompute=recompute, dropout=dropout)
    params = [p for _, p in lora_parameters(gpt)]
    grads = grad_lib.GradBuffer(params)
    grads.zero()
    dp_rank = ps.get_data_parallel_rank()
    tokens, labels, slots = W.batch(N_SAMPLES)
    batches = W.micro_batches(tokens, labels, slots, table, MBS)
    losses = []

    def after_forward(batch, output):
        if ps.is_pipeline_last_stage():
            losses.append(output.detach().clone())
        return batch["routing"].bind_to_backward(output)

    forward_backward(
        [gpt], batches, num_micro_batches=len(batches), seq_length=W.SEQ, micro_batch_size=MBS,
        before_forward=lambda b: b["routing"].activate(), after_forward=after_forward,
    )
    grads.sync(sorted(set(slots.tolist()) - {-1}))  # the step's slots, as the trainer does
    base_grads = [p.grad for n, p in gpt.named_parameters() if not getattr(p, "lora_param", False)]
    return dict(
        dp_rank=dp_rank,
        grads=W.gathered_grads(table) if dp_rank == 0 else {},
        losses=torch.cat(losses) if losses else None,
        base_grads_none=all(g is None for g in base_grads),
    )


def _collect(outs):
    losses = [o["losses"] for o in sorted(outs, key=lambda o: o["dp_rank"]) if o["losses"] is not None]
    by_dp = {}
    for o in outs:
        if o["losses"] is not None:
            by_dp[o["dp_rank"]] = o["losses"]
    losses = torch.cat([by_dp[r] for r in sorted(by_dp)])
    return W.merge([o["grads"] for o in outs]), losses


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("base"))
    outs = run_world(_run, 1, {}, base)
    return base, outs[0], _collect(outs)


def test_reference_gradients_are_meaningful(reference):
    _, out, (grads, _) = reference
    assert out["base_grads_none"], "the frozen base got a gradient"
    slot_of = {name: i for i, (name, *_rest) in enumerate(W.TENANTS)}
    for (layer, which), g in grads.items():
        assert not g[3].any(), f"idle slot 3 has a gradient in {layer}.{which}"
        for name, rank, _alpha, targets in W.TENANTS:
            s = slot_of[name]
            kind = layer.rsplit(".", 1)[-1]
            targeted = targets is None or kind in targets
            used = g[s, :rank] if which == "a" else g[s, :, :rank]
            unused = g[s, rank:] if which == "a" else g[s, :, rank:]
            assert not unused.any(), f"{name}: gradient beyond rank {rank} in {layer}.{which}"
            assert (used.abs().max() > 0) == targeted, f"{name} targeted={targeted} in {layer}.{which}"


LAYOUTS = [
    (dict(tp=2), 2, False),
    (dict(tp=2, sp=True), 2, False),
    (dict(), 2, False),  # DP=2
    (dict(pp=2), 2, True),  # 1F1B with activation recompute
    (dict(), 1, True),  # activation recompute on one process
]


@pytest.mark.parametrize("layout,world,recompute", LAYOUTS, ids=lambda x: str(x))
def test_per_slot_gradients_are_layout_invariant(reference, layout, world, recompute):
    base, _, (ref_grads, ref_losses) = reference
    outs = run_world(_run, world, layout, base, recompute)
    grads, losses = _collect(outs)
    assert torch.allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    assert set(grads) == set(ref_grads)
    for key, ref in ref_grads.items():
        err = ((grads[key] - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        assert err <= 1e-5, (key, err)


DROPOUT = {"a": 0.3, "c": 0.1}  # LoRA dropout of tenants a and c (b: none)


@pytest.fixture(scope="module")
def dropout_reference(reference):
    base, _, (_, plain_losses) = reference
    grads, losses = _collect(run_world(_run, 1, {}, base, False, DROPOUT))
    assert not torch.allclose(losses, plain_losses, rtol=1e-3), "dropout changed nothing"
    return grads, losses


def test_lora_dropout_masks_are_those_of_one_process_under_tensor_parallelism(reference, dropout_reference):
    """TP ranks share one generator state (as in megatron, outside sequence parallelism, whose model-parallel
    RNG gives each rank a stream of its own): a row-parallel LoRA input's mask is drawn over all its features
    and each rank keeps its slice, so TP=2 trains with exactly the masks of one process. Drawn over the slice,
    every rank's half of the features got the same mask."""
    ref_grads, ref_losses = dropout_reference
    grads, losses = _collect(run_world(_run, 2, dict(tp=2), reference[0], False, DROPOUT))
    assert torch.allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    for key, ref in ref_grads.items():
        err = ((grads[key] - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        assert err <= 1e-5, (key, err)


def _embedding_output_requires_grad(recompute, base_dir):
    from megatron_multilora import model as M
    from megatron_multilora.lora.routing import AdapterRouting

    gpt, table = W.build("tiny-dense", {}, base_dir, TARGETS, recompute=recompute)
    seen = []
    gpt.embedding.register_forward_hook(lambda _m, _i, out: seen.append(out.requires_grad))
    tokens = torch.randint(0, 320, (2, W.SEQ))
    out = {}
    for name, slots in (("adapter", [0, -1]), ("base_only", [-1, -1])):
        with AdapterRouting(slots, table).active():
            gpt(tokens, M.position_ids(tokens), M.causal_attention_mask(W.SEQ), labels=tokens).sum().backward()
        out[name] = seen.pop()
    return out


def test_embedding_output_requires_grad_only_where_backward_needs_it(reference):
    """It costs the first layer's input gradient: only base-only micro-batches (no graph otherwise) and
    reentrant recompute (no backward through a chunk whose input needs no grad) need it on one process."""
    base, *_ = reference
    plain = run_world(_embedding_output_requires_grad, 1, False, base)[0]
    assert plain == {"adapter": False, "base_only": True}
    recompute = run_world(_embedding_output_requires_grad, 1, True, base)[0]
    assert recompute == {"adapter": True, "base_only": True}


def _both_layouts(preset, targets, base_dir, dropout=None):
    """Per-token losses and per-slot gradients of one mixed micro-batch (3 tenants of two ranks, a base-only
    sample) fed token-major (model.forward_micro_batch, the layout without sequence parallelism) and in
    megatron's [s, b] layout (the chunk called directly, as under sequence parallelism), and the layout flags the
    dense LoRA saw."""
    from megatron_multilora import model as M
    from megatron_multilora.lora import ops
    from megatron_multilora.lora.routing import AdapterRouting

    gpt, table = W.build(preset, {}, base_dir, targets, dropout=dropout)
    tokens, labels, slots = W.batch(8)
    routing = AdapterRouting(slots, table)
    flags, lora_add = [], ops.lora_add

    def spy(*args, token_major=False, **kwargs):
        flags.append(token_major)
        return lora_add(*args, token_major=token_major, **kwargs)

    ops.lora_add = spy
    out = {}
    for layout in ("token_major", "sb"):
        for layer in table.layers:
            layer.lora_A.grad = layer.lora_B.grad = None
        flags.clear()
        torch.manual_seed(11)  # the same dropout draws
        with routing.active():
            if layout == "token_major":
                loss = M.forward_micro_batch(gpt, tokens, labels)
            else:
                loss = gpt(tokens, M.position_ids(tokens), M.causal_attention_mask(W.SEQ), labels=labels)
            loss.sum().backward()
        out[layout] = (loss.detach().clone(), W.gathered_grads(table), sorted(set(flags)))
    return out


@pytest.mark.parametrize("preset,targets,dropout", [
    ("tiny-dense", TARGETS, None), ("tiny-moe", ("linear_qkv", "linear_proj", "expert_fc1", "expert_fc2"), None),
    ("tiny-dense", TARGETS, DROPOUT)])  # dense LoRA dropout masks are drawn sample by sample in both layouts
def test_token_major_and_sequence_major_layouts_agree(reference, preset, targets, dropout):
    base, *_ = reference
    out = run_world(_both_layouts, 1, preset, targets, base if preset == "tiny-dense" else None, dropout)[0]
    (loss_t, grads_t, flags_t), (loss_s, grads_s, flags_s) = out["token_major"], out["sb"]
    assert flags_t == [True] and flags_s == [False]  # each layout took its own path
    assert loss_t.shape == loss_s.shape == (8, W.SEQ)
    assert torch.allclose(loss_t, loss_s, rtol=1e-5, atol=1e-6)
    assert set(grads_t) == set(grads_s)
    for key, ref in grads_s.items():
        assert ref.abs().max() > 0, key
        err = ((grads_t[key] - ref).abs().max() / ref.abs().max()).item()
        assert err <= 1e-5, (key, err)
