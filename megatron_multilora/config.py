"""Model and run configuration: dataclasses, presets from configs/models/, YAML loading, and validation with
clear errors (before any process group or model is created)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from .lora.slots import ALL_TARGETS, DENSE_TARGETS, EXPERT_TARGETS

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
    # A Hugging Face model's attention window (Mistral): attention here is full causal, the same only for
    # sequences that fit the window, so max_position_embeddings may not exceed it. None: no window.
    sliding_window: int | None = None
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    untie_embeddings_and_output_weights: bool = True
    add_qkv_bias: bool = False
    kv_channels: int | None = None  # attention head size; None = hidden_size / num_attention_heads (Qwen3: 128)
    qk_layernorm: bool = False  # RMSNorm of each query / key head before RoPE (Qwen3)
    params_dtype: str = "float32"
    init_method_std: float = 0.02  # random initialisation of a base that is not imported (Megatron's flag)
    # MoE (num_experts None = dense)
    num_experts: int | None = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    moe_shared_expert_intermediate_size: int | None = None
    moe_shared_expert_gate: bool = False
    moe_router_pre_softmax: bool = False  # True: softmax over all experts, then top-k (Qwen2-MoE)

    def __post_init__(self):
        _normalize(self, "model")  # types first: a YAML string "1e-5" or a float topk would fail inside torch
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.kv_channels is not None and (not isinstance(self.kv_channels, int) or self.kv_channels < 1):
            raise ConfigError(f"model.kv_channels must be a positive integer or null, got {self.kv_channels!r}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_query_groups {self.num_query_groups}"
            )
        if self.sliding_window is not None:
            if not isinstance(self.sliding_window, int) or self.sliding_window < 1:
                raise ConfigError(f"model.sliding_window must be a positive integer or null, got "
                                  f"{self.sliding_window!r}")
            if self.max_position_embeddings > self.sliding_window:
                raise ConfigError(
                    f"model.max_position_embeddings {self.max_position_embeddings} exceeds sliding_window "
                    f"{self.sliding_window}: attention here is full causal, which is this model's only for "
                    f"sequences within its window")
        if self.params_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"model.params_dtype must be float32, bfloat16 or float16, got {self.params_dtype!r}")
        if self.num_experts is not None:
            if self.num_experts < 1:
                raise ConfigError(f"model.num_experts must be >= 1 (or null: dense), got {self.num_experts}")
            if not 1 <= self.moe_router_topk <= self.num_experts:
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
    if isinstance(spec, Path):
        spec = str(spec)
    if isinstance(spec, str):
        path = Path(spec)
        # A preset name first: names like "qwen1.5-moe-a2.7b" have a Path suffix (".7b") but are no file.
        preset = PRESET_DIR / f"{spec}.yaml"
        if "/" not in spec and "\\" not in spec and preset.exists():
            path = preset
        elif path.suffix not in (".yaml", ".yml") and not path.exists():
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


# ==================================================================================================
# Run configuration: the LoRA pool, the tenants, and the training / parallel settings
# ==================================================================================================
#
# Life of a run config:  YAML (paths resolved against the file's directory)  +  command-line overrides
# (paths as given, i.e. relative to the working directory)  ->  ``run_config_from_dict``  ->  RunConfig
# (types checked, defaults that depend on other sections filled in)  ->  ``validate(run, world_size)``
# (every value checked; all problems reported at once)  ->  process groups, model, ...

# the LoRA target names, defined once with the slot table
DENSE_TARGET_MODULES, EXPERT_TARGET_MODULES, TARGET_MODULES = DENSE_TARGETS, EXPERT_TARGETS, ALL_TARGETS
LORA_INITS = ("kaiming", "gaussian")
LR_DECAY_STYLES = ("constant", "linear", "cosine")  # = optim.DECAY_STYLES (not imported: optim imports torch)
EXIT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")  # --exit-signal (Megatron-LM's choices)
DISTRIBUTED_BACKENDS = ("gloo", "nccl")
TENANT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
TENANT_NAME_MAX_LEN = 64
# Fields holding input paths: relative values in a YAML file are resolved against the file's directory.
# Output paths (save, load, tensorboard_dir, metrics_file) stay relative to the working directory, as in
# Megatron-LM (save and load usually name the same directory).
_RUN_INPUT_PATHS = ("tokenizer", "load_base", "tenants_dir")
_TENANT_INPUT_PATHS = ("train_data", "valid_data")


@dataclass
class LoRAPoolConfig:
    """The adapter pool allocated once at start-up: ``max_slots`` adapters of rank up to ``max_rank``."""

    max_slots: int
    max_rank: int
    # None: the four dense linears, plus the expert linears when the model is MoE (filled in by RunConfig).
    target_modules: list[str] | None = None
    # True: tenants beyond max_slots wait for a free slot; False: more tenants than slots is an error.
    queue: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules) if self.target_modules is not None else None
        return d


@dataclass
class TenantConfig:
    """One LoRA adapter and its training: data, rank / alpha, and optimizer settings (Megatron-LM names)."""

    name: str  # also a directory name (checkpoints, TensorBoard): [A-Za-z0-9][A-Za-z0-9_.-]*, <= 64 chars
    rank: int
    lr: float
    train_data: str  # JSONL file
    alpha: float | None = None  # None -> rank (scaling alpha / rank = 1)
    rslora: bool = False  # scaling alpha / sqrt(rank) instead of alpha / rank
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None -> the pool's; must be a subset of them
    init: str = "kaiming"  # init of A, as PEFT's init_lora_weights (True = "kaiming", "gaussian"); B starts at 0
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None  # None -> this tenant's train_iters, else the run's train_iters
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float | None = 1.0  # 0 or None: no clipping
    global_batch_size: int = 8
    train_iters: int | None = None  # this tenant's own optimizer steps; None = until the run (or max_epochs) ends
    max_epochs: int | None = None
    valid_data: str | None = None  # None: the tenant is not evaluated
    seed: int | None = None  # its data order (None -> the run's seed); initial weights: run seed, name, layer

    def __post_init__(self):
        if self.alpha is None and isinstance(self.rank, int) and not isinstance(self.rank, bool):
            self.alpha = float(self.rank)
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            self.target_modules = list(self.target_modules)

    @property
    def scaling(self) -> float:
        """The factor applied to B @ A: alpha / rank (alpha / sqrt(rank) with rslora)."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def decay_iters(self, run_train_iters: int | None) -> int | None:
        """Resolved ``lr_decay_iters``: explicit, else this tenant's train_iters, else the run's."""
        if self.lr_decay_iters is not None:
            return self.lr_decay_iters
        return self.train_iters if self.train_iters is not None else run_train_iters

    @property
    def decays_over_run(self) -> bool:
        """Its learning rate decays over the run's train_iters (counted in its own steps): a decaying schedule
        with neither its own lr_decay_iters nor its own train_iters."""
        return self.lr_decay_style != "constant" and self.lr_decay_iters is None and self.train_iters is None

    def lr_schedule(self, run_train_iters: int | None):
        """This tenant's :class:`megatron_multilora.optim.LRSchedule`."""
        from megatron_multilora.optim import LRSchedule

        constant = self.lr_decay_style == "constant"
        return LRSchedule(
            lr=self.lr,
            min_lr=self.min_lr,
            warmup_iters=self.lr_warmup_iters,
            decay_iters=None if constant else self.decay_iters(run_train_iters),
            decay_style=self.lr_decay_style,
        )

    def hyper_params(self, run_train_iters: int | None):
        """This tenant's :class:`megatron_multilora.optim.SlotHyperParams`."""
        from megatron_multilora.optim import SlotHyperParams

        return SlotHyperParams(
            schedule=self.lr_schedule(run_train_iters),
            weight_decay=self.weight_decay,
            betas=(self.adam_beta1, self.adam_beta2),
            eps=self.adam_eps,
            clip_grad=self.clip_grad,
        )

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if d["target_modules"] is not None:
            d["target_modules"] = list(d["target_modules"])
        return d


