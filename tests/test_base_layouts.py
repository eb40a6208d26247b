"""The frozen base is layout invariant: weights saved once (dist_checkpointing) and loaded at TP/SP/PP/DP/EP
layouts give the single-process logits, losses and input-embedding gradients."""

import pytest
import torch

from tests.distributed import run_world

SEQ, BATCH, MBS = 16, 4, 2  # token-major micro-batches (no sequence parallelism) pack MBS samples

LAYOUTS = [
    ("tiny-dense", dict(tp=2), 2),
    ("tiny-dense", dict(tp=2, sp=True), 2),
    ("tiny-dense", dict(pp=2), 2),
    ("tiny-dense", dict(), 2),  # DP=2
    ("tiny-moe", dict(ep=2), 2),
    ("tiny-moe", dict(tp=2, ep=2, sp=True), 4),
]


def _tokens():
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 320, (BATCH, SEQ), generator=g)


def _run(preset, layout, base_dir, save):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_multilora import checkpointing, platform
    from megatron_multilora import model as M
    from megatron_multilora.config import model_config_from
    from megatron_multilora.schedule import forward_backward

    tp, pp, ep, sp = layout.get("tp", 1), layout.get("pp", 1), layout.get("ep", 1), layout.get("sp", False)
    platform.initialize_model_parallel(platform.ParallelLayout(tp, pp, ep, sp), seed=11)
    mc = model_config_from(preset)
    cfg = M.transformer_config(
        mc, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep, sequence_parallel=sp,
    )
    gpt = M.build_gpt_model(mc, cfg)
    if save:
        checkpointing.save_base(gpt, base_dir)
    else:
        checkpointing.load_base(gpt, base_dir)

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per = BATCH // dp
    tokens = _tokens()[dp_rank * per:(dp_rank + 1) * per]
    labels = torch.roll(tokens, -1, dims=1)
    mbs = min(MBS, per)
    batches = [
        dict(tokens=tokens[i:i + mbs], labels=labels[i:i + mbs], loss_mask=torch.ones(mbs, SEQ))
        for i in range(0, per, mbs)
    ]

    def as_sb(t):
        """[s, b, d] whichever layout the model ran in (token-major: [b * s, 1, d])."""
        return t.view(-1, SEQ, t.shape[-1]).transpose(0, 1) if M.token_major(cfg) else t

    logits, losses, emb_grads = [], [], []
    if ps.is_pipeline_last_stage():
        gpt.output_layer.register_forward_hook(
            lambda m, i, o: logits.append(as_sb(gather_from_tensor_model_parallel_region(o[0])).detach().clone())
        )

    def hook_embedding(m, i, out):
        def keep(grad):
            emb_grads.append(as_sb(gather_from_sequence_parallel_region(grad) if sp else grad))

        out.register_hook(keep)

    if ps.is_pipeline_first_stage():
        gpt.embedding.register_forward_hook(hook_embedding)

    def after_forward(batch, output):
        if ps.is_pipeline_last_stage():
            losses.append(output.detach())
        return output

    forward_backward(
        [gpt], batches, num_micro_batches=len(batches), seq_length=SEQ, micro_batch_size=mbs,
        after_forward=after_forward,
    )
    cat = lambda xs, dim: torch.cat(xs, dim) if xs else None  # noqa: E731
    return dict(
        dp_rank=dp_rank,
        samples=list(range(dp_rank * per, (dp_rank + 1) * per)),
        logits=cat(logits, 1),  # [s, b, vocab]
        losses=cat(losses, 0),  # [b, s]
        emb_grads=cat(emb_grads, 1),  # [s, b, h]
    )


def _assemble(outs):
    full = {}
    for key, dim in (("logits", 1), ("losses", 0), ("emb_grads", 1)):
        parts = {}
        for o in outs:
            if o[key] is not None:
                parts.setdefault(o["dp_rank"], o[key])
        full[key] = torch.cat([parts[r] for r in sorted(parts)], dim)
    return full


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    refs = {}
    for preset in ("tiny-dense", "tiny-moe"):
        base = tmp_path_factory.mktemp(preset)
        refs[preset] = (base, _assemble(run_world(_run, 1, preset, {}, str(base), True)))
    return refs


