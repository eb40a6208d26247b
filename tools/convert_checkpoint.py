"""Convert checkpoints between Hugging Face formats and megatron-multilora's.

Subcommands:

    import-hf     a Hugging Face model directory (config.json + *.safetensors) -> a base checkpoint for
                  ``--load-base`` (megatron dist_checkpointing, loadable at any TP/PP/EP layout) + model.yaml

    python tools/convert_checkpoint.py import-hf --hf-dir Qwen2.5-0.5B --save ckpt/qwen2.5-0.5b-base
    python tools/convert_checkpoint.py import-hf --hf-dir Mixtral-8x7B-v0.1 --print-config

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
            "layout) plus DIR/model.yaml, the model config a run uses when it has no model section. Runs in "
            "one process on the CPU. " + SUPPORTED_SUMMARY[0].upper() + SUPPORTED_SUMMARY[1:]
        ),
    )
    p.add_argument("--hf-dir", required=True, type=Path, help="Hugging Face model directory")
    p.add_argument("--save", type=Path, help="output directory (created; must be empty or absent)")
    p.add_argument(
        "--params-dtype", choices=("float32", "bfloat16", "float16"), default=None,
        help="dtype of the saved weights (default: the checkpoint's config dtype, else float32)",
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
        raise SystemExit("import-hf: --save DIR is required (or --print-config)")
    mc = hf.import_hf(args.hf_dir, args.save, params_dtype=args.params_dtype, log=_log)
    _log(
        f"done: {args.save} ({mc.num_layers} layers, hidden {mc.hidden_size}"
        + (f", {mc.num_experts} experts top-{mc.moe_router_topk}" if mc.is_moe else "")
        + f", {mc.params_dtype}); train with --load-base {args.save}"
    )
    return 0


# --------------------------------------------------------------------------------------------------------

SUBCOMMANDS = [add_import_hf]  # export-peft / import-peft: add theirs here


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
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # ConfigError and HFCheckpointError included
        _log(f"error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