# Tenant fields a run may give defaults for (tenant_defaults: / --lr, --global-batch-size, ...).
TENANT_DEFAULT_FIELDS = tuple(
    f.name for f in fields(TenantConfig) if f.name not in ("name", "train_data", "valid_data")
)


MOE_TOKEN_DISPATCHERS = ("allgather", "alltoall")


@dataclass
class RunConfig:
    """Everything a run needs. Field names are Megatron-LM's argument names (``--seq-length`` -> seq_length)."""

    model: ModelConfig  # a preset name, a YAML path, or a mapping are accepted and converted
    lora: LoRAPoolConfig  # a mapping is accepted and converted
    tenants: list[TenantConfig] = dataclasses.field(default_factory=list)
    # Defaults for fields tenants do not set (applied when tenants are loaded; kept for tenants added later).
    tenant_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    # parallelism
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    sequence_parallel: bool = False
    moe_token_dispatcher_type: str = "allgather"  # or "alltoall"; expert LoRA follows tokens through both
    # training
    micro_batch_size: int = 1
    seq_length: int | None = None  # None -> model.max_position_embeddings
    train_iters: int | None = None  # required
    max_samples_per_iteration: int | None = None  # None: every active tenant steps every iteration
    recompute_activations: bool = False
    pack_sequences: bool = False
    seed: int = 1234
    # leaving early (Megatron-LM's flags): a run checkpoint is saved first, --load resumes exactly
    exit_interval: int | None = None  # leave after an iteration that is a multiple of this
    exit_duration_in_mins: float | None = None  # leave after the first iteration past this many minutes
    exit_signal_handler: bool = False  # leave after the iteration during which exit_signal arrived
    exit_signal: str = "SIGTERM"
    # data
    # a tokenizer.json (or a directory with one), or "byte" (the built-in byte-level one); None: the one beside
    # load_base if it has one, else byte-level
    tokenizer: str | None = None
    tenants_dir: str | None = None  # a directory of one YAML file per tenant
    tenants_dir_idle_wait: float = 0.0  # seconds an idle job (no tenant running or queued) waits for one to join
    # checkpointing
    load_base: str | None = None  # base model dist checkpoint (None: random init, for tests / demos)
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    keep_last_checkpoints: int | None = None  # None: keep all
    # evaluation and logging
    eval_interval: int | None = 1000  # None: no periodic evaluation
    eval_iters: int = 100  # 0: no evaluation
    log_interval: int = 100
    tensorboard_dir: str | None = None
    metrics_file: str | None = None
    # distributed
    distributed_backend: str | None = None  # None: nccl with CUDA, else gloo
    distributed_timeout_minutes: int = 10

    def __post_init__(self):
        if not isinstance(self.model, ModelConfig):
            self.model = model_config_from(self.model)
        if isinstance(self.lora, dict):
            self.lora = _build(LoRAPoolConfig, self.lora, "lora")
        if not isinstance(self.lora, LoRAPoolConfig):
            raise ConfigError(f"lora must be a mapping, got {type(self.lora).__name__}")
        if not isinstance(self.tenants, (list, tuple)):
            raise ConfigError(f"tenants must be a list, got {type(self.tenants).__name__}")
        self.tenant_defaults = _check_tenant_defaults(self.tenant_defaults)
        self.tenants = [
            t if isinstance(t, TenantConfig) else tenant_from_dict(t, f"tenants[{i}]", self.tenant_defaults)
            for i, t in enumerate(self.tenants)
        ]
        if self.distributed_backend == "auto":
            self.distributed_backend = None
        _normalize(self, "")
        self.resolve()

    def resolve(self) -> None:
        """Fill in defaults that depend on other sections (idempotent; :func:`validate` calls it too)."""
        if self.lora.target_modules is None:
            self.lora.target_modules = list(DENSE_TARGET_MODULES) + (
                list(EXPERT_TARGET_MODULES) if self.model.is_moe else []
            )
        for tenant in self.tenants:
            self.resolve_tenant(tenant)
        if self.seq_length is None:
            self.seq_length = self.model.max_position_embeddings
        if self.tokenizer is None and self.load_base is not None:
            # An imported base ships its model's tokenizer.json (convert_checkpoint.py import-hf): the token ids
            # the base knows ("byte" keeps the byte-level tokenizer).
            found = _base_tokenizer(Path(self.load_base))
            if found is not None:
                self.tokenizer = str(found)

    @property
    def byte_tokenizer(self) -> bool:
        """Tokenized by the built-in byte-level tokenizer (``tokenizer`` "byte", or None with no base's)."""
        return self.tokenizer in (None, "byte")

    def resolve_tenant(self, tenant: TenantConfig) -> None:
        if tenant.target_modules is None and self.lora.target_modules is not None:
            tenant.target_modules = list(self.lora.target_modules)

    def seed_of(self, tenant: TenantConfig) -> int:
        return self.seed if tenant.seed is None else tenant.seed

    def parallel_layout(self):
        """The :class:`megatron_multilora.platform.ParallelLayout` of this run."""
        from megatron_multilora.platform import ParallelLayout

        return ParallelLayout(
            tensor_model_parallel_size=self.tensor_model_parallel_size,
            pipeline_model_parallel_size=self.pipeline_model_parallel_size,
            expert_model_parallel_size=self.expert_model_parallel_size,
            sequence_parallel=self.sequence_parallel,
        )

    def tenant(self, name: str) -> TenantConfig:
        for t in self.tenants:
            if t.name == name:
                return t
        raise KeyError(f"unknown tenant {name!r}; tenants: {[t.name for t in self.tenants]}")

    def to_dict(self) -> dict[str, Any]:
        """Plain types only; ``load_run_config(run.to_dict())`` gives an equal RunConfig."""
        d: dict[str, Any] = {"model": self.model.to_dict(), "lora": self.lora.to_dict(),
                             "tenants": [t.to_dict() for t in self.tenants]}
        for f in fields(self):
            if f.name not in d:
                d[f.name] = copy.deepcopy(getattr(self, f.name))
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def save_yaml(self, path: str | Path) -> Path:
        """Write the resolved config (e.g. next to the checkpoints); load it back with :func:`load_run_config`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_yaml())
        os.replace(tmp, path)
        return path


# ---------------------------------------------------------------------------------------------- types


def _is_optional(hint) -> tuple[bool, Any]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return len(args) < len(typing.get_args(hint)), args[0] if len(args) == 1 else hint
    return False, hint


def _coerce(value, hint, where: str):
    """``value`` as type ``hint`` (int, float, bool, str, list[str], optionally ``| None``), or ConfigError."""
    optional, hint = _is_optional(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: a value is required (got null)")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            result = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                result = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        else:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(result):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return result
    if hint is str:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if typing.get_origin(hint) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return list(value)
    if typing.get_origin(hint) is dict or hint is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return value  # nested configs are converted by their owners


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _normalize(obj, prefix: str) -> None:
    """Check / convert the type of every plain field of a config dataclass, in place."""
    hints = _hints(type(obj))
    for f in fields(obj):
        if f.name in ("model", "lora", "tenants"):
            continue
        where = f"{prefix}.{f.name}" if prefix else f.name
        setattr(obj, f.name, _coerce(getattr(obj, f.name), hints[f.name], where))


def _required(cls) -> list[str]:
    return [f.name for f in fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def _check_keys(cls, data, where: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the run config'} must be a mapping, got {type(data).__name__}")
    known = [f.name for f in fields(cls)]
    unknown = [k for k in data if k not in known]
    if unknown:
        raise ConfigError(
            f"{where + ': ' if where else ''}unknown key(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(known)}"
        )


def _build(cls, data: dict, where: str):
    _check_keys(cls, data, where)
    missing = [k for k in _required(cls) if k not in data]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(missing)}")
    obj = cls(**data)
    _normalize(obj, where)
    return obj


def _check_tenant_defaults(defaults: dict) -> dict:
    """Keys and types of a tenant_defaults mapping (the normalized mapping is returned)."""
    if not isinstance(defaults, dict):
        raise ConfigError(f"tenant_defaults must be a mapping, got {type(defaults).__name__}")
    bad = [k for k in defaults if k not in TENANT_DEFAULT_FIELDS]
    if bad:
        raise ConfigError(
            f"tenant_defaults: unknown or per-tenant-only key(s) {', '.join(map(repr, bad))}; "
            f"known: {', '.join(TENANT_DEFAULT_FIELDS)}"
        )
    hints = _hints(TenantConfig)
    return {k: _coerce(v, hints[k], f"tenant_defaults.{k}") for k, v in defaults.items()}


def tenant_from_dict(data: dict, where: str = "tenant", defaults: dict | None = None) -> TenantConfig:
    """A TenantConfig from a mapping (``defaults`` fill in the fields it does not set); types are checked."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of tenant fields, got {type(data).__name__}")
    _check_keys(TenantConfig, data, where)
    merged = {**(defaults or {}), **data}
    tenant = _build(TenantConfig, merged, where)
    if tenant.alpha is None:
        tenant.alpha = float(tenant.rank)
    return tenant


