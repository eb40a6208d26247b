"""Tenant adapters <-> Hugging Face PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors).

A tenant's adapter here is ``(spec, tensors)``: a :class:`~megatron_multilora.lora.slots.LoRASpec` (one rank, one
alpha, rslora, the target kinds) and ``{global_name: (A [r, in], B [out, r])}`` -- full, unsharded, sliced to the
tenant's rank, with megatron's layouts and layout-independent names (``decoder.layers.3.self_attention.linear_qkv``,
``decoder.layers.1.mlp.experts.local_experts.2.linear_fc1``, ``decoder.layers.0.mlp.shared_experts.linear_fc2``),
which is what a tenant checkpoint holds (:mod:`megatron_multilora.adapter_checkpoint` reads and writes those).

Export (:func:`export_peft`) maps each layer to Hugging Face module names, exactly (data movement only):

* fused ``linear_qkv``: q_proj, k_proj and v_proj each get the same A; B's rows, [q heads of group g; k_g; v_g]
  per query group (``hf.fuse_qkv``), are split back into q, k and v;
* ``linear_fc1`` (rows [gate; up]) -> gate_proj and up_proj (same A, B split), ``linear_fc2`` -> down_proj,
  ``linear_proj`` -> o_proj; a shared expert's go to ``mlp.shared_expert.*`` (Qwen2-MoE);
* routed experts -> PEFT ``target_parameters`` on transformers 5's packed ``mlp.experts.gate_up_proj``
  [E, 2*ffn, hidden] and ``mlp.experts.down_proj`` [E, hidden, ffn]. PEFT treats a 3-d parameter [E, d1, d2] as
  out = d1, in = d2 (it swaps its in/out features unless the experts module says ``is_transposed``), so
  lora_A is [E*r, hidden] (gate_up) / [E*r, ffn] (down) and lora_B [2*ffn, E*r] / [hidden, E*r]; A's rows are
  expert-major (row e*r + k) but B's columns rank-major (column k*E + e). Two parameters of one module are
  nested wrappers: the first in the module's parameter order (gate_up_proj) is the inner one, saved under
  ``experts.base_layer.lora_*`` when down_proj is targeted too, else under ``experts.lora_*``.

One tenant has one rank and one alpha, so the exported adapter needs no ``rank_pattern`` / ``alpha_pattern``;
modules the tenant does not target are simply absent from ``target_modules`` / ``target_parameters``.

Import (:func:`import_peft`) is the inverse, and also takes adapters trained elsewhere: separate q/k/v (and
gate/up) adapters fuse into one. If their A's are identical (what export writes) they fuse at the same rank --
import(export(x)) reproduces x bit for bit. Otherwise the A's stack and the rank grows to r_q + r_k + r_v with B
block-diagonal; a module absent from the adapter contributes zero rows of B. Per-module ranks and alphas
(``rank_pattern`` / ``alpha_pattern``) are folded into B relative to the tenant's scale, layers of a smaller
rank are zero-padded to the tenant's rank, and a fused rank above ``max_rank`` is an error naming the module.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from .config import ModelConfig
from .lora.slots import LoRASpec

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
PREFIX = "base_model.model."  # PeftModel -> the transformers CausalLM model


class PeftFormatError(ValueError):
    """A PEFT adapter (or a tenant adapter) that cannot be converted exactly; the message names the module."""


# --------------------------------------------------------------------------------------------------------
# Our layers: names, kinds and full shapes of a model config
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerInfo:
    kind: str  # the LoRA target kind (linear_qkv, ..., expert_fc1)
    layer: int
    role: str  # qkv | proj | fc1 | fc2
    place: str  # attention | dense | shared | expert
    expert: int | None
    in_features: int
    out_features: int


def head_dim(mc: ModelConfig) -> int:
    return mc.kv_channels or mc.hidden_size // mc.num_attention_heads


def lora_layers(mc: ModelConfig) -> dict[str, LayerInfo]:
    """Every linear a tenant may adapt, by global name, with its kind and full (unsharded) in/out sizes."""
    d, h = head_dim(mc), mc.hidden_size
    out: dict[str, LayerInfo] = {}
    for i in range(mc.num_layers):
        p = f"decoder.layers.{i}."
        out[p + "self_attention.linear_qkv"] = LayerInfo(
            "linear_qkv", i, "qkv", "attention", None, h, (mc.num_attention_heads + 2 * mc.num_query_groups) * d)
        out[p + "self_attention.linear_proj"] = LayerInfo(
            "linear_proj", i, "proj", "attention", None, mc.num_attention_heads * d, h)
        if not mc.is_moe:
            out[p + "mlp.linear_fc1"] = LayerInfo("linear_fc1", i, "fc1", "dense", None, h, 2 * mc.ffn_hidden_size)
            out[p + "mlp.linear_fc2"] = LayerInfo("linear_fc2", i, "fc2", "dense", None, mc.ffn_hidden_size, h)
            continue
        if mc.moe_shared_expert_intermediate_size:
            f = mc.moe_shared_expert_intermediate_size
            out[p + "mlp.shared_experts.linear_fc1"] = LayerInfo("linear_fc1", i, "fc1", "shared", None, h, 2 * f)
            out[p + "mlp.shared_experts.linear_fc2"] = LayerInfo("linear_fc2", i, "fc2", "shared", None, f, h)
        f = mc.moe_ffn_hidden_size
        for e in range(mc.num_experts):
            q = f"{p}mlp.experts.local_experts.{e}."
            out[q + "linear_fc1"] = LayerInfo("expert_fc1", i, "fc1", "expert", e, h, 2 * f)
            out[q + "linear_fc2"] = LayerInfo("expert_fc2", i, "fc2", "expert", e, f, h)
    return out


def split_qkv(b: torch.Tensor, mc: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """linear_qkv rows (for each query group: its q heads, its k, its v) -> the q, k and v rows. The inverse of
    :func:`megatron_multilora.hf.fuse_qkv`."""
    g, d = mc.num_query_groups, head_dim(mc)
    qd = mc.num_attention_heads // g * d
    t = b.reshape(g, qd + 2 * d, *b.shape[1:])
    parts = (t[:, :qd], t[:, qd:qd + d], t[:, qd + d:])
    return tuple(x.reshape(-1, *b.shape[1:]).contiguous() for x in parts)


def _fuse_rows(role: str, parts: list[torch.Tensor], mc: ModelConfig) -> torch.Tensor:
    if role == "qkv":
        from .hf import fuse_qkv

        return fuse_qkv(*parts, mc.num_query_groups)
    return torch.cat(parts, 0)


_EXPERTS_MODULE = "mlp.experts"
_PACKED = ("gate_up_proj", "down_proj")  # transformers 5 packed experts, in the module's parameter order
_PACKED_OF_ROLE = {"fc1": "gate_up_proj", "fc2": "down_proj"}
_PARTS = {"qkv": ("q_proj", "k_proj", "v_proj"), "fc1": ("gate_proj", "up_proj"), "proj": ("o_proj",),
          "fc2": ("down_proj",)}


def _hf_module(info: LayerInfo) -> str:
    """The Hugging Face module (without the part name) holding a dense layer's parts."""
    base = f"model.layers.{info.layer}."
    if info.place == "attention":
        return base + "self_attn"
    return base + ("mlp.shared_expert" if info.place == "shared" else "mlp")


