"""Hugging Face checkpoints -> our base checkpoint (megatron-core GPTModel, dist_checkpointing).

A Hugging Face model directory (``config.json`` + ``*.safetensors``, sharded or not) of a Llama-family decoder
(Llama, Mistral, Qwen2, Qwen3) or MoE decoder (Mixtral, Qwen2-MoE, Qwen3-MoE) is read without transformers:

* :func:`model_config_from_hf` maps ``config.json`` to our :class:`ModelConfig`, refusing (with every problem
  and the supported architectures listed) what megatron's GPTModel as we build it cannot compute exactly;
* :func:`iter_megatron_tensors` converts the weights, one tensor at a time, to GPTModel's state-dict layout at
  TP=1 (fused QKV per query group, fc1 = [gate; up], experts, shared experts and their gate);
* :func:`import_hf` builds the GPTModel in one process, copies the converted weights in (every base tensor
  must be written once, every Hugging Face tensor used), and writes it with ``checkpointing.save_base`` plus
  ``model.yaml``, so it loads at any TP/PP/EP layout (``--load-base DIR``), and the model's ``tokenizer.json``
  beside them when it has one (a run with ``--load-base DIR`` takes it).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

from .config import ConfigError, ModelConfig


class UnsupportedModelError(ConfigError):
    """The Hugging Face model uses an architecture or a feature our megatron GPTModel does not compute."""


class HFCheckpointError(ValueError):
    """The Hugging Face weights do not match their config.json (a missing tensor, a wrong shape)."""


@dataclass(frozen=True)
class _Architecture:
    moe: bool = False
    qkv_bias: str | bool = False  # True: always; a str: the config key (default in qkv_bias_default)
    qkv_bias_default: bool = False
    attention_bias_key: str | None = None  # a key meaning bias on q, k, v *and* o_proj (unsupported when true)
    qk_norm: bool = False
    default_rope_theta: float = 10000.0
    default_rms_norm_eps: float = 1e-6
    default_max_position_embeddings: int = 4096
    default_head_dim: int | None = None  # None: hidden_size / num_attention_heads
    sliding_window: str = "none"  # "none" | "always" (Mistral: config.sliding_window) | "flag" (use_sliding_window)
    default_sliding_window: int | None = None
    # MoE
    num_experts_keys: tuple[str, ...] = ()
    default_num_experts: int = 0
    default_topk: int = 2
    moe_ffn_key: str | None = None  # None: intermediate_size (Mixtral)
    default_moe_ffn: int | None = None
    shared_expert: bool = False
    default_shared_expert_size: int = 0
    renormalize: str | bool = True  # True: top-k weights renormalised; a str: the config key (norm_topk_prob)
    sparse_layer_keys: bool = False  # decoder_sparse_step / mlp_only_layers


ARCHITECTURES: dict[str, _Architecture] = {
    "LlamaForCausalLM": _Architecture(
        attention_bias_key="attention_bias", default_max_position_embeddings=2048
    ),
    "MistralForCausalLM": _Architecture(
        attention_bias_key="attention_bias", default_max_position_embeddings=131072,
        sliding_window="always", default_sliding_window=4096,
    ),
    "Qwen2ForCausalLM": _Architecture(
        qkv_bias=True, default_max_position_embeddings=32768, sliding_window="flag", default_sliding_window=4096
    ),
    "Qwen3ForCausalLM": _Architecture(
        attention_bias_key="attention_bias", qk_norm=True, default_head_dim=128,
        default_max_position_embeddings=32768, sliding_window="flag", default_sliding_window=4096,
    ),
    "MixtralForCausalLM": _Architecture(
        moe=True, attention_bias_key="attention_bias", default_rope_theta=1e6, default_rms_norm_eps=1e-5,
        default_max_position_embeddings=131072, sliding_window="always",
        num_experts_keys=("num_local_experts", "num_experts"), default_num_experts=8, default_topk=2,
    ),
    "Qwen2MoeForCausalLM": _Architecture(
        moe=True, qkv_bias="qkv_bias", qkv_bias_default=True, default_max_position_embeddings=32768,
        sliding_window="flag", default_sliding_window=4096,
        num_experts_keys=("num_experts",), default_num_experts=60, default_topk=4,
        moe_ffn_key="moe_intermediate_size", default_moe_ffn=1408,
        shared_expert=True, default_shared_expert_size=5632, renormalize="norm_topk_prob", sparse_layer_keys=True,
    ),
    "Qwen3MoeForCausalLM": _Architecture(
        moe=True, attention_bias_key="attention_bias", qk_norm=True, default_max_position_embeddings=32768,
        sliding_window="flag", default_sliding_window=4096,
        num_experts_keys=("num_experts", "num_local_experts"), default_num_experts=128, default_topk=8,
        moe_ffn_key="moe_intermediate_size", default_moe_ffn=768, renormalize="norm_topk_prob",
        sparse_layer_keys=True,
    ),
}

SUPPORTED_SUMMARY = (
    "supported Hugging Face architectures: " + ", ".join(ARCHITECTURES) + ". Supported features: RMSNorm, "
    "SwiGLU (silu), RoPE without scaling (rope_type 'default', full rotary dim), grouped-query attention, "
    "any head_dim, bias on q/k/v only (Qwen2), q/k RMSNorm (Qwen3), tied or untied embeddings; MoE in every "
    "layer with softmax top-k routing (renormalised or not), optional shared expert with sigmoid gate "
    "(Qwen2-MoE); unquantized float32 / bfloat16 / float16 safetensors weights."
)
_MODEL_TYPES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "fp32": "float32",
           "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}


# --------------------------------------------------------------------------------------------------------
# config.json -> ModelConfig
# --------------------------------------------------------------------------------------------------------


def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    return json.loads(path.read_text())


def hf_architecture(hf_config: Mapping) -> str:
    """The supported architecture name of a config.json, or an error listing the supported ones."""
    archs = list(hf_config.get("architectures") or [])
    if not archs and hf_config.get("model_type") in _MODEL_TYPES:
        archs = [_MODEL_TYPES[hf_config["model_type"]]]
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        found = ", ".join(archs) or f"model_type {hf_config.get('model_type')!r}"
        raise UnsupportedModelError(f"Hugging Face architecture {found} is not supported; {SUPPORTED_SUMMARY}")
    return archs[0]


def _rope(cfg: Mapping, arch: _Architecture, problems: list[str]) -> float:
    """rope_theta, after checking the RoPE variant is plain (no scaling, full rotary dimension)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, Mapping) and params and all(isinstance(v, Mapping) for v in params.values()):
        variants = {json.dumps(dict(v), sort_keys=True) for v in params.values()}  # per layer type
        if len(variants) > 1:
            problems.append(f"different RoPE parameters per layer type ({dict(params)})")
        params = next(iter(params.values()))
    params = dict(params or {})
    scaling = cfg.get("rope_scaling")
    if isinstance(scaling, Mapping):
        params = {**dict(scaling), **params}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in (None, "default"):
        problems.append(f"RoPE scaling {rope_type!r} ({params}); only unscaled RoPE (rope_type 'default')")
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        problems.append(f"partial_rotary_factor {partial}; only a full rotary dimension")
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    return float(theta if theta is not None else arch.default_rope_theta)