# ---------------------------------------------------------------------------------------------- loading


def _resolve_path(value, base_dir: Path | None):
    if base_dir is None or not isinstance(value, (str, Path)) or value in ("", "byte"):
        return value
    path = Path(value).expanduser()
    return str(path) if path.is_absolute() else os.path.normpath(base_dir / path)


def _resolve_model_path(spec, base_dir: Path | None):
    """A model section naming a YAML file (not a preset) is resolved like the other input paths."""
    if isinstance(spec, str) and Path(spec).suffix in (".yaml", ".yml"):
        return _resolve_path(spec, base_dir)
    if isinstance(spec, dict) and isinstance(spec.get("preset"), str):
        return {**spec, "preset": _resolve_model_path(spec["preset"], base_dir)}
    return spec


def _resolve_tenant_paths(tenant, base_dir: Path | None):
    if not isinstance(tenant, dict):
        return tenant
    return {k: _resolve_path(v, base_dir) if k in _TENANT_INPUT_PATHS else v for k, v in tenant.items()}


def _not_a_directory(key: str, path) -> str:
    """The problem with `path`, which is not a directory: missing, or something else (a file given by mistake)."""
    return f"{key}: {'not a directory' if Path(path).exists() else 'directory not found'}: {path}"


def _read_yaml_mapping(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def read_run_yaml(path: str | Path) -> dict:
    """The raw mapping of a run YAML, with relative input paths resolved against the file's directory."""
    path = Path(path)
    data = _read_yaml_mapping(path, "run config file")
    return resolve_relative_paths(data, path.resolve().parent)


def resolve_relative_paths(data: dict, base_dir: str | Path) -> dict:
    """A copy of a raw run mapping with relative input paths (data, tokenizer, load_base, tenants_dir,
    a model YAML file) made relative to ``base_dir``."""
    base_dir = Path(base_dir)
    data = copy.deepcopy(data)
    for key in _RUN_INPUT_PATHS:
        if key in data:
            data[key] = _resolve_path(data[key], base_dir)
    if "model" in data:
        data["model"] = _resolve_model_path(data["model"], base_dir)
    if isinstance(data.get("tenants"), list):
        data["tenants"] = [_resolve_tenant_paths(t, base_dir) for t in data["tenants"]]
    return data


def load_tenant_file(path: str | Path, defaults: dict | None = None) -> TenantConfig:
    """One tenant from its own YAML file (fields of TenantConfig; ``name`` defaults to the file's stem).

    Relative data paths resolve against the file's directory. Only types are checked here; check the values
    against a run with :func:`validate_tenant` (the same checks :func:`validate` makes).
    """
    path = Path(path)
    data = _read_yaml_mapping(path, "tenant file")
    data.setdefault("name", path.stem)
    data = _resolve_tenant_paths(data, path.resolve().parent)
    tenant = tenant_from_dict(data, f"{path}: tenant", defaults)
    tenant._source = str(path)
    return tenant


def _merge_overrides(data: dict, overrides: dict | None) -> dict:
    """``overrides`` on top of a raw run mapping: plain keys replace; ``lora`` and ``tenant_defaults``
    mappings are merged key by key; a ``model`` mapping is merged into the model section unless it names a
    ``preset`` (then it replaces the section), a model string replaces it."""
    data = copy.deepcopy(data)
    for key, value in (overrides or {}).items():
        if key == "model" and isinstance(value, dict) and "preset" not in value and "model" in data:
            section = data["model"]
            if isinstance(section, (str, Path)):
                section = {"preset": str(section)}
            if isinstance(section, dict):
                data["model"] = {**section, **value}
            else:  # not a valid model section: let the override replace it
                data["model"] = copy.deepcopy(value)
        elif key in ("lora", "tenant_defaults") and isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = copy.deepcopy(value)
    return data


def run_config_from_dict(data: dict, overrides: dict | None = None) -> RunConfig:
    """A RunConfig from a raw mapping (paths already resolved), with ``overrides`` on top. (The tenants of
    ``tenants_dir`` are not among its ``tenants``: the job reads that directory itself, from its first
    iteration on, and refuses a file it cannot use with a note, whenever the file appeared.)"""
    load_base = (overrides or {}).get("load_base", data.get("load_base"))
    flags = (overrides or {}).get("model")
    replaced = isinstance(flags, (str, Path)) or (isinstance(flags, dict) and "preset" in flags)
    if "model" not in data and load_base and not replaced:
        # An imported base (convert_checkpoint.py import-hf) or a Megatron-LM checkpoint names its own model
        # (before the overrides, so that --hidden-size & co. change one of its fields, not replace it).
        from .checkpointing import load_base_model_config

        try:
            model = load_base_model_config(load_base, required=flags is None)
        except FileNotFoundError as e:
            raise ConfigError(f"load_base: {e}") from None
        if model is not None:
            # (a float16 base -- a Megatron-LM --fp16 save, an older import -- trains in bfloat16: fp16 would need
            # loss scaling; params_dtype is a run's own choice, the weights are cast as they load)
            dtype = "bfloat16" if model.params_dtype == "float16" else model.params_dtype
            data = {**data, "model": {**model.to_dict(), "params_dtype": dtype}}
    data = _merge_overrides(data, overrides)
    _check_keys(RunConfig, data, "")
    missing = [k for k in _required(RunConfig) if k not in data]
    if missing:
        raise ConfigError(
            f"missing required section(s) {', '.join(missing)} "
            "(model: a preset name or fields, or --model; lora: max_slots and max_rank, or --max-slots and "
            "--max-rank)"
        )
    data = dict(data)
    if data.get("tenants") is None:
        data["tenants"] = []
    if data.get("tenant_defaults") is None:
        data["tenant_defaults"] = {}
    return RunConfig(**data)


def _base_tokenizer(load_base: Path) -> Path | None:
    """The tokenizer.json beside a base checkpoint (or beside the iteration a Megatron-LM pointer names)."""
    from .checkpointing import resolve_base_dir

    places = [load_base]
    try:
        places.append(resolve_base_dir(load_base))
    except (FileNotFoundError, ValueError):
        pass  # (validation names a missing or broken base)
    return next((d / "tokenizer.json" for d in places if (d / "tokenizer.json").is_file()), None)


def load_run_config(source: str | Path | dict, overrides: dict | None = None) -> RunConfig:
    """A RunConfig from a YAML file (relative input paths resolve against its directory) or a mapping
    (paths as given), with optional ``overrides`` (see :func:`_merge_overrides`; their paths are taken as
    given). Types are checked here; call :func:`validate` for the values."""
    if isinstance(source, RunConfig):
        source = source.to_dict()
    if isinstance(source, dict):
        data = copy.deepcopy(source)
    elif isinstance(source, (str, Path)):
        data = read_run_yaml(source)
    else:
        raise ConfigError(f"a run config is a YAML path or a mapping, got {type(source).__name__}")
    return run_config_from_dict(data, overrides)


# ---------------------------------------------------------------------------------------------- validation


def _name_problem(name) -> str | None:
    if not isinstance(name, str) or not name:
        return "must be a non-empty string"
    if len(name) > TENANT_NAME_MAX_LEN:
        return f"is {len(name)} characters long; at most {TENANT_NAME_MAX_LEN} are allowed"
    if name in (".", "..") or not TENANT_NAME_RE.fullmatch(name):
        return ("must start with a letter or digit and contain only letters, digits, '_', '.' and '-' "
                "(it names directories)")
    return None


def _tenant_problems(run: RunConfig, tenant: TenantConfig, where: str) -> list[str]:
    p: list[str] = []
    t = tenant
    problem = _name_problem(t.name)
    if problem:
        p.append(f"{where}.name {t.name!r} {problem}")
    if t.rank < 1:
        p.append(f"{where}.rank must be >= 1, got {t.rank}")
    elif t.rank > run.lora.max_rank:
        p.append(f"{where}.rank {t.rank} exceeds lora.max_rank {run.lora.max_rank}")
    if t.alpha is not None and t.alpha <= 0:
        p.append(f"{where}.alpha must be > 0, got {t.alpha}")
    if not 0.0 <= t.dropout < 1.0:
        p.append(f"{where}.dropout must be in [0, 1), got {t.dropout}")
    if t.target_modules is not None:
        unknown = [m for m in t.target_modules if m not in TARGET_MODULES]
        if unknown:
            p.append(f"{where}.target_modules: unknown module(s) {unknown}; known: {list(TARGET_MODULES)}")
        outside = [m for m in t.target_modules if m in TARGET_MODULES and m not in (run.lora.target_modules or [])]
        if outside:
            p.append(f"{where}.target_modules {outside} are not in lora.target_modules {run.lora.target_modules}")
        if not t.target_modules:
            p.append(f"{where}.target_modules is empty")
        if len(set(t.target_modules)) != len(t.target_modules):
            p.append(f"{where}.target_modules has duplicates: {t.target_modules}")
    if t.init not in LORA_INITS:
        p.append(f"{where}.init must be one of {list(LORA_INITS)}, got {t.init!r}")
    if t.lr < 0:
        p.append(f"{where}.lr must be >= 0, got {t.lr}")
    if t.min_lr < 0:
        p.append(f"{where}.min_lr must be >= 0, got {t.min_lr}")
    elif t.min_lr > t.lr >= 0:
        p.append(f"{where}.min_lr {t.min_lr} is larger than lr {t.lr}")
    if t.lr_warmup_iters < 0:
        p.append(f"{where}.lr_warmup_iters must be >= 0, got {t.lr_warmup_iters}")
    if t.lr_decay_iters is not None and t.lr_decay_iters < 1:
        p.append(f"{where}.lr_decay_iters must be >= 1, got {t.lr_decay_iters}")
    if t.lr_decay_style not in LR_DECAY_STYLES:
        p.append(f"{where}.lr_decay_style must be one of {list(LR_DECAY_STYLES)}, got {t.lr_decay_style!r}")
    decay = t.decay_iters(run.train_iters)
    # As megatron's OptimizerParamScheduler: warm-up must end before decay does (not checked for a constant
    # schedule whose decay_iters is only the default).
    if (decay is not None and decay >= 1 and t.lr_warmup_iters >= 0 and t.lr_warmup_iters >= decay
            and (t.lr_decay_style != "constant" or t.lr_decay_iters is not None)):  # (decay < 1: named already)
        owner = "its" if t.train_iters is not None else "the run's"
        source = "lr_decay_iters" if t.lr_decay_iters is not None else f"lr_decay_iters (= {owner} train_iters)"
        p.append(f"{where}.lr_warmup_iters {t.lr_warmup_iters} must be smaller than {source} {decay}")
    if t.weight_decay < 0:
        p.append(f"{where}.weight_decay must be >= 0, got {t.weight_decay}")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(t, key) < 1.0:
            p.append(f"{where}.{key} must be in [0, 1), got {getattr(t, key)}")
    if t.adam_eps <= 0:
        p.append(f"{where}.adam_eps must be > 0, got {t.adam_eps}")
    if t.clip_grad is not None and t.clip_grad < 0:
        p.append(f"{where}.clip_grad must be >= 0 (0 or null: no clipping), got {t.clip_grad}")
    if t.global_batch_size < 1:
        p.append(f"{where}.global_batch_size must be >= 1, got {t.global_batch_size}")
    elif run.max_samples_per_iteration is not None and t.global_batch_size > run.max_samples_per_iteration:
        p.append(f"{where}.global_batch_size {t.global_batch_size} can never fit in max_samples_per_iteration "
                 f"{run.max_samples_per_iteration}")
    if t.train_iters is not None and t.train_iters < 1:
        p.append(f"{where}.train_iters must be >= 1 (or null: until the run ends), got {t.train_iters}")
    if t.max_epochs is not None and t.max_epochs < 1:
        p.append(f"{where}.max_epochs must be >= 1 (or null), got {t.max_epochs}")
    for key in ("train_data", "valid_data"):
        value = getattr(t, key)
        if value is None:
            continue
        if not Path(value).exists():
            p.append(f"{where}.{key}: data file not found: {value}")
        elif not Path(value).is_file():
            p.append(f"{where}.{key}: not a file: {value}")
    if t.seed is not None and t.seed < 0:
        p.append(f"{where}.seed must be >= 0, got {t.seed}")
    return p


def _where_tenant(index: int, tenant: TenantConfig) -> str:
    return f"tenants[{index}]"


def _about(tenant: TenantConfig) -> str:
    source = getattr(tenant, "_source", None)
    return f" (tenant {tenant.name!r}{', from ' + source if source else ''})"


def _raise(problems: list[str]) -> None:
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} configuration problems:\n  - " + "\n  - ".join(problems))