def _nested_prefix(targeted: list[str], param: str) -> str:
    """PEFT wraps the targeted parameters of one module in its parameter order, each wrapper around the previous
    one: the first is the innermost, reached through one ``base_layer.`` per wrapper around it."""
    order = [p for p in _PACKED if p in targeted]
    return "base_layer." * (len(order) - 1 - order.index(param))


def _check_architecture(mc: ModelConfig, hf_architecture: str | None) -> None:
    if hf_architecture is None:
        return
    from .hf import ARCHITECTURES, SUPPORTED_SUMMARY

    arch = ARCHITECTURES.get(hf_architecture)
    if arch is None:
        raise PeftFormatError(f"Hugging Face architecture {hf_architecture} is not supported; {SUPPORTED_SUMMARY}")
    if arch.moe != mc.is_moe:
        raise PeftFormatError(
            f"{hf_architecture} is {'an MoE' if arch.moe else 'a dense'} architecture but the model config is "
            f"{'MoE' if mc.is_moe else 'dense'}"
        )
    if mc.moe_shared_expert_intermediate_size and not arch.shared_expert:
        raise PeftFormatError(f"{hf_architecture} has no shared expert but the model config has one")


def _default_architecture(mc: ModelConfig) -> str:
    if not mc.is_moe:
        return "Qwen3ForCausalLM" if mc.qk_layernorm else "Qwen2ForCausalLM" if mc.add_qkv_bias else "LlamaForCausalLM"
    if mc.moe_shared_expert_intermediate_size:
        return "Qwen2MoeForCausalLM"
    return "Qwen3MoeForCausalLM" if mc.qk_layernorm else "MixtralForCausalLM"