@pytest.mark.parametrize("preset,layout,world", LAYOUTS, ids=lambda x: str(x))
def test_base_layout_invariance(references, preset, layout, world):
    base, ref = references[preset]
    got = _assemble(run_world(_run, world, preset, layout, str(base), False))
    for key in ("logits", "losses", "emb_grads"):
        assert got[key].shape == ref[key].shape, key
        assert _rel(got[key], ref[key]) <= 1e-5, (key, _rel(got[key], ref[key]))


def _attention_outputs(mask_type, layout):
    """megatron's RoPE (rope_utils.apply_rotary_pos_emb with RotaryEmbedding's frequencies) and DotProductAttention,
    and ours (RoPE in SDPAttention, torch SDPA) on the same q, k, v (GQA 4 heads / 2 groups); ours also
    token-major ([b * s, n, d] with packed-sequence params), brought back to [s, b, ...] to compare."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_multilora import model as M
    from megatron_multilora import platform
    from megatron_multilora.config import model_config_from

    platform.initialize_model_parallel(platform.ParallelLayout(), seed=3)
    mc = model_config_from("tiny-dense")
    config = M.transformer_config(mc)
    heads, groups, dim = config.num_attention_heads, config.num_query_groups, config.kv_channels
    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(SEQ, BATCH, n, dim, generator=g) for n in (heads, groups, groups)]
    mask = M.causal_attention_mask(SEQ) if mask_type == "causal" else torch.rand(BATCH, 1, SEQ, SEQ, generator=g) < 0.3
    mask[..., 0] = False  # every query sees at least one key
    kind = AttnMaskType.causal if mask_type == "causal" else AttnMaskType.padding
    inv = 1.0 / (mc.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(SEQ, dtype=torch.float32), inv)
    emb = torch.cat([freqs, freqs], -1)[:, None, None, :]  # megatron's RotaryEmbedding output [s, 1, 1, d]
    grad = torch.randn(SEQ, BATCH, heads * dim, generator=torch.Generator().manual_seed(1))
    out = {}
    for name in ("megatron", "sdpa"):
        inputs = [t.clone().requires_grad_(True) for t in qkv]
        if name == "megatron":
            attention = DotProductAttention(config, layer_number=1, attn_mask_type=kind, attention_type="self")
            q, k = (apply_rotary_pos_emb(t, emb, config=config) for t in inputs[:2])
            y = attention(q, k, inputs[2], mask)
        else:
            attention = M.sdpa_attention_class()(config, layer_number=1, attn_mask_type=kind, attention_type="self",
                                                 rotary_base=mc.rotary_base)
            if layout == "sb":
                y = attention(*inputs, mask)
            else:  # token-major: sample after sample
                bounds = torch.arange(0, SEQ * BATCH + 1, SEQ, dtype=torch.int32)
                packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=bounds, cu_seqlens_kv=bounds,
                                         max_seqlen_q=SEQ, max_seqlen_kv=SEQ)
                y = attention(*(t.transpose(0, 1).reshape(SEQ * BATCH, *t.shape[2:]) for t in inputs), None,
                              packed_seq_params=packed)
                y = y.view(BATCH, SEQ, -1).transpose(0, 1)
        y.backward(grad)
        out[name] = [y.detach()] + [t.grad for t in inputs]
    return out


@pytest.mark.parametrize("mask_type,layout", [("causal", "sb"), ("arbitrary", "sb"), ("causal", "token_major")])
def test_sdpa_attention_equals_megatron_rope_and_attention(mask_type, layout):
    out = run_world(_attention_outputs, 1, mask_type, layout)[0]
    for ours, ref in zip(out["sdpa"], out["megatron"]):
        assert ours.shape == ref.shape
        assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6), (ours - ref).abs().max()