def _sliding_window(cfg: Mapping, arch: _Architecture) -> int | None:
    if arch.sliding_window == "always":
        return cfg.get("sliding_window", arch.default_sliding_window)
    if arch.sliding_window == "flag" and cfg.get("use_sliding_window", False):
        if "sliding_attention" not in (cfg.get("layer_types") or ["sliding_attention"]):
            return None
        # Which layers slide (max_window_layers) differs between Qwen versions: assume any may.
        return cfg.get("sliding_window", arch.default_sliding_window) or None
    return None


def model_config_from_hf(
    hf_config: Mapping | str | Path, *, params_dtype: str | None = None, notes: list[str] | None = None
) -> ModelConfig:
    """Our ModelConfig for a Hugging Face config (a config.json mapping, or its model directory).

    ``params_dtype`` None: the checkpoint's dtype (config ``dtype`` / ``torch_dtype``; float16 as bfloat16: runs
    refuse fp16, having no loss scaling), float32 if unknown.
    Adjustments that keep the model exact (a sliding window longer than every allowed sequence) are
    appended to ``notes``. Raises :class:`UnsupportedModelError` listing every unsupported feature.
    """
    cfg = read_hf_config(hf_config) if isinstance(hf_config, (str, Path)) else dict(hf_config)
    name = hf_architecture(cfg)
    arch = ARCHITECTURES[name]
    notes = notes if notes is not None else []
    problems: list[str] = []

    def need(key):
        if cfg.get(key) is None:
            problems.append(f"config.json lacks {key!r}")
            return 1
        return cfg[key]

    hidden, layers, heads = need("hidden_size"), need("num_hidden_layers"), need("num_attention_heads")
    vocab, ffn = need("vocab_size"), need("intermediate_size")
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or arch.default_head_dim or hidden // max(heads, 1)

    act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
    if act != "silu":
        problems.append(f"hidden_act {act!r}; only 'silu' (SwiGLU)")
    if arch.attention_bias_key and cfg.get(arch.attention_bias_key, False):
        problems.append(f"{arch.attention_bias_key}=true (a bias on o_proj too); only q/k/v biases (Qwen2)")
    if cfg.get("mlp_bias", False):
        problems.append("mlp_bias=true; only bias-free MLPs")
    if cfg.get("quantization_config"):
        problems.append(f"quantized weights ({cfg['quantization_config'].get('quant_method', '?')})")
    if cfg.get("pretraining_tp", 1) not in (None, 1):
        problems.append(f"pretraining_tp {cfg['pretraining_tp']}; only 1")
    rope_theta = _rope(cfg, arch, problems)
    if arch.qkv_bias is True:
        qkv_bias = True
    elif isinstance(arch.qkv_bias, str):
        qkv_bias = bool(cfg.get(arch.qkv_bias, arch.qkv_bias_default))
    else:
        qkv_bias = False

    max_pos = int(cfg.get("max_position_embeddings") or arch.default_max_position_embeddings)
    window = _sliding_window(cfg, arch)
    if window is not None and window < max_pos:
        notes.append(
            f"sliding_window {window} < max_position_embeddings {max_pos}: max_position_embeddings set to "
            f"{window}, so every sequence fits the window and full causal attention is exact"
        )
        max_pos = int(window)

    dtype = params_dtype or cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    if str(dtype) not in _DTYPES:
        problems.append(f"dtype {dtype!r}; only float32, bfloat16, float16")
    dtype = _DTYPES.get(str(dtype), "float32")
    if dtype == "float16" and params_dtype is None:  # (runs refuse fp16: no loss scaling)
        notes.append("the checkpoint is float16: imported as bfloat16, which runs train in (--params-dtype "
                     "float32 keeps every bit)")
        dtype = "bfloat16"

    moe: dict = {}
    if arch.moe:
        num_experts = next((cfg[k] for k in arch.num_experts_keys if cfg.get(k) is not None),
                           arch.default_num_experts)
        if arch.renormalize is True:
            renormalize = True
        else:
            renormalize = bool(cfg.get(arch.renormalize, False))
        if arch.sparse_layer_keys:
            step, only_mlp = cfg.get("decoder_sparse_step", 1), cfg.get("mlp_only_layers") or []
            if step != 1 or only_mlp:
                problems.append(
                    f"dense layers between MoE layers (decoder_sparse_step {step}, mlp_only_layers {only_mlp}); "
                    "only MoE in every layer"
                )
        shared = int(cfg.get("shared_expert_intermediate_size", arch.default_shared_expert_size) or 0)
        if shared and not arch.shared_expert:
            problems.append("shared_expert_intermediate_size set for an architecture without a shared expert")
        moe = dict(
            num_experts=int(num_experts),
            moe_router_topk=int(cfg.get("num_experts_per_tok", arch.default_topk)),
            moe_ffn_hidden_size=int(cfg.get(arch.moe_ffn_key, arch.default_moe_ffn) if arch.moe_ffn_key else ffn),
            moe_shared_expert_intermediate_size=shared if arch.shared_expert and shared else None,
            moe_shared_expert_gate=bool(arch.shared_expert and shared),
            # megatron pre_softmax=False: top-k of the logits, then softmax over them == softmax, top-k and
            # renormalise (Mixtral, norm_topk_prob). pre_softmax=True: softmax over all experts, then top-k.
            moe_router_pre_softmax=not renormalize,
        )
    if problems:
        raise UnsupportedModelError(
            f"cannot import this {name}: " + "; ".join(problems) + f". {SUPPORTED_SUMMARY}"
        )
    try:
        return ModelConfig(
            num_layers=int(layers),
            hidden_size=int(hidden),
            num_attention_heads=int(heads),
            num_query_groups=int(kv_heads),
            ffn_hidden_size=int(ffn),
            vocab_size=int(vocab),
            max_position_embeddings=max_pos,
            sliding_window=None if window is None else int(window),
            rotary_base=rope_theta,
            norm_epsilon=float(cfg.get("rms_norm_eps", arch.default_rms_norm_eps)),
            untie_embeddings_and_output_weights=not cfg.get("tie_word_embeddings", False),
            add_qkv_bias=qkv_bias,
            kv_channels=int(head_dim) if head_dim * heads != hidden else None,
            qk_layernorm=arch.qk_norm,
            params_dtype=dtype,
            **moe,
        )
    except ConfigError as e:
        raise UnsupportedModelError(f"cannot import this {name}: {e}") from None