# --------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------


def _check_tensors(tensors: Mapping, spec: LoRASpec, layers: dict[str, LayerInfo]) -> None:
    for name, (a, b) in tensors.items():
        info = layers.get(name)
        if info is None:
            raise PeftFormatError(f"adapter tensor {name} names no LoRA layer of this model config")
        want_a, want_b = (spec.rank, info.in_features), (info.out_features, spec.rank)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise PeftFormatError(
                f"{name}: A {tuple(a.shape)} / B {tuple(b.shape)} do not match rank {spec.rank} and this model "
                f"config (A {want_a}, B {want_b})"
            )
    kinds = {layers[name].kind for name in tensors}  # a tenant adapts every layer of the kinds it targets
    missing = [name for name, info in layers.items() if info.kind in kinds and name not in tensors]
    if missing:
        raise PeftFormatError(f"the adapter has no weights for {len(missing)} {sorted(kinds)} layers of this model "
                              f"config (first: {missing[0]}): is the model config the adapter's base?")


def _adapts_every_layer(config: Mapping) -> bool:
    """PEFT adapted every layer of its base: targets are module names (no regex, no path into one layer), and
    nothing limits or excludes layers."""
    names = config.get("target_modules") or []
    if isinstance(names, str) or config.get("layers_to_transform") is not None or config.get("exclude_modules"):
        return False
    return not any(re.search(r"(^|\.)layers\.\d+\.", n) for n in [*names, *(config.get("target_parameters") or [])])


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def export_peft(
    tensors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], spec: LoRASpec, model_config: ModelConfig,
    hf_architecture: str | None = None, *, base_model_name_or_path: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """(PEFT state dict, adapter_config) of one tenant's adapter (see the module docstring)."""
    mc = model_config
    _check_architecture(mc, hf_architecture)
    layers = lora_layers(mc)
    _check_tensors(tensors, spec, layers)
    alpha = float(spec.rank if spec.alpha is None else spec.alpha)
    state: dict[str, torch.Tensor] = {}
    modules: set[str] = set()
    experts: dict[tuple[int, str], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    order = {n: i for i, n in enumerate(layers)}
    for name in sorted(tensors, key=order.__getitem__):
        a, b = tensors[name]
        info = layers[name]
        if info.place == "expert":
            experts.setdefault((info.layer, info.role), {})[info.expert] = (a, b)
            continue
        parts = _PARTS[info.role]
        if info.role == "qkv":
            rows = split_qkv(b, mc)
        elif info.role == "fc1":
            rows = tuple(x.contiguous() for x in b.chunk(2, 0))
        else:
            rows = (b,)
        module = _hf_module(info)
        for part, rows_b in zip(parts, rows):
            key = f"{PREFIX}{module}.{part}"
            state[key + ".lora_A.weight"] = a.clone().contiguous()
            state[key + ".lora_B.weight"] = rows_b.clone().contiguous()
            modules.add(part)

    packed_targets: set[str] = set()
    by_layer: dict[int, list[str]] = {}
    for (layer, role), per_expert in experts.items():
        missing = sorted(set(range(mc.num_experts)) - set(per_expert))
        if missing:
            raise PeftFormatError(
                f"layer {layer} expert {role}: experts {missing} have no adapter (PEFT's packed experts need all "
                f"{mc.num_experts})"
            )
        by_layer.setdefault(layer, []).append(_PACKED_OF_ROLE[role])
    for (layer, role), per_expert in experts.items():
        param = _PACKED_OF_ROLE[role]
        a_packed = torch.cat([per_expert[e][0] for e in range(mc.num_experts)], 0)  # row e*r + k
        b_stack = torch.stack([per_expert[e][1] for e in range(mc.num_experts)], 2)  # [out, r, E]
        b_packed = b_stack.reshape(b_stack.shape[0], -1)  # column k*E + e
        key = f"{PREFIX}model.layers.{layer}.{_EXPERTS_MODULE}.{_nested_prefix(by_layer[layer], param)}"
        state[key + "lora_A.weight"] = a_packed.contiguous()
        state[key + "lora_B.weight"] = b_packed.contiguous()
        packed_targets.add(f"{_EXPERTS_MODULE}.{param}")

    if not state:
        raise PeftFormatError("the tenant's adapter has no tensors")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": spec.rank,
        "lora_alpha": _number(alpha),
        "use_rslora": bool(spec.rslora),
        # PEFT refuses dropout on target_parameters (it cannot be factored out of a parametrised weight);
        # dropout is a training setting: inference is the same without it.
        "lora_dropout": 0.0 if packed_targets else float(spec.dropout),
        "target_modules": sorted(modules) or None,
        "target_parameters": sorted(packed_targets) or None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
        "auto_mapping": {"base_model_class": hf_architecture or _default_architecture(mc)},
    }
    return state, config


