"""Shared by the Hugging Face tests: tiny random transformers models with every weight random."""

import torch


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