# --------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------


class HFCheckpoint:
    """The tensors of a Hugging Face model directory (one or many safetensors files), read lazily."""

    def __init__(self, hf_dir: str | Path):
        from safetensors import safe_open

        self.directory = Path(hf_dir)

        def open_file(path):
            try:
                return safe_open(str(path), framework="pt", device="cpu")
            except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: a truncated download, a missing shard
                raise HFCheckpointError(f"cannot read {path}: {e} (an incomplete download?)") from None

        self._open = open_file
        index = self.directory / "model.safetensors.index.json"
        self._files: dict[str, Path] = {}
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {k: self.directory / f for k, f in weight_map.items()}
            by_file: dict[Path, set[str]] = {}
            for key, path in self._files.items():
                by_file.setdefault(path, set()).add(key)
            for path, keys in sorted(by_file.items()):  # every shard the index names, before any work
                with self._open(path) as f:
                    missing = sorted(keys - set(f.keys()))
                if missing:
                    raise HFCheckpointError(f"{path} lacks {len(missing)} tensors its index names (e.g. "
                                            f"{missing[0]}): an incomplete download?")
        else:
            # model.safetensors alone if present: some repositories also hold other formats of the same
            # weights (Mistral's consolidated.safetensors).
            single = self.directory / "model.safetensors"
            files = [single] if single.is_file() else sorted(self.directory.glob("*.safetensors"))
            if not files:
                found = sorted(p.name for p in self.directory.glob("*.bin"))
                raise FileNotFoundError(
                    f"no *.safetensors weights in {self.directory}"
                    + (f" (found {found}: re-save them with save_pretrained(safe_serialization=True))" if found else "")
                )
            for path in files:
                with self._open(path) as f:
                    self._files.update({k: path for k in f.keys()})
        self._handles: dict[Path, object] = {}

    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str) -> torch.Tensor:
        path = self._files[name]
        if path not in self._handles:
            self._handles[path] = self._open(path).__enter__()
        try:
            return self._handles[path].get_tensor(name)
        except Exception as e:  # noqa: BLE001 - as in open_file
            raise HFCheckpointError(f"cannot read {name} from {path}: {e} (an incomplete download?)") from None