def write_peft_dir(directory: str | Path, state: Mapping[str, torch.Tensor], adapter_config: Mapping) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (a new or empty directory)."""
    from safetensors.torch import save_file

    from .checkpointing import require_empty_dir

    directory = require_empty_dir(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(dict(adapter_config), indent=2, sort_keys=True) + "\n")
    return directory


# --------------------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------------------


def read_peft_dir(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config, state dict) of a PEFT adapter directory."""
    directory = Path(directory)
    cfg_path = directory / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{directory} is not a PEFT adapter directory (no {ADAPTER_CONFIG})")
    config = json.loads(cfg_path.read_text())
    if (directory / ADAPTER_WEIGHTS).is_file():
        from safetensors.torch import load_file

        state = load_file(str(directory / ADAPTER_WEIGHTS))
    elif (directory / ADAPTER_WEIGHTS_BIN).is_file():
        state = torch.load(directory / ADAPTER_WEIGHTS_BIN, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{directory} has no {ADAPTER_WEIGHTS} (nor {ADAPTER_WEIGHTS_BIN})")
    return config, state


def _pattern_value(patterns: Mapping, key: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the first pattern that
    matches the end of the module key (``model.layers.3.self_attn.q_proj``)."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return patterns[pattern]
    return default


# init_lora_weights values whose adapters PEFT applies to a base it re-initialises at load (residual base)
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


def _check_config(config: Mapping) -> None:
    problems = []
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r} (only LORA)")
    for key, what in (("use_dora", "DoRA"), ("lora_bias", "a LoRA bias"), ("fan_in_fan_out", "fan_in_fan_out"),
                      ("use_qalora", "QALoRA"), ("use_bdlora", "BD-LoRA")):
        if config.get(key):
            problems.append(f"{key}=true ({what} is not plain LoRA)")
    if config.get("bias", "none") not in (None, "none"):
        problems.append(f"bias={config['bias']!r} (trained base biases; only bias='none')")
    for key in ("modules_to_save", "trainable_token_indices", "layer_replication"):
        if config.get(key):
            problems.append(f"{key}={config[key]!r} (only LoRA on linear layers is imported)")
    if config.get("alora_invocation_tokens"):
        problems.append("alora_invocation_tokens set (aLoRA applies the adapter only after those tokens)")
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_CHANGING_INITS):
        problems.append(f"init_lora_weights={config['init_lora_weights']!r} (PEFT changes the base weights at load "
                        "for it: convert the adapter to plain LoRA first, path_initial_model_for_weight_conversion)")
    if problems:
        raise PeftFormatError("cannot import this PEFT adapter: " + "; ".join(problems))


_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(.+?)\.lora_(A|B)(?:\.[A-Za-z0-9_-]+)?\.weight$"
)


