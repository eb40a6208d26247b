"""The command line: Megatron-LM flag names on top of a run YAML (``--config``).

Only flags actually given override the YAML (paths given on the command line are relative to the working
directory; paths in the YAML to the YAML's directory). Tenants come from the YAML's ``tenants`` list and / or
``--tenants-dir`` (one YAML file per tenant, read by the job at every iteration boundary). Per-tenant optimizer
flags (``--lr``, ``--global-batch-size``, ...) are *defaults* for tenants that do not set the field themselves.

    from megatron_multilora.arguments import parse_run_config
    run = parse_run_config()          # sys.argv; validated for $WORLD_SIZE processes
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Sequence

from megatron_multilora.config import (
    DISTRIBUTED_BACKENDS,
    EXIT_SIGNALS,
    LORA_INITS,
    LR_DECAY_STYLES,
    MOE_TOKEN_DISPATCHERS,
    TARGET_MODULES,
    ConfigError,
    LoRAPoolConfig,
    RunConfig,
    TenantConfig,
    load_run_config,
    presets,
    validate,
)

__all__ = ["build_parser", "overrides_from_args", "parse_run_config"]

# dest prefixes that route a flag to a section of the run config
_MODEL = "model__"
_LORA = "lora__"
_TENANT = "tenant__"


def _default(cls, name: str) -> Any:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _d(cls, name: str, none: str | None = None) -> str:
    """' (default: X)' for help texts (the parser's own defaults are SUPPRESS: given flags only)."""
    value = _default(cls, name)
    if value is None:
        return f" (default: {none})" if none else ""
    if isinstance(value, bool):
        value = "on" if value else "off"
    return f" (default: {value})"


def _backend(value: str) -> str | None:
    if value == "auto":
        return None
    if value not in DISTRIBUTED_BACKENDS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(DISTRIBUTED_BACKENDS)} or auto")
    return value