def validate_tenant(run: RunConfig, tenant: TenantConfig, where: str | None = None,
                    *, others: list[TenantConfig] | None = None) -> None:
    """The checks :func:`validate` makes for one tenant (e.g. one added to a running job from a tenants
    directory): types, values, data files, rank / modules against the pool and, with ``others``, a unique
    name. Fills in the tenant's default target modules."""
    where = where or "tenant"
    _normalize(tenant, where)
    if tenant.alpha is None:
        tenant.alpha = float(tenant.rank)
    run.resolve_tenant(tenant)
    problems = _tenant_problems(run, tenant, where)
    if others is not None and any(o is not tenant and o.name == tenant.name for o in others):
        problems.insert(0, f"{where}.name: duplicate tenant name {tenant.name!r}")
    _raise([x + _about(tenant) for x in problems])


def validate(run: RunConfig, world_size: int = 1) -> RunConfig:
    """Check every value of ``run`` for a job of ``world_size`` processes, before anything is created.

    All problems are reported together in one ConfigError, each naming its field (``tenants[1].rank``).
    Returns ``run`` (with its dependent defaults filled in)."""
    _normalize(run, "")
    _normalize(run.lora, "lora")
    for i, t in enumerate(run.tenants):
        _normalize(t, _where_tenant(i, t))
        if t.alpha is None:
            t.alpha = float(t.rank)
    run.resolve()
    problems: list[str] = []
    m = run.model
    if m.params_dtype == "float16":  # (megatron-LM trains fp16 only with a loss scaler)
        problems.append("model.params_dtype float16: fp16 training needs loss scaling, which megatron-multilora "
                        "does not do (small LoRA gradients would underflow to zero unnoticed): use bfloat16 (--bf16) "
                        "or float32 (model.params_dtype; a float16 base loads as either)")

    # layout
    tp, pp, ep = run.tensor_model_parallel_size, run.pipeline_model_parallel_size, run.expert_model_parallel_size
    sizes_ok = True
    for key, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                       ("expert_model_parallel_size", ep)):
        if value < 1:
            problems.append(f"{key} must be >= 1, got {value}")
            sizes_ok = False
    if sizes_ok:
        try:
            m.validate_layout(tp, pp, ep, run.sequence_parallel)
        except ConfigError as e:
            problems.append(str(e))
        if not isinstance(world_size, int) or world_size < 1:
            problems.append(f"world size must be a positive integer, got {world_size!r}")
        elif world_size % (tp * pp):
            problems.append(
                f"world size {world_size} is not divisible by tensor_model_parallel_size {tp} x "
                f"pipeline_model_parallel_size {pp} = {tp * pp}"
            )
        elif (world_size // (tp * pp)) % ep:
            problems.append(
                f"data-parallel size {world_size // (tp * pp)} (world size {world_size} / (TP {tp} x PP {pp})) "
                f"is not divisible by expert_model_parallel_size {ep}"
            )

    if run.moe_token_dispatcher_type not in MOE_TOKEN_DISPATCHERS:
        problems.append(f"moe_token_dispatcher_type must be one of {list(MOE_TOKEN_DISPATCHERS)}, "
                        f"got {run.moe_token_dispatcher_type!r}")

    # training
    if run.micro_batch_size < 1:
        problems.append(f"micro_batch_size must be >= 1, got {run.micro_batch_size}")
    if run.seq_length < 1:
        problems.append(f"seq_length must be >= 1, got {run.seq_length}")
    elif run.seq_length > m.max_position_embeddings:
        problems.append(
            f"seq_length {run.seq_length} exceeds model.max_position_embeddings {m.max_position_embeddings}"
        )
    elif run.sequence_parallel and tp > 1 and run.seq_length % tp:
        problems.append(f"seq_length {run.seq_length} must be divisible by tensor_model_parallel_size {tp} "
                        "with sequence_parallel")
    if run.train_iters is None:
        problems.append("train_iters is required (--train-iters)")
    elif run.train_iters < 1:
        problems.append(f"train_iters must be >= 1, got {run.train_iters}")
    if run.max_samples_per_iteration is not None and run.max_samples_per_iteration < 1:
        problems.append(f"max_samples_per_iteration must be >= 1, got {run.max_samples_per_iteration}")
    if run.seed < 0:
        problems.append(f"seed must be >= 0, got {run.seed}")

    # data
    if not run.byte_tokenizer:
        tok_path = Path(run.tokenizer)
        tok_file = tok_path / "tokenizer.json" if tok_path.is_dir() else tok_path
        if not tok_file.is_file():
            problems.append(f"tokenizer: file not found: {tok_file}")
        else:
            problems += _tokenizer_problems(run)
    elif m.vocab_size < 258:  # ByteTokenizer.vocab_size
        problems.append(f"the byte-level tokenizer needs model.vocab_size >= 258, got {m.vocab_size}")
    if run.tenants_dir is not None and not Path(run.tenants_dir).is_dir():
        problems.append(_not_a_directory("tenants_dir", run.tenants_dir))
    if not run.tenants_dir_idle_wait >= 0:  # also refuses NaN
        problems.append(f"tenants_dir_idle_wait must be >= 0 seconds, got {run.tenants_dir_idle_wait}")
    elif run.tenants_dir_idle_wait and run.tenants_dir is None:
        problems.append("tenants_dir_idle_wait needs a tenants_dir (--tenants-dir) for tenants to join through")

    # checkpointing and outputs: problems a run would otherwise meet only at its first save, or after training
    if run.load_base is not None and not Path(run.load_base).is_dir():
        problems.append(_not_a_directory("load_base", run.load_base))
    elif run.load_base is not None:
        from .checkpointing import resolve_base_dir

        try:
            resolve_base_dir(run.load_base)
        except (FileNotFoundError, ValueError) as e:
            problems.append(f"load_base: {e}")
        else:
            problems += _base_model_problems(run)
    problems += _checkpoint_dir_problems(run)
    for what, path, is_dir in (("save", run.save, True), ("tensorboard_dir", run.tensorboard_dir, True),
                               ("metrics_file", run.metrics_file, False)):
        if path is not None:
            problems += _unwritable(what, Path(path), is_dir)
    if run.exit_interval is not None and run.exit_interval < 1:
        problems.append(f"exit_interval must be >= 1 (or null), got {run.exit_interval}")
    if run.exit_duration_in_mins is not None and run.exit_duration_in_mins <= 0:
        problems.append(f"exit_duration_in_mins must be > 0 (or null), got {run.exit_duration_in_mins}")
    if run.exit_signal not in EXIT_SIGNALS:
        problems.append(f"exit_signal must be one of {list(EXIT_SIGNALS)}, got {run.exit_signal!r}")
    elif run.exit_signal != "SIGTERM" and not run.exit_signal_handler:
        problems.append(f"exit_signal {run.exit_signal} is caught only with exit_signal_handler "
                        "(--exit-signal-handler)")
    if run.save_interval is not None and run.save_interval < 1:
        problems.append(f"save_interval must be >= 1, got {run.save_interval}")
    if run.keep_last_checkpoints is not None and run.keep_last_checkpoints < 1:
        problems.append(f"keep_last_checkpoints must be >= 1 (or null: keep all), got {run.keep_last_checkpoints}")

    # evaluation, logging, distributed
    if run.eval_interval is not None and run.eval_interval < 1:
        problems.append(f"eval_interval must be >= 1 (or null), got {run.eval_interval}")
    if run.eval_iters < 0:
        problems.append(f"eval_iters must be >= 0, got {run.eval_iters}")
    if run.log_interval < 1:
        problems.append(f"log_interval must be >= 1, got {run.log_interval}")
    if run.distributed_backend is not None and run.distributed_backend not in DISTRIBUTED_BACKENDS:
        problems.append(f"distributed_backend must be one of {list(DISTRIBUTED_BACKENDS)} or null (auto), "
                        f"got {run.distributed_backend!r}")
    if run.distributed_timeout_minutes < 1:
        problems.append(f"distributed_timeout_minutes must be >= 1, got {run.distributed_timeout_minutes}")

    # the LoRA pool
    pool = run.lora
    if pool.max_slots < 1:
        problems.append(f"lora.max_slots must be >= 1, got {pool.max_slots}")
    if pool.max_rank < 1:
        problems.append(f"lora.max_rank must be >= 1, got {pool.max_rank}")
    unknown = [x for x in pool.target_modules if x not in TARGET_MODULES]
    if unknown:
        problems.append(f"lora.target_modules: unknown module(s) {unknown}; known: {list(TARGET_MODULES)}")
    if not pool.target_modules:
        problems.append("lora.target_modules is empty")
    if len(set(pool.target_modules)) != len(pool.target_modules):
        problems.append(f"lora.target_modules has duplicates: {pool.target_modules}")
    expert = [x for x in pool.target_modules if x in EXPERT_TARGET_MODULES]
    if expert and not m.is_moe:
        problems.append(f"lora.target_modules {expert} need a MoE model (the model has no num_experts)")
    tenant_defaults_bad = [k for k in run.tenant_defaults if k not in TENANT_DEFAULT_FIELDS]
    if tenant_defaults_bad:
        problems.append(f"tenant_defaults: unknown key(s) {tenant_defaults_bad}")
    elif run.tenant_defaults:  # their values, even when no tenant uses them yet (one may join later)
        probe = TenantConfig(**{"name": "defaults", "rank": 1, "lr": math.inf, "train_data": "",
                                **run.tenant_defaults})
        problems += [q for q in _tenant_problems(run, probe, "tenant_defaults")
                     if q.split(" ", 1)[0].removeprefix("tenant_defaults.") in run.tenant_defaults]

    # tenants
    if not run.tenants and run.tenants_dir is None:
        problems.append("no tenants: give a tenants list in the config or a tenants_dir (--tenants-dir)")
    if not pool.queue and len(run.tenants) > pool.max_slots:
        problems.append(
            f"{len(run.tenants)} tenants but lora.max_slots is {pool.max_slots} and lora.queue is false "
            "(set queue: true to let tenants wait for a free slot, or raise max_slots)"
        )
    seen: dict[str, int] = {}
    for i, t in enumerate(run.tenants):
        where = _where_tenant(i, t)
        if isinstance(t.name, str) and t.name in seen:
            problems.append(f"{where}.name: duplicate tenant name {t.name!r} (also tenants[{seen[t.name]}])")
        else:
            seen[t.name] = i
        problems += [x + _about(t) for x in _tenant_problems(run, t, where)]
    _raise(problems)
    return run


def _checkpoint_dir_problems(run: RunConfig) -> list[str]:
    """--save may hold a run's checkpoints only when this run resumes them (--load the same directory): a fresh
    run would write its own iterations over them and move their pointer back. --load names a checkpoint, unless it
    is --save itself (resume if there is one: the usual `--save DIR --load DIR`)."""
    from .tenant_checkpoint import RUN_DIR, TENANTS_DIR, TRACKER, complete_iterations, iter_name, run_root

    def run_checkpoint(d: Path) -> str | None:  # what says d holds a run checkpoint (a pointer-less one counts)
        if (d / TRACKER).is_file():
            return f"{d / TRACKER}: {(d / TRACKER).read_text().strip()[:20]}"
        done = complete_iterations(run_root(d))
        return f"{run_root(d) / iter_name(done[-1])}" if done else None

    save = Path(run.save) if run.save is not None else None
    load = Path(run.load) if run.load is not None else None
    same = save is not None and load is not None and save.resolve() == load.resolve()
    problems = []
    held = run_checkpoint(save) if save is not None and not same else None
    resumed = run_checkpoint(load) if load is not None and load.is_dir() else None
    if held is not None:
        problems.append(f"save: {save} already holds a run checkpoint ({held}): resume it with --load {save}, or "
                        "give another --save directory")
    if load is not None and not same:
        if not load.is_dir():
            problems.append(_not_a_directory("load", load))
        elif resumed is None and not (load / TENANTS_DIR).is_dir():
            hint = (f": it is a PEFT adapter -- convert it first with tools/convert_checkpoint.py import-peft "
                    f"--peft-dir {load} --save SAVE ..., then --load SAVE"
                    if (load / "adapter_config.json").is_file() else "")
            problems.append(f"load: {load} holds no checkpoint (no {TRACKER}, no {TENANTS_DIR}/ directory){hint}")
        elif (load.resolve().parent.name == TENANTS_DIR and not (load / RUN_DIR).is_dir()
              and not (load / TENANTS_DIR).is_dir()):
            problems.append(f"load: {load} is tenant {load.resolve().name!r}'s checkpoints, not a run's: --load takes "
                            f"the run's directory ({load.resolve().parent.parent}); a new job starts the tenant from "
                            f"them when they are under {TENANTS_DIR}/{load.resolve().name}/ of its --save or --load")
            return problems
    if resumed is not None:
        problems += _resume_identity_problems(run, load)
    return problems


def field_changes(old: Mapping, new: Mapping) -> list[str]:
    """``"name old -> new"`` for each field of ``new`` that ``old`` has with another value (how a message names
    what a config changed against a checkpoint or a base)."""
    return [f"{k} {old[k]!r} -> {v!r}" for k, v in new.items() if k in old and old[k] != v]


# Model fields the base's weights do not depend on (RoPE has no weights; a bf16 run resumes in fp32), and the
# one only a random base does (a saved base was drawn already).
_FREE_MODEL_FIELDS = ("params_dtype", "max_position_embeddings")
_RANDOM_BASE_FIELDS = ("init_method_std",)


def _base_model_problems(run: RunConfig) -> list[str]:
    """The run's model must be the one its --load-base holds (as its model.yaml or Megatron-LM arguments
    name it): another shape fails to load, and anything else (rotary_base, norm_epsilon, ...) would train on the
    base's weights with another model's arithmetic, silently."""
    from .checkpointing import load_base_model_config

    try:
        theirs = load_base_model_config(run.load_base, required=False)
    except ConfigError as e:
        return [f"load_base: {e}"]
    if theirs is None:
        return []  # (a base that names no model: the run's model section says what it is)
    changed = base_model_changes({"model": theirs.to_dict()}, run.model)
    if not changed:
        return []
    return [f"load_base: {run.load_base} holds another model than the run's: {', '.join(changed)} (leave the "
            "model section out to take the base's)"]


def base_identity(run: RunConfig) -> dict:
    """What the frozen base of ``run`` is built from, as its run checkpoints record it: the model and a saved
    base's directory, or, for a random base, the seed and model-parallel layout that draw it (either of them
    changed draws another base)."""
    model = {k: v for k, v in run.model.to_dict().items() if k not in _FREE_MODEL_FIELDS}
    if run.load_base is not None:
        from .checkpointing import resolve_base_dir

        for k in _RANDOM_BASE_FIELDS:
            model.pop(k)
        try:  # (a Megatron-LM --save directory: the iteration its pointer names)
            where = resolve_base_dir(run.load_base)
        except (FileNotFoundError, ValueError):
            where = Path(run.load_base)
        return {"model": model, "load_base": str(where.resolve())}
    return {"model": model, "load_base": None, "seed": run.seed, "layout": [
        run.tensor_model_parallel_size, run.pipeline_model_parallel_size, run.expert_model_parallel_size]}


def base_model_changes(saved: dict | None, model: ModelConfig) -> list[str]:
    """What `model` changes against the base a checkpoint records (a base_identity; None: not recorded), in the
    fields its weights depend on."""
    if saved is None:
        return []
    return field_changes(saved["model"], {k: v for k, v in model.to_dict().items()
                                          if k not in _FREE_MODEL_FIELDS + _RANDOM_BASE_FIELDS})


def tokenizer_identity(run: RunConfig) -> dict:
    """The tokenizer of ``run`` as its run checkpoints record it: the file and a hash of its content and of the
    tokenizer_config.json beside it (another tokenizer, or eos, turns every tenant's text into other ids)."""
    if run.byte_tokenizer:
        return {"file": "byte", "sha256": "byte"}
    path = Path(run.tokenizer)
    path = path / "tokenizer.json" if path.is_dir() else path
    digest = hashlib.sha256(path.read_bytes())
    config = path.parent / "tokenizer_config.json"  # (its eos_token is the one samples end with)
    if config.is_file():
        digest.update(config.read_bytes())
    return {"file": str(path.resolve()), "sha256": digest.hexdigest()}


def tokenizer_change(saved: dict | None, mine: dict) -> str | None:
    """What a checkpoint trained with `saved` (a tokenizer_identity; None: not recorded, taken as it is) says
    against a run tokenizing with `mine`, or None when they are the same."""
    if saved is None or saved["sha256"] == mine["sha256"]:
        return None
    return f"was trained with the tokenizer {saved['file']}; this run tokenizes with {mine['file']}"


def _resume_identity_problems(run: RunConfig, load: Path) -> list[str]:
    """A resume on another base than its checkpoint's (the tenants would go on training against other weights,
    with no error anywhere): another model, a random base for a saved one, or a random base drawn with another
    seed or model-parallel layout; or with another tokenizer (other token ids for the same data)."""
    from .tenant_checkpoint import CheckpointError, iter_name, latest_run_iteration, read_manifest, run_root

    try:
        meta = read_manifest(run_root(load) / iter_name(latest_run_iteration(load))).get("meta", {})
    except CheckpointError:
        return []  # (the trainer names a damaged checkpoint)
    problems = []
    saved_tokenizer = meta.get("tokenizer")  # (checkpoints before it was recorded: not checked)
    try:
        change = tokenizer_change(saved_tokenizer, tokenizer_identity(run))
    except OSError:  # (named with the data checks: tokenizer file not found)
        change = None
    if change is not None:
        problems.append(f"load: {load} {change}, other token ids for every tenant's data (give --tokenizer "
                        f"{saved_tokenizer['file']}, or the same file elsewhere)")
    saved = meta.get("base")
    if saved is None:
        return problems
    mine = base_identity(run)
    where = f"load: {load} was trained on"
    if saved["load_base"] is not None and mine["load_base"] is None:
        return problems + [
            f"{where} the base in {saved['load_base']}; this run would build a random one: pass --load-base"]
    changed = field_changes(saved["model"], mine["model"])
    if changed:
        problems.append(f"{where} another model: {', '.join(changed)}")
    # (a random base saved with checkpointing.save_base and given as --load-base is the same base: allowed)
    if mine["load_base"] is None and (saved["seed"], saved["layout"]) != (mine["seed"], mine["layout"]):
        tp, pp, ep = saved["layout"]
        problems.append(f"{where} a random base drawn with seed {saved['seed']} at TP{tp} PP{pp} EP{ep}; this run "
                        f"would draw another (seed {mine['seed']}, TP{mine['layout'][0]} PP{mine['layout'][1]} "
                        f"EP{mine['layout'][2]}): resume with that seed and layout, or train on a saved base "
                        "(--load-base)")
    return problems


def _unwritable(what: str, path: Path, is_dir: bool) -> list[str]:
    """A problem if `path` (a directory, or a file) cannot be created or written by this process."""
    if path.exists():
        if path.is_dir() != is_dir:
            return [f"{what}: {path} exists and is {'not ' if is_dir else ''}a directory"]
        target = path  # (a file is appended to: it must be writable itself)
    else:
        target = path.parent
        while not target.exists() and target != target.parent:
            target = target.parent
        if not target.is_dir():
            return [f"{what}: cannot create {path}: {target} is not a directory"]
    if not os.access(target, os.W_OK | (os.X_OK if target.is_dir() else 0)):
        return [f"{what}: cannot write to {target} (permission denied)"]
    return []


def _tokenizer_problems(run: RunConfig) -> list[str]:
    from megatron_multilora.data.tokenizer import build_tokenizer

    try:
        tokenizer = build_tokenizer(run.tokenizer)
    except Exception as e:  # noqa: BLE001 -- any failure to read it is a config problem
        return [f"tokenizer {run.tokenizer}: cannot be loaded ({e})"]
    if tokenizer.vocab_size > run.model.vocab_size:
        return [f"tokenizer {run.tokenizer} has {tokenizer.vocab_size} tokens, more than model.vocab_size "
                f"{run.model.vocab_size}"]
    return []
