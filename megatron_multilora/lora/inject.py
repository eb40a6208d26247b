"""Walk a megatron GPTModel chunk, put slot-indexed LoRA on the target linears, and freeze the base."""

from __future__ import annotations

import torch

from .linear import lora_class
from .slots import SlotTable

_DENSE_KINDS = {"linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"}


def _global_layer_names(model) -> dict[str, str]:
    """Module path -> layout-independent path (local layer index replaced by megatron's global layer number),
    so initialisation and checkpoints name the same layer the same way at every pipeline layout."""
    names = {}
    for local_idx, layer in enumerate(model.decoder.layers):
        prefix = f"decoder.layers.{local_idx}"
        global_prefix = f"decoder.layers.{layer.layer_number - 1}"
        for sub, _ in layer.named_modules(prefix=prefix):
            names[sub] = global_prefix + sub[len(prefix):]
    return names


def inject_lora(model, table: SlotTable) -> list:
    """Wrap every target linear of `model` (one pipeline chunk) with slot-indexed LoRA; returns the layers.
    The base stops requiring gradients before any wrapping, so no weight gradient of it is ever computed."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    for p in model.parameters():
        p.requires_grad_(False)
    global_names = _global_layer_names(model)
    layers = []
    for name, module in list(model.named_modules()):
        kind = name.rsplit(".", 1)[-1]
        if kind not in _DENSE_KINDS or ".experts.local_experts." in name:
            continue
        if kind not in table.target_modules:
            continue
        column = isinstance(module, ColumnParallelLinear)
        if not column and not isinstance(module, RowParallelLinear):
            raise TypeError(f"{name} is a {type(module).__name__}, not a megatron parallel linear")
        module.__class__ = lora_class(type(module))
        module.attach_lora(
            table, kind, global_names.get(name, name), column=column, tp_group=module.tp_group,
            sequence_parallel=module.sequence_parallel,
        )
        layers.append(module)
    table.layers.extend(layers)
    if getattr(model, "pre_process", False) and model.config.recompute_granularity is not None:
        # Reentrant activation checkpointing only runs a chunk's backward when one of its *inputs* requires
        # grad; with a frozen embedding none does, and the first stage's LoRA would get no gradient.
        model.embedding.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    return layers


def lora_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if getattr(p, "lora_param", False)]