@dataclass
class _Module:
    """One PEFT LoRA module: A [r, in], B [out, r] (packed experts: [E*r, in], [out, E*r]) and its scale."""

    key: str  # PEFT's module key (rank/alpha patterns match it), e.g. model.layers.3.self_attn.q_proj
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    rank: int = 0
    scale: float = 1.0
    experts: int = 1  # > 1: a packed-experts parameter


def _parse_modules(config: Mapping, state: Mapping[str, torch.Tensor], mc: ModelConfig) -> dict:
    """{(layer, path): _Module} with path like 'self_attn.q_proj', 'mlp.shared_expert.up_proj',
    'mlp.experts.gate_up_proj' (packed; resolved through the nesting) or 'mlp.experts.3.gate_proj'."""
    modules: dict[tuple[int, str], _Module] = {}
    unknown = []
    for key, tensor in state.items():
        m = _KEY.match(key)
        if m is None:
            unknown.append(key)
            continue
        layer, path, which = int(m.group(1)), m.group(2), m.group(3)
        if layer >= mc.num_layers:
            raise PeftFormatError(f"{key}: layer {layer}, but the model has {mc.num_layers} layers")
        modules.setdefault((layer, path), _Module(f"model.layers.{layer}.{path}"))
        setattr(modules[(layer, path)], which.lower(), tensor)
    if unknown:
        raise PeftFormatError(
            f"{len(unknown)} adapter tensors are not LoRA A/B weights of decoder layers (embeddings, lm_head, "
            f"DoRA magnitudes, biases and modules_to_save cannot be imported): {sorted(unknown)[:6]}"
        )
    # packed experts: undo PEFT's nesting of the parameter wrappers
    targets = list(config.get("target_parameters") or [])
    resolved: dict[tuple[int, str], _Module] = {}
    for (layer, path), module in modules.items():
        if module.a is None or module.b is None:
            raise PeftFormatError(f"{module.key}: lora_A or lora_B is missing")
        stripped = path.replace(".base_layer", "")
        if stripped in (_EXPERTS_MODULE, "block_sparse_moe.experts"):
            here = [p for p in _PACKED if any(f"model.layers.{layer}.{stripped}.{p}" == t
                                              or f"model.layers.{layer}.{stripped}.{p}".endswith("." + t)
                                              for t in targets)]
            depth = path.count("base_layer")
            if depth >= len(here):
                raise PeftFormatError(
                    f"{module.key}: a packed-experts adapter, but target_parameters {targets} do not name "
                    f"{stripped}.gate_up_proj / down_proj of layer {layer} (nesting depth {depth})"
                )
            param = here[len(here) - 1 - depth]
            key = f"model.layers.{layer}.{stripped}.{param}"
            resolved[(layer, f"{_EXPERTS_MODULE}.{param}")] = _Module(key, module.a, module.b,
                                                                      experts=mc.num_experts or 1)
        else:
            if "base_layer" in path:
                raise PeftFormatError(f"{module.key}: nested adapters are only understood on packed experts")
            resolved[(layer, path)] = module
    # ranks and scales
    r0, alpha0 = int(config.get("r", 8)), config.get("lora_alpha", 8)
    rslora = bool(config.get("use_rslora", False))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    for module in resolved.values():
        experts = module.experts
        if module.a.ndim != 2 or module.b.ndim != 2 or module.a.shape[0] != module.b.shape[1] \
                or module.a.shape[0] % experts:
            raise PeftFormatError(
                f"{module.key}: lora_A {tuple(module.a.shape)} and lora_B {tuple(module.b.shape)} are not a LoRA "
                f"pair" + (f" over {experts} experts" if experts > 1 else "")
            )
        module.rank = module.a.shape[0] // experts
        declared = int(_pattern_value(rank_pattern, module.key, r0))
        if declared != module.rank:
            raise PeftFormatError(
                f"{module.key}: lora_A has rank {module.rank} but adapter_config gives r = {declared}"
            )
        alpha = float(_pattern_value(alpha_pattern, module.key, alpha0))
        module.scale = alpha / (math.sqrt(module.rank) if rslora else module.rank)
    return resolved