class _Tracked:
    """A tensor source that records which names were read (every Hugging Face tensor must be used)."""

    def __init__(self, source: HFCheckpoint | Mapping[str, torch.Tensor]):
        self.source = source
        self.used: set[str] = set()

    def __contains__(self, name):
        return name in self.source

    def keys(self):
        return list(self.source.keys())

    def get(self, name: str) -> torch.Tensor:
        if name not in self.source:
            raise HFCheckpointError(f"the Hugging Face checkpoint lacks {name}")
        self.used.add(name)
        return self.source.get(name) if isinstance(self.source, HFCheckpoint) else self.source[name]

    def first(self, *names: str) -> str | None:
        return next((n for n in names if n in self.source), None)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int) -> torch.Tensor:
    """megatron's linear_qkv rows (or bias): for each query group g, [q rows of g's heads; k_g; v_g]."""
    g = num_query_groups
    parts = [t.reshape(g, -1, *t.shape[1:]) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *q.shape[1:])


def iter_megatron_tensors(
    source: HFCheckpoint | Mapping[str, torch.Tensor], hf_config: Mapping, model: ModelConfig,
    used: set[str] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(megatron GPTModel state-dict key at TP=1, tensor) for every base weight, converted from a Hugging Face
    state dict (a mapping or an :class:`HFCheckpoint`). Names read are added to ``used`` if given."""
    hf_architecture(hf_config)  # an unsupported one fails here, before any tensor is read
    src = _Tracked(source)
    if used is not None:
        src.used = used
    pre = "model." if "model.embed_tokens.weight" in src else ""
    g = model.num_query_groups

    yield "embedding.word_embeddings.weight", src.get(f"{pre}embed_tokens.weight")
    for i in range(model.num_layers):
        hp, mp = f"{pre}layers.{i}.", f"decoder.layers.{i}."
        att = hp + "self_attn."
        yield mp + "input_layernorm.weight", src.get(hp + "input_layernorm.weight")
        q, k, v = (src.get(f"{att}{n}_proj.weight") for n in "qkv")
        yield mp + "self_attention.linear_qkv.weight", fuse_qkv(q, k, v, g)
        if model.add_qkv_bias:
            qb, kb, vb = (src.get(f"{att}{n}_proj.bias") for n in "qkv")
            yield mp + "self_attention.linear_qkv.bias", fuse_qkv(qb, kb, vb, g)
        if model.qk_layernorm:
            yield mp + "self_attention.q_layernorm.weight", src.get(att + "q_norm.weight")
            yield mp + "self_attention.k_layernorm.weight", src.get(att + "k_norm.weight")
        yield mp + "self_attention.linear_proj.weight", src.get(att + "o_proj.weight")
        yield mp + "pre_mlp_layernorm.weight", src.get(hp + "post_attention_layernorm.weight")
        if not model.is_moe:
            gate, up = src.get(hp + "mlp.gate_proj.weight"), src.get(hp + "mlp.up_proj.weight")
            yield mp + "mlp.linear_fc1.weight", torch.cat([gate, up], 0)
            yield mp + "mlp.linear_fc2.weight", src.get(hp + "mlp.down_proj.weight")
            continue
        yield from _moe_layer(src, hp, mp + "mlp.", model)
    yield "decoder.final_layernorm.weight", src.get(f"{pre}norm.weight")
    if model.untie_embeddings_and_output_weights:
        yield "output_layer.weight", src.get("lm_head.weight")
    elif "lm_head.weight" in src:
        src.get("lm_head.weight")  # the tied copy some checkpoints store: the embedding is used


def _moe_layer(src: _Tracked, hp: str, mp: str, model: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Router, experts and shared expert of one MoE layer, from any of the on-disk expert layouts:
    Mixtral's ``block_sparse_moe.experts.{e}.w1/w3/w2`` (gate/up/down), Qwen's ``mlp.experts.{e}.gate_proj/
    up_proj/down_proj`` (what transformers 5 save_pretrained writes), or transformers 5's in-memory packed
    ``mlp.experts.gate_up_proj`` [E, 2*ffn, hidden] ([gate; up] per expert) and ``down_proj`` [E, hidden, ffn]."""
    router = src.first(hp + "block_sparse_moe.gate.weight", hp + "mlp.gate.weight")
    if router is None:
        raise HFCheckpointError(f"no MoE router weight for {hp} (block_sparse_moe.gate.weight or mlp.gate.weight)")
    yield mp + "router.weight", src.get(router)
    f = model.moe_ffn_hidden_size
    packed = None
    for block in ("mlp", "block_sparse_moe"):
        if f"{hp}{block}.experts.gate_up_proj" in src:
            packed = (src.get(f"{hp}{block}.experts.gate_up_proj"), src.get(f"{hp}{block}.experts.down_proj"))
    for e in range(model.num_experts):
        if packed is not None:
            gate_up, down = packed[0][e], packed[1][e]
            if gate_up.shape[0] != 2 * f:
                raise HFCheckpointError(
                    f"{hp}experts.gate_up_proj has shape {tuple(packed[0].shape)}, expected [E, {2 * f}, hidden]"
                )
            gate, up = gate_up[:f], gate_up[f:]
        elif f"{hp}block_sparse_moe.experts.{e}.w1.weight" in src:
            ex = f"{hp}block_sparse_moe.experts.{e}."
            gate, up, down = src.get(ex + "w1.weight"), src.get(ex + "w3.weight"), src.get(ex + "w2.weight")
        else:
            ex = f"{hp}mlp.experts.{e}."
            gate, up, down = (src.get(ex + n) for n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"))
        yield f"{mp}experts.local_experts.{e}.linear_fc1.weight", torch.cat([gate, up], 0)
        yield f"{mp}experts.local_experts.{e}.linear_fc2.weight", down
    if model.moe_shared_expert_intermediate_size:
        se = hp + "mlp.shared_expert."
        gate, up = src.get(se + "gate_proj.weight"), src.get(se + "up_proj.weight")
        yield mp + "shared_experts.linear_fc1.weight", torch.cat([gate, up], 0)
        yield mp + "shared_experts.linear_fc2.weight", src.get(se + "down_proj.weight")
        if model.moe_shared_expert_gate:
            yield mp + "shared_experts.gate_weight", src.get(hp + "mlp.shared_expert_gate.weight")


def convert_hf_state_dict(
    source: HFCheckpoint | Mapping[str, torch.Tensor], hf_config: Mapping, model: ModelConfig
) -> dict[str, torch.Tensor]:
    """The whole converted state dict (memory: the whole model; :func:`import_hf` streams instead)."""
    return dict(iter_megatron_tensors(source, hf_config, model))


_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def load_into(gpt, tensors: Iterator[tuple[str, torch.Tensor]], source_keys: list[str], used: set[str]) -> None:
    """Copy converted tensors into a TP=1 GPTModel: every base tensor written exactly once with its exact
    shape, and every source tensor used (an unused one is a feature the import would silently drop)."""
    target = {k: v for k, v in gpt.state_dict(keep_vars=True).items()
              if not k.endswith("._extra_state") and ".lora_" not in k}
    written: set[str] = set()
    with torch.no_grad():
        for key, tensor in tensors:
            if key not in target:
                raise HFCheckpointError(f"converted tensor {key} has no place in the megatron model")
            if key in written:
                raise HFCheckpointError(f"converted tensor {key} written twice")
            dest = target[key]
            if tuple(dest.shape) != tuple(tensor.shape):
                raise HFCheckpointError(
                    f"{key}: converted shape {tuple(tensor.shape)} != model shape {tuple(dest.shape)}")
            dest.copy_(tensor.to(dest.dtype))
            written.add(key)
    missing = sorted(set(target) - written)
    if missing:
        raise HFCheckpointError(f"the Hugging Face checkpoint gave no value for {len(missing)} tensors: {missing[:8]}")
    unused = sorted(k for k in source_keys if k not in used and not k.endswith(_IGNORED_HF_SUFFIXES))
    if unused:
        raise UnsupportedModelError(
            f"{len(unused)} Hugging Face tensors have no place in the megatron model (an unsupported "
            f"feature?): {unused[:8]}"
        )


def _copy_tokenizer(hf_dir, out_dir, log) -> None:
    """The model's tokenizer.json (and tokenizer_config.json: its eos token and chat template; a chat_template.jinja)
    go next to the base, so a run needs only the base (``--load-base`` takes it)."""
    source = Path(hf_dir) / "tokenizer.json"
    if source.is_file():
        copied = [name for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
                  if (Path(hf_dir) / name).is_file()]
        for name in copied:
            shutil.copyfile(Path(hf_dir) / name, Path(out_dir) / name)
        log(f"copied {', '.join(copied)}: train with --load-base {out_dir} (which takes it)")
    else:
        log("note: the Hugging Face directory has no tokenizer.json: give --tokenizer when training")


def import_hf(
    hf_dir: str | Path, out_dir: str | Path, *, params_dtype: str | None = None,
    log: Callable[[str], None] | None = None,
) -> ModelConfig:
    """Convert a Hugging Face model directory to our base checkpoint in ``out_dir`` (dist_checkpointing +
    ``model.yaml``). Runs in one process: starts (and ends) a single-process group unless one is running."""
    from . import checkpointing, platform
    from . import model as model_lib

    log = log or (lambda _msg: None)
    out_dir = checkpointing.require_empty_dir(out_dir)
    hf_config = read_hf_config(hf_dir)
    notes: list[str] = []
    mc = model_config_from_hf(hf_config, params_dtype=params_dtype, notes=notes)
    for note in notes:
        log(f"note: {note}")
    source = HFCheckpoint(hf_dir)

    started = not torch.distributed.is_initialized()
    if started:
        platform.initialize_model_parallel(platform.ParallelLayout(), seed=0)
    elif torch.distributed.get_world_size() != 1:
        raise RuntimeError("import_hf runs in a single process (world size 1)")
    else:
        from megatron.core import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            platform.initialize_model_parallel(platform.ParallelLayout(), seed=0)
    try:
        config = model_lib.transformer_config(mc, perform_initialization=False)
        gpt = model_lib.build_gpt_model(mc, config)
        used: set[str] = set()
        log(f"converting {len(source.keys())} tensors of {hf_architecture(hf_config)} from {hf_dir}")
        load_into(gpt, iter_megatron_tensors(source, hf_config, mc, used), source.keys(), used)
        log(f"saving the base checkpoint to {out_dir}")
        checkpointing.save_base(gpt, out_dir)
        checkpointing.save_model_config(
            out_dir, mc, header=f"Imported from {Path(hf_dir).resolve()} ({hf_architecture(hf_config)})"
        )
        _copy_tokenizer(hf_dir, out_dir, log)
    finally:
        if started:
            platform.destroy()
    return mc
