"""Walk a megatron GPTModel chunk, put slot-indexed LoRA on the target linears, and freeze the base."""

from __future__ import annotations

import torch

from . import routing as routing_lib
from .experts import track_expert_slots
from .linear import lora_class
from .slots import EXPERT_TARGETS, SlotTable

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


def _global_expert_name(model, name: str, global_name: str) -> str:
    """The local expert index in a path replaced by the global one (experts are sharded over EP ranks)."""
    head, tail = name.split(".experts.local_experts.", 1)
    local = tail.split(".", 1)[0]
    global_index = model.get_submodule(head).local_expert_indices[int(local)]
    marker = ".experts.local_experts."
    return global_name.replace(f"{marker}{local}.", f"{marker}{global_index}.")


def inject_lora(model, table: SlotTable) -> list:
    """Wrap every target linear of `model` (one pipeline chunk) with slot-indexed LoRA; returns the layers.
    The base stops requiring gradients before any wrapping, so no weight gradient of it is ever computed."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    for p in model.parameters():
        p.requires_grad_(False)
    global_names = _global_layer_names(model)
    expert_targets = [k for k in table.target_modules if k in EXPERT_TARGETS]
    layers, moe_layers = [], []
    for name, module in list(model.named_modules()):
        if expert_targets and hasattr(module, "token_dispatcher") and hasattr(module, "experts"):
            moe_layers.append(module)
            continue
        base_kind = name.rsplit(".", 1)[-1]
        if base_kind not in _DENSE_KINDS:
            continue
        expert = ".experts.local_experts." in name
        kind = "expert_" + base_kind.removeprefix("linear_") if expert else base_kind
        if kind not in table.target_modules:
            continue
        column = isinstance(module, ColumnParallelLinear)
        if not column and not isinstance(module, RowParallelLinear):
            raise TypeError(f"{name} is a {type(module).__name__}, not a megatron parallel linear")
        module.__class__ = lora_class(type(module))
        module.attach_lora(
            table, kind, _global_expert_name(model, name, global_names[name]) if expert else global_names[name],
            column=column, tp_group=module.tp_group, sequence_parallel=module.sequence_parallel, expert=expert,
        )
        layers.append(module)
    for module in moe_layers:  # (after its expert linears are wrapped)
        track_expert_slots(module)
    table.layers.extend(layers)
    if getattr(model, "pre_process", False):
        model.embedding.register_forward_hook(_embedding_output_hook(model))
    return layers


def _embedding_output_hook(model):
    """Make the (frozen) embedding output require grad where backward needs it, and nowhere else (it costs the
    first layer's input gradient, ~1/num_layers of the base backward).

    It is needed when the backward must run whatever the micro-batch holds: collectives in backward between
    ranks with different data (the MoE dispatcher across EP ranks, pipeline sends and receives), and
    reentrant activation recompute, which back-propagates only through chunks whose inputs require grad
    (PEFT's enable_input_require_grads, for the same reason). Otherwise it is needed only by a micro-batch
    that trains no LoRA layer (base-only samples), whose loss would have no graph at all."""
    from megatron.core import parallel_state as ps

    always = (ps.get_pipeline_model_parallel_world_size() > 1 or ps.get_expert_model_parallel_world_size() > 1
              or model.config.recompute_granularity is not None)

    def hook(_module, _inputs, output):
        routing = routing_lib.current()
        if always or routing is None or not routing.trains_any_layer:
            output.requires_grad_(True)

    return hook


def lora_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if getattr(p, "lora_param", False)]