def _component_path(info: LayerInfo, part: str) -> str:
    if info.place == "attention":
        return f"self_attn.{part}"
    if info.place == "shared":
        return f"mlp.shared_expert.{part}"
    if info.place == "dense":
        return f"mlp.{part}"
    raise AssertionError(info)


_OLD_EXPERT_PARTS = {  # per-expert modules (transformers 4): (gate, up) / down
    "fc1": (("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj"),
            ("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3")),
    "fc2": (("mlp.experts.{e}.down_proj",), ("block_sparse_moe.experts.{e}.w2",)),
}


@dataclass
class _Fused:
    a: torch.Tensor  # [rank, in]
    b: torch.Tensor  # [out, rank], rows in our layout


def _shares_a(comps: list[tuple[str, _Module | None, int]]) -> bool:
    present = [m for _, m, _ in comps if m is not None]
    return all(m.a.shape == present[0].a.shape and torch.equal(m.a, present[0].a) for m in present)


def _fused_ranks(comps: list[tuple[str, _Module | None, int]]) -> list[int]:
    """The ranks that add up to the fused layer's rank: one if the parts share A, else one per part."""
    present = [m for _, m, _ in comps if m is not None]
    return [present[0].rank] if _shares_a(comps) else [m.rank for m in present]


def _fuse(info: LayerInfo, comps: list[tuple[str, _Module | None, int]], mc: ModelConfig, scale: float) -> _Fused:
    """One of our layers from its PEFT parts [(part name, module or None, rows)]: identical A's share the rank,
    different ones stack (rank grows, B block-diagonal); B is rescaled from each part's scale to ``scale``."""
    present = [(p, m, n) for p, m, n in comps if m is not None]

    def scaled(m: _Module, b: torch.Tensor) -> torch.Tensor:
        return b if m.scale == scale else b * (m.scale / scale)

    for p, m, n in present:
        if m.b.shape[0] != n or m.a.shape[1] != info.in_features:
            raise PeftFormatError(
                f"{m.key}: lora_A {tuple(m.a.shape)} / lora_B {tuple(m.b.shape)} do not fit the model "
                f"(in {info.in_features}, out {n})"
            )
    a0 = present[0][1].a
    if _shares_a(comps):
        rank = a0.shape[0]
        rows = [scaled(m, m.b) if m is not None else torch.zeros(n, rank, dtype=a0.dtype) for _, m, n in comps]
        return _Fused(a0, _fuse_rows(info.role, rows, mc))
    a = torch.cat([m.a for _, m, _ in present], 0)
    rank, offset, rows = a.shape[0], 0, []
    for _, m, n in comps:
        block = torch.zeros(n, rank, dtype=a.dtype)
        if m is not None:
            block[:, offset:offset + m.rank] = scaled(m, m.b)
            offset += m.rank
        rows.append(block)
    return _Fused(a, _fuse_rows(info.role, rows, mc))


