"""Builds megatron-core's GPTModel (dense or MoE, local non-TE spec) for this rank's pipeline stage."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import platform
from .config import ModelConfig


def transformer_config(
    model: ModelConfig,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    sequence_parallel: bool = False,
    recompute: bool = False,
    moe_token_dispatcher_type: str = "allgather",
    **overrides,
):
    """The megatron TransformerConfig of a Llama-family model at the given layout (dropout off: LoRA
    dropout is per tenant; the frozen base is deterministic)."""
    from megatron.core.transformer import TransformerConfig

    model.validate_layout(
        tensor_model_parallel_size, pipeline_model_parallel_size, expert_model_parallel_size, sequence_parallel
    )
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        init_method_std=model.init_method_std,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        kv_channels=model.kv_channels,
        qk_layernorm=model.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=model.torch_dtype,
        bf16=model.params_dtype == "bfloat16",
        fp16=model.params_dtype == "float16",
        pipeline_dtype=model.torch_dtype,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=not platform.has_cuda(),
        perform_initialization=True,
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        # Safe on gloo (batched isend/irecv can hang there) and cheap enough on NCCL.
        batch_p2p_comm=False,
        calculate_per_token_loss=True,
    )
    if recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if model.is_moe:
        kwargs.update(
            num_moe_experts=model.num_experts,
            moe_router_topk=model.moe_router_topk,
            moe_ffn_hidden_size=model.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size,
            moe_shared_expert_gate=model.moe_shared_expert_gate,
            moe_router_pre_softmax=model.moe_router_pre_softmax,
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            # Both dispatchers work with gloo on CPU; expert LoRA carries slot ids through either (lora/experts.py).
            moe_token_dispatcher_type=moe_token_dispatcher_type,
            moe_grouped_gemm=False,
            moe_permute_fusion=False,
        )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm behind megatron's norm signature. megatron's own torch fallback (WrappedTorchNorm,
    used when apex is absent) refuses sequence parallelism; this one marks its weight like megatron's fused
    norms do, so a gradient of it (if it were trained) is summed over the tensor-parallel group."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


def _equal_packed_samples(tokens: int, params) -> int:
    """The number of packed ("thd") sequences when all of them are equally long (as forward_micro_batch packs
    them), else 0 (SDPAttention refuses varying lengths by name)."""
    if params is None or params.qkv_format != "thd" or params.max_seqlen_q != params.max_seqlen_kv:
        return 0
    samples = params.cu_seqlens_q.numel() - 1
    same = params.cu_seqlens_kv is params.cu_seqlens_q or torch.equal(params.cu_seqlens_kv, params.cu_seqlens_q)
    return samples if same and samples * params.max_seqlen_q == tokens else 0


class _Rotary(torch.autograd.Function):
    """RoPE (rotate-half form, full rotary dimension) of x with positions along one dimension: x * cos +
    rotate_half(x) * sin written half by half into one new tensor, and backward the inverse rotation. megatron's
    unfused RoPE makes three more passes over q and k (a negation, the cat of rotate_half and the cat of
    the rotated and pass-through parts) and, token-major, rebuilds the frequencies sequence by sequence on the
    host (measured: q's RoPE forward + backward 3.0 -> 1.0 ms at d=1024 x 512 tokens; the tiny preset's frozen
    base step 17.3 -> 16.1 ms token-major)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    out = x.new_empty(x.shape)
    x1, x2 = x.chunk(2, -1)
    o1, o2 = out.chunk(2, -1)
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
    return out


