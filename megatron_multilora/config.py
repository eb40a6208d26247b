"""Model configuration: dataclasses, presets from configs/models/, and validation with clear errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"


class ConfigError(ValueError):
    """A configuration problem, reported before any process group or model is created."""


@dataclass
class ModelConfig:
    """A Llama-family decoder (RMSNorm, SwiGLU, RoPE, grouped-query attention), optionally with MoE layers."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    vocab_size: int
    num_query_groups: int | None = None
    max_position_embeddings: int = 4096
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    untie_embeddings_and_output_weights: bool = True
    add_qkv_bias: bool = False
    params_dtype: str = "float32"
    # MoE (num_experts None = dense)
    num_experts: int | None = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    moe_shared_expert_intermediate_size: int | None = None
    moe_shared_expert_gate: bool = False
    moe_router_pre_softmax: bool = False  # True: softmax over all experts, then top-k (Qwen2-MoE)

    def __post_init__(self):
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_query_groups {self.num_query_groups}"
            )
        if self.params_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"model.params_dtype must be float32, bfloat16 or float16, got {self.params_dtype!r}")
        if self.num_experts is not None:
            if self.num_experts < 1 or not 1 <= self.moe_router_topk <= self.num_experts:
                raise ConfigError(
                    f"model.moe_router_topk {self.moe_router_topk} must be between 1 and "
                    f"num_experts {self.num_experts}"
                )
            if self.moe_ffn_hidden_size is None:
                self.moe_ffn_hidden_size = self.ffn_hidden_size

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.params_dtype)

    def validate_layout(self, tp: int, pp: int, ep: int, sequence_parallel: bool) -> None:
        """Errors megatron would raise later (or not at all), raised first and in our words."""
        if self.num_attention_heads % tp or self.num_query_groups % tp:
            raise ConfigError(
                f"--tensor-model-parallel-size {tp} must divide num_attention_heads "
                f"{self.num_attention_heads} and num_query_groups {self.num_query_groups}"
            )
        if self.ffn_hidden_size % tp or (self.moe_ffn_hidden_size or tp) % tp:
            raise ConfigError(f"--tensor-model-parallel-size {tp} must divide the MLP hidden sizes")
        if self.num_layers % pp:
            raise ConfigError(
                f"--pipeline-model-parallel-size {pp} must divide num_layers {self.num_layers}"
            )
        if ep > 1 and not self.is_moe:
            raise ConfigError("--expert-model-parallel-size > 1 needs a model with num_experts")
        if self.is_moe and self.num_experts % ep:
            raise ConfigError(
                f"--expert-model-parallel-size {ep} must divide num_experts {self.num_experts}"
            )
        if self.is_moe and tp > 1 and not sequence_parallel:
            raise ConfigError("MoE with --tensor-model-parallel-size > 1 needs --sequence-parallel")
        if sequence_parallel and tp == 1:
            raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def model_config_from(spec: str | dict | ModelConfig) -> ModelConfig:
    """A preset name, a YAML path, a dict of fields (optionally {"preset": name, ...overrides})."""
    if isinstance(spec, ModelConfig):
        return spec
    if isinstance(spec, str):
        path = Path(spec)
        if not path.suffix:
            path = PRESET_DIR / f"{spec}.yaml"
            if not path.exists():
                raise ConfigError(f"unknown model preset {spec!r}; presets: {', '.join(presets())}")
        if not path.exists():
            raise ConfigError(f"model config file not found: {path}")
        return model_config_from(yaml.safe_load(path.read_text()) or {})
    if not isinstance(spec, dict):
        raise ConfigError(f"model must be a preset name or a mapping, got {type(spec).__name__}")
    spec = dict(spec)
    base = model_config_from(spec.pop("preset")).to_dict() if "preset" in spec else {}
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ConfigError(f"unknown model field(s) {unknown}; known: {sorted(known)}")
    base.update(spec)
    try:
        return ModelConfig(**base)
    except TypeError as e:
        raise ConfigError(f"model config: {e}") from None