def import_peft(peft_dir: str | Path | tuple[dict, dict], model_config: ModelConfig, max_rank: int,
                ) -> tuple[LoRASpec, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A PEFT LoRA adapter (a directory, or ``(adapter_config, state_dict)``) -> ``(spec, tensors)`` of a tenant
    (see the module docstring). Raises :class:`PeftFormatError` naming the module that cannot be imported
    exactly or whose fused rank exceeds ``max_rank``."""
    mc = model_config
    config, state = read_peft_dir(peft_dir) if isinstance(peft_dir, (str, Path)) else peft_dir
    _check_config(config)
    modules = _parse_modules(config, state, mc)
    layers = lora_layers(mc)
    rslora = bool(config.get("use_rslora", False))
    r0, alpha0 = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    default_scale = alpha0 / (math.sqrt(r0) if rslora else r0)

    # which PEFT modules make each of our layers: [(part, module or None, its rows of our B)]
    groups: dict[str, list[tuple[str, _Module | None, int]]] = {}
    used: set[tuple[int, str]] = set()
    for name, info in layers.items():
        if info.place == "expert":
            packed = modules.get((info.layer, f"{_EXPERTS_MODULE}.{_PACKED_OF_ROLE[info.role]}"))
            if packed is not None:
                used.add((info.layer, f"{_EXPERTS_MODULE}.{_PACKED_OF_ROLE[info.role]}"))
                e, n_e, r = info.expert, mc.num_experts, packed.rank
                a = packed.a[e * r:(e + 1) * r]
                b = packed.b.reshape(packed.b.shape[0], r, n_e)[:, :, e]
                m = _Module(f"{packed.key}[expert {e}]", a.contiguous(), b.contiguous(), r, packed.scale)
                groups[name] = [(_PACKED_OF_ROLE[info.role], m, info.out_features)]
                continue
            for style in _OLD_EXPERT_PARTS[info.role]:
                paths = [p.format(e=info.expert) for p in style]
                found = [modules.get((info.layer, p)) for p in paths]
                if any(found):
                    used.update((info.layer, p) for p, f in zip(paths, found) if f is not None)
                    rows = info.out_features // len(paths)
                    groups[name] = [(p, f, rows) for p, f in zip(paths, found)]
                    break
            continue
        parts = _PARTS[info.role]
        paths = [_component_path(info, p) for p in parts]
        found = [modules.get((info.layer, p)) for p in paths]
        if not any(found):
            continue
        used.update((info.layer, p) for p, f in zip(paths, found) if f is not None)
        if info.role == "qkv":
            d = head_dim(mc)
            rows = [mc.num_attention_heads * d, mc.num_query_groups * d, mc.num_query_groups * d]
        else:
            rows = [info.out_features // len(parts)] * len(parts)
        groups[name] = [(f"model.layers.{info.layer}.{p}", f, n) for p, f, n in zip(paths, found, rows)]
    if _adapts_every_layer(config):  # then the adapter's base and this one must have the same layers
        adapted = sorted({layer for layer, _ in used})
        if adapted != list(range(mc.num_layers)):
            raise PeftFormatError(f"the adapter adapts layers {adapted} but this base has {mc.num_layers} layers "
                                  "(adapter_config.json sets no layers_to_transform): is it the adapter's base?")
    leftover = sorted(modules[k].key for k in set(modules) - used)
    if leftover:
        raise PeftFormatError(
            f"{len(leftover)} adapted modules have no place in this model (another architecture?): {leftover[:6]}"
        )
    if not groups:
        raise PeftFormatError("the PEFT adapter adapts no module of this model")

    ranks = {name: _fused_ranks(comps) for name, comps in groups.items()}
    for name, parts_ranks in ranks.items():
        if sum(parts_ranks) > max_rank:
            info = layers[name]
            parts = ", ".join(p for p, m, _ in groups[name] if m is not None)
            what = " + ".join(str(r) for r in parts_ranks)
            raise PeftFormatError(
                f"{parts} (layer {info.layer}) fuse into our {info.kind} adapter {name} of rank {sum(parts_ranks)}"
                + (f" ({what}: their A's differ, so they stack)" if len(parts_ranks) > 1 else "")
                + f", more than max_rank {max_rank}"
            )
    rank = max(sum(r) for r in ranks.values())
    alpha = alpha0 if rank == r0 else default_scale * (math.sqrt(rank) if rslora else rank)
    targets = tuple(sorted({layers[name].kind for name in groups}))
    spec = LoRASpec(rank=rank, alpha=float(alpha), target_modules=targets, rslora=rslora,
                    dropout=float(config.get("lora_dropout", 0.0) or 0.0))
    # B's rescaled from each module's scale to the tenant's (untouched where they are equal: bit exact)
    dtype = next(m.a.dtype for comps in groups.values() for _, m, _ in comps if m is not None)
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, info in layers.items():
        if info.kind not in targets:
            continue
        if name in groups:
            f = _fuse(info, groups[name], mc, spec.scale)
            a, b = f.a, f.b
        else:  # a layer of a targeted kind the adapter leaves alone (layers_to_transform...): no delta
            a, b = torch.zeros(0, info.in_features, dtype=dtype), torch.zeros(info.out_features, 0, dtype=dtype)
        if a.shape[0] < rank:
            a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])], 0)
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], 1)
        tensors[name] = (a.contiguous(), b.contiguous())
    return spec, tensors