@functools.cache
def sdpa_attention_class():
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    class SDPAttention(DotProductAttention):
        """megatron's local DotProductAttention through torch's scaled_dot_product_attention: fused (flash /
        memory-efficient) kernels on GPU and CPU instead of materialising [b, heads, s, s] scores in fp32, and
        GQA without repeating keys and values, and token-major micro-batches (forward_micro_batch: packed
        sequences of equal length). It also applies RoPE to q and k (the model is built without megatron's
        rotary embedding; _Rotary). Anything else it does not cover (dropout, attention bias, softmax offsets,
        sliding windows, query-key layer scaling) takes megatron's own path after the RoPE."""

        def __init__(self, *args, rotary_base: float = 10000.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.rotary_base = rotary_base
            self._cos_sin = None  # ((sequence length, token-major, dtype, device), cos, sin) of the last call

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
            samples = _equal_packed_samples(query.shape[0], packed_seq_params)
            if packed_seq_params is not None and not samples:
                raise NotImplementedError("packed sequences of different lengths: RoPE here restarts per sample of "
                                          "one length (model.forward_micro_batch)")
            query, key = self._rope(query, samples), self._rope(key, samples)
            plain = (
                attention_bias is None and self.softmax_offset is None
                and not (self.training and self.attention_dropout.p > 0)
                and self.scale_mask_softmax.window_size is None and not self.config.apply_query_key_layer_scaling
                and (mask_type == AttnMaskType.causal or (attention_mask is not None and not samples))
            )
            if not plain:
                return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                       packed_seq_params)
            if samples:  # token-major [b * s, n, d]: a view as [b, s, n, d], each sample attending within itself
                q, k, v = (t.view(samples, -1, *t.shape[1:]).transpose(1, 2) for t in (query, key, value))
                out = self._sdpa(q, k, v, None).transpose(1, 2)
                return out.reshape(query.shape[0], self.hidden_size_per_partition)
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [s, b, n, d] -> [b, n, s, d]
            out = self._sdpa(q, k, v, None if mask_type == AttnMaskType.causal else ~attention_mask)
            return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], self.hidden_size_per_partition)

        def _rope(self, t, samples):
            """RoPE of q or k ([s, b, n, d], or token-major [b * s, n, d]), positions restarting per sample
            (megatron's RotaryEmbedding frequencies: base ** (-2i / d) in fp32, cos / sin cast to t's dtype)."""
            x = t.view(samples, -1, *t.shape[1:]) if samples else t  # positions along dimension 1 / 0
            key = (x.shape[1 if samples else 0], bool(samples), t.dtype, t.device)
            if self._cos_sin is None or self._cos_sin[0] != key:
                seq, dim = key[0], t.shape[-1]
                inv = 1.0 / (self.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=t.device) / dim))
                freqs = torch.outer(torch.arange(seq, dtype=torch.float32, device=t.device), inv)
                freqs = freqs.view(seq, *([1] * (2 if not samples else 1)), dim // 2)  # broadcast over b (and n)
                self._cos_sin = (key, freqs.cos().to(t.dtype), freqs.sin().to(t.dtype))
            return _Rotary.apply(x, *self._cos_sin[1:]).view(t.shape)

        def _sdpa(self, q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                  scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1])

    return SDPAttention


def block_spec(model: ModelConfig, config, vp_stage: int | None = None):
    """megatron-core's local (non transformer-engine) spec for this stage's layers: the same modules on CPU
    and GPU, so the LoRA wrappers see one set of linears."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layer = get_gpt_layer_local_spec(
        num_experts=model.num_experts, normalization="RMSNorm", qk_layernorm=model.qk_layernorm
    )
    layer.submodules.input_layernorm = RMSNorm
    layer.submodules.pre_mlp_layernorm = RMSNorm
    layer.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=sdpa_attention_class(), params={"rotary_base": model.rotary_base})
    if model.qk_layernorm:
        layer.submodules.self_attention.submodules.q_layernorm = RMSNorm
        layer.submodules.self_attention.submodules.k_layernorm = RMSNorm
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage), layer_norm=RMSNorm
    )


def build_gpt_model(model: ModelConfig, config, vp_stage: int | None = None):
    """The GPTModel chunk of this rank's pipeline stage, on this rank's device."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    gpt = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(model, config, vp_stage),
        vocab_size=model.vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=True),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=True),
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type="none",  # RoPE is applied by the core attention (SDPAttention)
        vp_stage=vp_stage,
    )
    return gpt.to(platform.device())


def causal_attention_mask(seq_length: int, device=None) -> torch.Tensor:
    """megatron's mask convention (True = masked), passed explicitly: its default mask is built on CUDA."""
    return torch.triu(torch.ones(1, 1, seq_length, seq_length, dtype=torch.bool, device=device), diagonal=1)


def position_ids(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def token_major(config) -> bool:
    """Whether micro-batches enter the model token-major: megatron's packed-sequence ("thd") layout [b * s, 1, h],
    each sample's tokens one block that attends within itself, positions restarting per sample. Then every
    tenant's rows are one block for the slot-indexed LoRA too, with no transposing copies between megatron's
    [s, b, h] and the per-tenant matmuls (tools/bench.py case 1). Not under sequence parallelism: its split
    along the first dimension would cut a tenant's (and a sample's) tokens across tensor-parallel ranks."""
    return not config.sequence_parallel


def forward_micro_batch(chunk, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """This stage's model chunk on a [b, s] micro-batch, in the layout `token_major` picks. The last stage's
    output (per-token losses with labels, else logits) comes back as [b, s, ...] either way; other stages return
    the hidden states they hand on ([b * s, 1, h] token-major, else [s, b, h])."""
    from megatron.core.packed_seq_params import PackedSeqParams

    b, s = tokens.shape
    if not token_major(chunk.config):
        return chunk(tokens, position_ids(tokens), causal_attention_mask(s, tokens.device), labels=labels)
    # on the host: only SDPAttention reads them (their count and max_seqlen), never on the device
    bounds = torch.arange(0, b * s + 1, s, dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=bounds, cu_seqlens_kv=bounds, max_seqlen_q=s,
                             max_seqlen_kv=s)
    out = chunk(tokens.reshape(1, -1), position_ids(tokens).reshape(1, -1), None,
                labels=None if labels is None else labels.reshape(1, -1), packed_seq_params=packed)
    return out.view(b, s, *out.shape[2:]) if chunk.post_process else out
