"""Convert checkpoints between Hugging Face formats and megatron-multilora's.

Subcommands:

    import-hf     a Hugging Face model directory (config.json + *.safetensors) -> a base checkpoint for
                  ``--load-base`` (megatron dist_checkpointing, loadable at any TP/PP/EP layout) + model.yaml
                  (+ the model's tokenizer.json, which ``--load-base`` takes)

    export-peft   a tenant checkpoint (<save>/tenants/<name>[/iter_XXXXXXX]) -> a PEFT LoRA adapter directory
                  (adapter_config.json + adapter_model.safetensors) for transformers + peft (what the tests
                  check; MoE experts go out as PEFT target_parameters, which serving engines may not take)

    import-peft   a PEFT LoRA adapter directory -> a tenant checkpoint a run resumes from (--load)

    python tools/convert_checkpoint.py import-hf --hf-dir Qwen2.5-0.5B --save ckpt/qwen2.5-0.5b-base
    python tools/convert_checkpoint.py import-hf --hf-dir Mixtral-8x7B-v0.1 --print-config
    python tools/convert_checkpoint.py export-peft --tenant-checkpoint run/tenants/alice --base ckpt/qwen2.5-0.5b-base \
        --out adapters/alice --base-model-name-or-path Qwen/Qwen2.5-0.5B
    python tools/convert_checkpoint.py import-peft --peft-dir adapters/bob --base ckpt/qwen2.5-0.5b-base \
        --name bob --save run --max-rank 64

Each subcommand is a function ``add_<name>(subparsers)`` in SUBCOMMANDS that registers its parser and sets
``func`` (called with the parsed arguments, returns an exit code).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _log(message: str) -> None:
    print(f"[convert_checkpoint] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------
# import-hf
# --------------------------------------------------------------------------------------------------------


def add_import_hf(subparsers) -> None:
    from megatron_multilora.hf import SUPPORTED_SUMMARY

    p = subparsers.add_parser(
        "import-hf",
        help="Hugging Face model directory -> base checkpoint (+ model.yaml) for --load-base",
        description=(
            "Convert a Hugging Face model directory (config.json and *.safetensors, sharded or not) to a "
            "megatron-multilora base checkpoint: megatron-core dist_checkpointing (loadable at any TP/PP/EP "
            "layout) plus DIR/model.yaml, the model config a run uses when it has no model section, and "
            "the model's tokenizer.json when it has one (--load-base DIR takes it). Runs in one process on the CPU. "
            + SUPPORTED_SUMMARY[0].upper() + SUPPORTED_SUMMARY[1:]
        ),
    )
    p.add_argument("--hf-dir", required=True, type=Path, help="Hugging Face model directory")
    p.add_argument("--save", type=Path, help="output directory (created; must be empty or absent)")
    p.add_argument(
        "--params-dtype", choices=("float32", "bfloat16"), default=None,
        help="dtype of the saved weights (default: the checkpoint's config dtype -- float16 as bfloat16, as runs "
             "train in no fp16 -- else float32)",
    )
    p.add_argument(
        "--print-config", action="store_true",
        help="print the model config (model.yaml) the import would write, and convert nothing",
    )
    p.set_defaults(func=run_import_hf)


def run_import_hf(args) -> int:
    import yaml

    from megatron_multilora import hf

    if args.print_config:
        notes: list[str] = []
        mc = hf.model_config_from_hf(args.hf_dir, params_dtype=args.params_dtype, notes=notes)
        for note in notes:
            _log(f"note: {note}")
        print(yaml.safe_dump(mc.to_dict(), sort_keys=False), end="")
        return 0
    if args.save is None:
        raise ValueError("import-hf: --save DIR is required (or --print-config)")
    mc = hf.import_hf(args.hf_dir, args.save, params_dtype=args.params_dtype, log=_log)
    _log(
        f"done: {args.save} ({mc.num_layers} layers, hidden {mc.hidden_size}"
        + (f", {mc.num_experts} experts top-{mc.moe_router_topk}" if mc.is_moe else "")
        + f", {mc.params_dtype}); train with --load-base {args.save}"
    )
    return 0


# --------------------------------------------------------------------------------------------------------
# export-peft / import-peft
# --------------------------------------------------------------------------------------------------------


def _model_source(args):
    """(ModelConfig, Hugging Face architecture or None) from --hf-dir, --base or --model (one of them), else
    from --base-model-name-or-path when it is a local Hugging Face directory."""
    from megatron_multilora import checkpointing, hf
    from megatron_multilora.config import model_config_from

    hf_dir = getattr(args, "hf_dir", None)
    name_or_path = getattr(args, "base_model_name_or_path", None)
    if hf_dir is None and args.base is None and getattr(args, "model", None) is None and name_or_path \
            and (Path(name_or_path) / "config.json").is_file():
        hf_dir = Path(name_or_path)
    if hf_dir is not None:
        config = hf.read_hf_config(hf_dir)
        return hf.model_config_from_hf(config), hf.hf_architecture(config)
    if args.base is not None:
        return checkpointing.load_base_model_config(args.base), None
    if getattr(args, "model", None) is not None:
        return model_config_from(args.model), None
    raise ValueError(
        f"{args.command}: the model's shape is needed: give --base BASE_DIR (its model.yaml), --hf-dir HF_DIR "
        "(its config.json)" + (" or --model PRESET_OR_YAML" if hasattr(args, "model") else "")
    )


def add_export_peft(subparsers) -> None:
    p = subparsers.add_parser(
        "export-peft",
        help="tenant checkpoint -> PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)",
        description=(
            "Write a tenant's adapter as a Hugging Face PEFT LoRA adapter: Hugging Face module names, the fused "
            "QKV and gate/up LoRA split exactly (q/k/v and gate/up share A, B's rows are split), routed experts "
            "as PEFT target_parameters on transformers 5's packed mlp.experts.gate_up_proj / down_proj, shared "
            "experts as mlp.shared_expert.*. The model's shape comes from --base (the imported base's model.yaml), "
            "--hf-dir, --model, or --base-model-name-or-path when that is a local Hugging Face directory."
        ),
    )
    p.add_argument("--tenant-checkpoint", required=True, type=Path,
                   help="<save>/tenants/<name> (its newest checkpoint) or one of its iter_XXXXXXX directories")
    p.add_argument("--out", required=True, type=Path, help="PEFT adapter directory (created; must be empty or absent)")
    p.add_argument("--base-model-name-or-path", default=None,
                   help="recorded in adapter_config.json (what PeftModel.from_pretrained loads the base from)")
    source = p.add_mutually_exclusive_group()  # (one source of the model's shape)
    source.add_argument("--base", type=Path, help="base checkpoint directory whose model.yaml gives the model config")
    source.add_argument("--hf-dir", type=Path, help="Hugging Face model directory whose config.json gives the model")
    source.add_argument("--model", help="model preset name or model YAML file")
    p.set_defaults(func=run_export_peft)


def run_export_peft(args) -> int:
    from megatron_multilora import adapter_checkpoint, checkpointing, peft
    from megatron_multilora.config import base_model_changes

    checkpointing.require_empty_dir(args.out)
    mc, arch = _model_source(args)
    spec, tensors, meta = adapter_checkpoint.read_tenant_checkpoint(args.tenant_checkpoint, with_meta=True)
    changes = base_model_changes(meta.get("base"), mc)  # (checkpoints that do not record it: taken as they are)
    if changes:
        trained_on = meta["base"].get("load_base")
        raise ValueError(
            f"export-peft: tenant {meta.get('name')!r} was trained on another model than the one given: "
            f"{', '.join(changes)} (give its base" + (f": --base {trained_on})" if trained_on else ")"))
    state, config = peft.export_peft(tensors, spec, mc, arch, base_model_name_or_path=args.base_model_name_or_path)
    peft.write_peft_dir(args.out, state, config)
    _log(
        f"done: tenant {meta.get('name')!r} (iteration {meta.get('iteration')}, rank {spec.rank}, alpha "
        f"{spec.alpha}{', rslora' if spec.rslora else ''}) -> {args.out}: {len(state) // 2} LoRA modules, "
        f"target_modules {config['target_modules']}, target_parameters {config['target_parameters']}"
    )
    return 0


def add_import_peft(subparsers) -> None:
    p = subparsers.add_parser(
        "import-peft",
        help="PEFT LoRA adapter directory -> tenant checkpoint a run resumes from",
        description=(
            "Convert a Hugging Face PEFT LoRA adapter to a tenant checkpoint (<save>/tenants/<name>/iter_0000000) "
            "that a run loads when it names the tenant with the printed rank / alpha / target_modules and runs "
            "with --load SAVE (or --save SAVE): the adapter's weights, a fresh optimizer. Separate q/k/v (and "
            "gate/up) adapters fuse into one: at the same rank if their A's are identical, else the A's stack and "
            "the rank grows (an error above --max-rank). Per-module ranks and alphas are folded into B."
        ),
    )
    p.add_argument("--peft-dir", required=True, type=Path, help="PEFT adapter directory")
    p.add_argument("--base", required=True, type=Path,
                   help="base checkpoint directory (import-hf's output) the adapter belongs to: its model.yaml")
    p.add_argument("--name", required=True, help="tenant name")
    p.add_argument("--save", required=True, type=Path, help="the run's --save / --load directory")
    p.add_argument("--max-rank", required=True, type=int, help="the pool's max_rank (lora.max_rank)")
    p.set_defaults(func=run_import_peft)


def run_import_peft(args) -> int:
    import torch

    from megatron_multilora import adapter_checkpoint, peft

    mc, _ = _model_source(args)
    spec, tensors = peft.import_peft(args.peft_dir, mc, args.max_rank)
    where = adapter_checkpoint.write_tenant_checkpoint(
        args.save, args.name, spec, tensors, dtype=getattr(torch, mc.params_dtype), source="import-peft")
    _log(
        f"done: {args.peft_dir} -> {where}. Run it as a tenant with name: {args.name}, rank: {spec.rank}, alpha: "
        f"{spec.alpha}, rslora: {str(spec.rslora).lower()}, "
        + (f"dropout: {spec.dropout}, " if spec.dropout else "") + f"target_modules: {list(spec.target_modules)} "
        f"(lora.max_rank >= {spec.rank}, and these targets among lora.target_modules) and --load {args.save}"
    )
    return 0


SUBCOMMANDS = [add_import_hf, add_export_peft, add_import_peft]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description="Convert checkpoints between Hugging Face formats and megatron-multilora's.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_multilora.tenant_checkpoint import CheckpointError

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError) as e:  # ConfigError, HFCheckpointError
        # and PeftFormatError included
        _log(f"error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
