"""Checkpoints through megatron-core dist_checkpointing: sharded tensors with global keys, so what is saved at
one TP/PP/EP/DP layout loads at another."""

from __future__ import annotations

from pathlib import Path

import torch


def require_empty_dir(directory: str | Path) -> Path:
    """An output directory must be new or empty: nothing already saved is overwritten. Check it before the
    heavy work."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory")
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} exists and is not empty")
    return directory


def _base_sharded_state_dict(model) -> dict:
    """The frozen base's sharded tensors (adapter weights excluded: they are saved per tenant)."""
    sharded = model.sharded_state_dict()
    return {k: v for k, v in sharded.items() if ".lora_" not in k and not k.endswith("._extra_state")}


def save_base(model, directory: str | Path) -> None:
    """Save the base model of this rank's stage; every rank of the job must call it."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    if torch.distributed.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(_base_sharded_state_dict(model), str(directory))


def load_base(model, directory: str | Path) -> None:
    """Load base weights saved at any layout into this rank's model chunk. ``directory`` is a base checkpoint
    (ours, or a Megatron-LM ``iter_XXXXXXX/`` torch_dist checkpoint of the same architecture) or a Megatron-LM
    ``--save`` directory (its latest_checkpointed_iteration.txt names the iteration)."""
    from megatron.core import dist_checkpointing

    from .tenant_checkpoint import LOAD_FAILURES, CheckpointError, failure_said

    directory = resolve_base_dir(directory)
    sharded = _base_sharded_state_dict(model)
    _match_checkpoint_keys(sharded, directory)
    try:
        state = dist_checkpointing.load(sharded, str(directory))
    except LOAD_FAILURES as e:  # e.g. another model's shapes: named with the directory, one line
        raise CheckpointError(f"cannot load the base {directory} into this model: {failure_said(e)}") from e
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if ".lora_" not in k and not k.endswith("._extra_state")]
    if missing:
        raise RuntimeError(f"base checkpoint {directory} lacks {missing[:5]}")


# Our sharded key suffix -> the one Megatron-LM's transformer-engine spec writes for the same tensor. The local
# spec maps its norms to TE's fused layer-norm linears; MoE layers have no fused fc1 under TE, so TE keeps
# pre_mlp_layernorm there. Used only when our key is absent from the checkpoint.
_ALTERNATIVE_KEYS = (
    (".mlp.linear_fc1.layer_norm_weight", ".pre_mlp_layernorm.weight"),
    (".self_attention.linear_qkv.layer_norm_weight", ".input_layernorm.weight"),
)


def _match_checkpoint_keys(sharded: dict, directory: Path) -> None:
    from megatron.core import dist_checkpointing

    available = set(dist_checkpointing.load_tensors_metadata(str(directory)).keys())
    for tensor in sharded.values():
        key = getattr(tensor, "key", None)
        if key is None or key in available:
            continue
        for ours, theirs in _ALTERNATIVE_KEYS:
            if key.endswith(ours) and key[: -len(ours)] + theirs in available:
                tensor.key = key[: -len(ours)] + theirs
                break


def resolve_base_dir(directory: str | Path) -> Path:
    """The dist_checkpointing directory of a base checkpoint: ``directory`` itself if it holds one, else the
    iteration named by a Megatron-LM ``latest_checkpointed_iteration.txt`` (``iter_0000100`` or ``release``)."""
    from .tenant_checkpoint import MANIFEST, TENANTS_DIR

    directory = Path(directory)
    if (directory / MANIFEST).is_file() or (
            (directory / TENANTS_DIR).is_dir() and not (directory / "metadata.json").exists()):
        raise ValueError(f"{directory} is a multi-LoRA checkpoint (adapters and training state, no base weights): "
                         "give the base that run trained on (its --load-base), or resume the run with --load")
    if (directory / "metadata.json").exists():
        return directory
    tracker = directory / "latest_checkpointed_iteration.txt"
    if tracker.exists():
        text = tracker.read_text().strip()
        sub = "release" if text == "release" else f"iter_{int(text):07d}"
        if (directory / sub / "metadata.json").exists():
            return directory / sub
        raise FileNotFoundError(
            f"{tracker} names {sub}, but {directory / sub} holds no dist_checkpointing checkpoint "
            "(metadata.json missing; only the torch_dist format is supported)"
        )
    hint = ""
    if (directory / "config.json").is_file() and any(directory.glob("*.safetensors")):
        hint = (f": it is a Hugging Face model directory -- convert it first with tools/convert_checkpoint.py "
                f"import-hf --hf-dir {directory} --save BASE, then --load-base BASE")
    raise FileNotFoundError(
        f"no dist_checkpointing checkpoint at {directory} (neither metadata.json nor "
        f"latest_checkpointed_iteration.txt){hint}"
    )


MODEL_CONFIG_FILE = "model.yaml"


def save_model_config(directory: str | Path, model_config, header: str | None = None) -> Path:
    """Write ``directory/model.yaml`` (the ModelConfig fields) next to a base checkpoint (rank 0 only)."""
    import yaml

    path = Path(directory) / MODEL_CONFIG_FILE
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(f"# {line}\n" for line in (header or "").splitlines())
        path.write_text(text + yaml.safe_dump(model_config.to_dict(), sort_keys=False))
    return path


def load_base_model_config(directory: str | Path, required: bool = True):
    """The ModelConfig of a base checkpoint: its ``model.yaml`` (written by ``convert_checkpoint.py
    import-hf``), else the model arguments a Megatron-LM checkpoint stores in its common.pt. A base that names no
    model (no model.yaml, no readable arguments) is an error, or None when not ``required``; a model it names
    that is broken or not representable is an error either way."""
    from .config import ConfigError, model_config_from

    directory = Path(directory)
    resolved = resolve_base_dir(directory)
    for path in (resolved / MODEL_CONFIG_FILE, directory / MODEL_CONFIG_FILE):
        if path.exists():
            return model_config_from(str(path))
    try:
        args = _megatron_lm_args(resolved)
    except ConfigError:
        if required:
            raise
        return None
    if args is None:
        if not required:
            return None
        raise ConfigError(
            f"base checkpoint {directory} has no {MODEL_CONFIG_FILE} and no Megatron-LM arguments: give the "
            "run a model section"
        )
    return model_config_from_megatron_args(args)


def _megatron_lm_args(directory: Path):
    from megatron.core import dist_checkpointing

    try:
        common = dist_checkpointing.load_common_state_dict(str(directory))
    except Exception as e:  # noqa: BLE001 - e.g. a class of Megatron-LM that is not installed here
        from .config import ConfigError

        raise ConfigError(
            f"cannot read the Megatron-LM arguments of {directory} ({type(e).__name__}: {e}); write its "
            f"{MODEL_CONFIG_FILE} or give the run a model section"
        ) from None
    return common.get("args") if isinstance(common, dict) else None


def model_config_from_megatron_args(args):
    """Our ModelConfig from the arguments a Megatron-LM GPT checkpoint stores (``common.pt`` 'args'); an error
    listing what our model cannot represent (LayerNorm, GELU, learned positions, linear biases, MLA, ...)."""
    from .config import ConfigError, ModelConfig

    a = dict(vars(args)) if not isinstance(args, dict) else dict(args)
    problems = []

    def want(name, expected, default):
        value = a.get(name, default)
        if value != expected:
            problems.append(f"{name}={value!r} (supported: {expected!r})")

    want("normalization", "RMSNorm", "LayerNorm")
    want("swiglu", True, False)
    want("position_embedding_type", "rope", "learned_absolute")
    want("add_bias_linear", False, True)
    want("rotary_interleaved", False, False)
    want("use_rope_scaling", False, False)
    want("rotary_percent", 1.0, 1.0)
    want("apply_layernorm_1p", False, False)
    want("multi_latent_attention", False, False)
    want("mtp_num_layers", None, None)
    want("qk_l2_norm", False, False)
    num_experts = a.get("num_experts")
    if num_experts:
        want("moe_router_score_function", "softmax", "softmax")
        want("moe_router_topk_scaling_factor", None, None)
        want("moe_router_num_groups", None, None)
        want("moe_router_enable_expert_bias", False, False)
        freq = a.get("moe_layer_freq", 1)
        if not (freq == 1 or (isinstance(freq, (list, tuple)) and all(x == 1 for x in freq))):
            problems.append(f"moe_layer_freq={freq!r} (supported: MoE in every layer, 1)")
    vocab = a.get("padded_vocab_size")
    if vocab is None:
        problems.append("padded_vocab_size missing")
    if problems:
        raise ConfigError("the Megatron-LM checkpoint's model is not supported: " + "; ".join(problems))
    hidden, heads = a["hidden_size"], a["num_attention_heads"]
    kv_channels = a.get("kv_channels")
    dtype = "bfloat16" if a.get("bf16") else "float16" if a.get("fp16") else "float32"
    moe = {}
    if num_experts:
        moe = dict(
            num_experts=num_experts,
            moe_router_topk=a.get("moe_router_topk", 2),
            moe_ffn_hidden_size=a.get("moe_ffn_hidden_size") or a["ffn_hidden_size"],
            moe_shared_expert_intermediate_size=a.get("moe_shared_expert_intermediate_size"),
            moe_shared_expert_gate=bool(a.get("moe_shared_expert_gate", False)),
            moe_router_pre_softmax=bool(a.get("moe_router_pre_softmax", False)),
        )
    return ModelConfig(
        num_layers=a["num_layers"],
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=a.get("num_query_groups") if a.get("group_query_attention") else None,
        ffn_hidden_size=a["ffn_hidden_size"],
        vocab_size=vocab,
        max_position_embeddings=a.get("max_position_embeddings") or a.get("seq_length") or 4096,
        rotary_base=float(a.get("rotary_base", 10000)),
        norm_epsilon=float(a.get("norm_epsilon", 1e-5)),
        untie_embeddings_and_output_weights=bool(a.get("untie_embeddings_and_output_weights", False)),
        add_qkv_bias=bool(a.get("add_qkv_bias", False)),
        kv_channels=kv_channels if kv_channels and kv_channels * heads != hidden else None,
        qk_layernorm=bool(a.get("qk_layernorm", False)),
        params_dtype=dtype,
        **moe,
    )
