"""Shared by the Hugging Face tests: tiny random transformers models with every weight random."""

import torch

ARCHITECTURES = ("llama", "mistral", "qwen2", "mixtral", "qwen2moe", "qwen3moe")  # tiny_configs' keys
MOE = ("mixtral", "qwen2moe", "qwen3moe")


def tiny_configs(vocab_size: int) -> dict:
    """One tiny config per supported architecture: Llama (GQA), Mistral (sliding window longer than the tests'
    sequences), Qwen2 (qkv bias, tied embeddings), Mixtral (packed experts), Qwen2-MoE (gated shared expert,
    unnormalised top-k), Qwen3-MoE (head_dim != hidden / heads, q / k norms)."""
    from transformers import (LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config, Qwen2MoeConfig,
                              Qwen3MoeConfig)

    common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
    rope = lambda theta: dict(rope_parameters={"rope_type": "default", "rope_theta": theta})  # noqa: E731
    return {
        "llama": LlamaConfig(**common, intermediate_size=96, tie_word_embeddings=False, **rope(5000.0)),
        "mistral": MistralConfig(**common, intermediate_size=96, sliding_window=64, **rope(1e4)),
        "qwen2": Qwen2Config(**common, intermediate_size=96, tie_word_embeddings=True, **rope(20000.0)),
        "mixtral": MixtralConfig(**common, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                                 **rope(1e6)),
        "qwen2moe": Qwen2MoeConfig(**common, intermediate_size=96, num_experts=4, num_experts_per_tok=2,
                                   moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                   norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[], **rope(1e4)),
        "qwen3moe": Qwen3MoeConfig(**common, intermediate_size=96, num_experts=4, num_experts_per_tok=2,
                                   moe_intermediate_size=32, norm_topk_prob=True, head_dim=32,
                                   decoder_sparse_step=1, mlp_only_layers=[], **rope(1e4)),
    }


def randomize(model):
    """Every weight random (HF zero-inits biases and sets norms to 1, which would hide mapping mistakes)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("gate.weight") and "shared_expert" not in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))  # decisive routing: no near-ties
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()