def _optional_int(value: str) -> int | None:
    if value.lower() in ("none", "null"):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or none, got {value!r}") from None


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Train many LoRA adapters (tenants) at once on one frozen megatron-core base model. "
            "Settings come from a run YAML (--config); flags given on the command line override it."
        ),
        epilog=(
            "Example: torchrun --nproc-per-node 2 -m megatron_multilora.train --config configs/demo.yaml "
            "--expert-model-parallel-size 2 --train-iters 100"
        ),
        argument_default=argparse.SUPPRESS,
    )
    R, T, L = RunConfig, TenantConfig, LoRAPoolConfig

    g = parser.add_argument_group("configuration")
    g.add_argument("--config", metavar="RUN.yaml",
                   help="run YAML with sections model, lora, tenants, tenant_defaults and top-level training "
                        "fields (relative data paths resolve against the YAML's directory)")
    g.add_argument("--print-config", action="store_true",
                   help="print the resolved, validated configuration as YAML and exit")

    g = parser.add_argument_group("model", "the frozen base; flags override fields of the config's model section")
    g.add_argument("--model", metavar="PRESET",
                   help=f"model preset or model YAML file; replaces the config's model section "
                        f"(presets: {', '.join(presets())})")
    for flag, kind, text in (
        ("--num-layers", int, "number of transformer layers"),
        ("--hidden-size", int, "hidden size"),
        ("--num-attention-heads", int, "number of attention heads"),
        ("--num-query-groups", int, "number of key/value groups (grouped-query attention)"),
        ("--ffn-hidden-size", int, "MLP hidden size"),
        ("--num-experts", int, "number of routed experts (MoE)"),
        ("--moe-router-topk", int, "experts per token"),
        ("--moe-ffn-hidden-size", int, "hidden size of each expert"),
    ):
        g.add_argument(flag, type=kind, metavar="N", dest=_MODEL + flag[2:].replace("-", "_"), help=text)
    g.add_argument("--bf16", action="store_const", const="bfloat16", dest=_MODEL + "params_dtype",
                   help="the base (and the LoRA weights; the optimizer keeps fp32 masters) in bfloat16")

    g = parser.add_argument_group("LoRA pool", "adapter slots allocated once at start-up")
    g.add_argument("--max-slots", type=int, metavar="N", dest=_LORA + "max_slots",
                   help="number of adapter slots (tenants trained at the same time)")
    g.add_argument("--max-rank", type=int, metavar="R", dest=_LORA + "max_rank",
                   help="largest LoRA rank a slot can hold")
    g.add_argument("--target-modules", nargs="+", choices=TARGET_MODULES, metavar="MODULE",
                   dest=_LORA + "target_modules",
                   help=f"modules that get adapters ({', '.join(TARGET_MODULES)}; default: the dense four, plus "
                        "the expert ones for a MoE model)")
    g.add_argument("--queue", action=argparse.BooleanOptionalAction, dest=_LORA + "queue",
                   help="tenants beyond --max-slots wait for a free slot; with --no-queue more tenants than "
                        "slots is an error" + _d(L, "queue"))

    g = parser.add_argument_group(
        "tenant defaults", "apply to tenants that do not set the field themselves (per-tenant values win)")
    for flag, kind, text in (
        ("--lr", float, "peak learning rate"),
        ("--min-lr", float, "learning rate at the end of the decay" + _d(T, "min_lr")),
        ("--lr-warmup-iters", int, "linear warm-up steps" + _d(T, "lr_warmup_iters")),
        ("--lr-decay-iters", int, "steps of warm-up + decay (default: the tenant's train_iters, else --train-iters)"),
        ("--lr-decay-style", str, "learning-rate decay" + _d(T, "lr_decay_style")),
        ("--weight-decay", float, "decoupled weight decay" + _d(T, "weight_decay")),
        ("--adam-beta1", float, "Adam beta1" + _d(T, "adam_beta1")),
        ("--adam-beta2", float, "Adam beta2" + _d(T, "adam_beta2")),
        ("--adam-eps", float, "Adam epsilon" + _d(T, "adam_eps")),
        ("--clip-grad", float, "per-tenant gradient-norm clipping; 0: off" + _d(T, "clip_grad")),
        ("--global-batch-size", int, "samples per optimizer step of a tenant" + _d(T, "global_batch_size")),
        ("--lora-rank", int, "LoRA rank"),
        ("--lora-alpha", float, "LoRA alpha (default: the rank)"),
        ("--lora-dropout", float, "dropout on the adapter input" + _d(T, "dropout")),
        ("--lora-init", str, "init of A (B starts at 0)" + _d(T, "init")),
    ):
        name = flag[2:].replace("-", "_")
        field = {"lora_rank": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_init": "init"}.get(
            name, name)
        extra: dict[str, Any] = {}
        if field == "lr_decay_style":
            extra["choices"] = LR_DECAY_STYLES
        if field == "init":
            extra["choices"] = LORA_INITS
        metavar = None if "choices" in extra else ("N" if kind is int else "X")
        g.add_argument(flag, type=kind, dest=_TENANT + field, metavar=metavar, help=text, **extra)

    g = parser.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, metavar="TP",
                   help="tensor-parallel size" + _d(R, "tensor_model_parallel_size"))
    g.add_argument("--pipeline-model-parallel-size", type=int, metavar="PP",
                   help="pipeline-parallel size" + _d(R, "pipeline_model_parallel_size"))
    g.add_argument("--expert-model-parallel-size", type=int, metavar="EP",
                   help="expert-parallel size; must divide the data-parallel size and num_experts"
                        + _d(R, "expert_model_parallel_size"))
    g.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction,
                   help="sequence parallelism (needs TP > 1; required for MoE with TP > 1)"
                        + _d(R, "sequence_parallel"))
    g.add_argument("--moe-token-dispatcher-type", choices=MOE_TOKEN_DISPATCHERS,
                   help="how MoE tokens reach their experts' ranks" + _d(R, "moe_token_dispatcher_type"))

    g = parser.add_argument_group("training")
    g.add_argument("--train-iters", type=int, metavar="N", help="iterations of the run (required)")
    g.add_argument("--micro-batch-size", type=int, metavar="N",
                   help="samples per micro-batch and data-parallel rank" + _d(R, "micro_batch_size"))
    g.add_argument("--seq-length", type=int, metavar="N",
                   help="tokens per sample (default: the model's max_position_embeddings)")
    g.add_argument("--max-samples-per-iteration", type=_optional_int, metavar="N",
                   help="cap on the samples of one iteration; tenants that do not fit wait their turn "
                        "(default: none, every active tenant steps every iteration)")
    g.add_argument("--recompute-activations", action=argparse.BooleanOptionalAction,
                   help="recompute activations in the backward pass" + _d(R, "recompute_activations"))
    g.add_argument("--pack-sequences", action=argparse.BooleanOptionalAction,
                   help="concatenate a tenant's samples into one token stream cut every seq_length tokens "
                        "(pretraining style: attention crosses samples and a sample may be cut in two; not for "
                        "prompt / completion data)" + _d(R, "pack_sequences"))
    g.add_argument("--seed", type=int, metavar="N",
                   help="run seed; tenants without a seed use it" + _d(R, "seed"))
    g.add_argument("--exit-interval", type=_optional_int, metavar="N",
                   help="leave after an iteration that is a multiple of N, saving a run checkpoint first "
                        "(with --save); --load resumes exactly (default: none)")
    g.add_argument("--exit-duration-in-mins", type=float, metavar="MINUTES",
                   help="leave, saving first, after the first iteration that ends this many minutes after the "
                        "trainer started (default: none)")
    g.add_argument("--exit-signal-handler", action=argparse.BooleanOptionalAction,
                   help="on --exit-signal, finish the iteration, save and leave (a scheduler's preemption "
                        "notice)" + _d(R, "exit_signal_handler"))
    g.add_argument("--exit-signal", choices=EXIT_SIGNALS,
                   help="the signal --exit-signal-handler catches" + _d(R, "exit_signal"))

    g = parser.add_argument_group("data")
    g.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer.json (or a directory holding one), or 'byte' (default: the tokenizer.json "
                        "beside --load-base, else byte)")
    g.add_argument("--tenants-dir", metavar="DIR",
                   help="directory of tenant YAML files (one per tenant, name = file stem unless set), read "
                        "at every iteration boundary from the first on: tenants join, and leave with <name>.stop")
    g.add_argument("--tenants-dir-idle-wait", type=float, metavar="SECONDS",
                   help="with --tenants-dir, how long a job with no tenant running or queued waits for one to "
                        "join before it ends (idle, it holds no tenant state: stopping it loses nothing)"
                        + _d(R, "tenants_dir_idle_wait"))

    g = parser.add_argument_group("checkpointing")
    g.add_argument("--load-base", metavar="DIR",
                   help="distributed checkpoint of the frozen base (default: random init, for tests and demos)")
    g.add_argument("--save", metavar="DIR", help="directory for checkpoints (default: none)")
    g.add_argument("--load", metavar="DIR", help="checkpoint directory to resume from (default: none)")
    g.add_argument("--save-interval", type=_optional_int, metavar="N",
                   help="iterations between checkpoints (default: only at the end)")
    g.add_argument("--keep-last-checkpoints", type=_optional_int, metavar="N",
                   help="delete older checkpoints beyond the last N (default: keep all)")

    g = parser.add_argument_group("evaluation and logging")
    g.add_argument("--eval-interval", type=_optional_int, metavar="N",
                   help="iterations between evaluations of tenants with valid_data" + _d(R, "eval_interval"))
    g.add_argument("--eval-iters", type=int, metavar="N",
                   help="validation batches per evaluation; 0: no evaluation" + _d(R, "eval_iters"))
    g.add_argument("--log-interval", type=int, metavar="N", help="iterations between log lines" + _d(R, "log_interval"))
    g.add_argument("--tensorboard-dir", metavar="DIR", help="TensorBoard event directory (default: none)")
    g.add_argument("--metrics-file", metavar="PATH", help="JSON-lines metrics file (default: none)")

    g = parser.add_argument_group("distributed")
    g.add_argument("--distributed-backend", type=_backend, metavar="{gloo,nccl,auto}",
                   help="process-group backend (default: auto = nccl with CUDA, else gloo)")
    g.add_argument("--distributed-timeout-minutes", type=int, metavar="N",
                   help="timeout of collective operations" + _d(R, "distributed_timeout_minutes"))
    return parser


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The flags actually given, as overrides for :func:`megatron_multilora.config.load_run_config`."""
    given = dict(vars(args))
    given.pop("config", None)
    given.pop("print_config", None)
    overrides: dict[str, Any] = {}
    model_fields = {k[len(_MODEL):]: v for k, v in given.items() if k.startswith(_MODEL)}
    lora = {k[len(_LORA):]: v for k, v in given.items() if k.startswith(_LORA)}
    tenant = {k[len(_TENANT):]: v for k, v in given.items() if k.startswith(_TENANT)}
    if "model" in given:  # a preset replaces the model section; field flags apply on top of it
        overrides["model"] = {"preset": given["model"], **model_fields}
    elif model_fields:
        overrides["model"] = model_fields
    if lora:
        overrides["lora"] = lora
    if tenant:
        overrides["tenant_defaults"] = tenant
    for key, value in given.items():
        if key != "model" and not key.startswith((_MODEL, _LORA, _TENANT)):
            overrides[key] = value
    return overrides


def parse_run_config(argv: Sequence[str] | None = None, *, world_size: int | None = None,
                     validate_config: bool = True) -> RunConfig:
    """Parse the command line (``sys.argv[1:]`` by default) into a validated :class:`RunConfig`.

    ``world_size`` defaults to ``$WORLD_SIZE`` (set by torchrun), else 1. Raises ConfigError for a bad
    configuration (argparse itself exits on malformed flags, as usual).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    run = load_run_config(getattr(args, "config", None) or {}, overrides_from_args(args))
    if validate_config:
        if world_size is None:
            try:
                world_size = int(os.environ.get("WORLD_SIZE", "1"))
            except ValueError:
                raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None
        validate(run, world_size)
    if getattr(args, "print_config", False):
        sys.stdout.write(run.to_yaml())
        raise SystemExit(0)
    return run
