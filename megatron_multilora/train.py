"""Entry point: `torchrun --nproc-per-node N -m megatron_multilora.train --config run.yaml [Megatron-LM flags]`.

The whole configuration (YAML + flags, data files, layout arithmetic) is validated before any process group
or model is created.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings

from .arguments import parse_run_config
from .config import ConfigError


def _quiet_known_warnings() -> None:
    """megatron-core warns at import about optional GPU packages (apex, transformer-engine) and torch about
    collective names megatron uses; on every rank, at every start. Our own warnings stay."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.core(\..*)?")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torch\.distributed|megatron\.core)(\..*)?")


def main(argv=None) -> int:
    _quiet_known_warnings()
    try:
        run = parse_run_config(argv)
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    from . import platform
    from .data.datasets import DataError
    from .tenant_checkpoint import CheckpointError
    from .training import MultiLoRATrainer

    trainer = None
    try:
        trainer = MultiLoRATrainer(run)
        left_early = trainer.train()
        trainer.metrics.note(
            "{}. TensorBoard logs: {} | metrics: {} | checkpoints: {}".format(
                "left early" if left_early else "done",
                run.tensorboard_dir or "(off)", run.metrics_file or "(off)", run.save or "(off)"
            )
        )
        trainer.close()
    except BaseException as e:
        # A failed rank leaves at once: tearing down process groups (or megatron's checkpoint writer) would
        # wait for peers that are themselves waiting for this rank; torchrun then stops the others. Bad input
        # (data, checkpoints, configuration) is named in one line, anything else with its traceback.
        if isinstance(e, (ConfigError, DataError, CheckpointError)):
            print(f"error: {e}", file=sys.stderr)
            code = 2
        elif isinstance(e, KeyboardInterrupt):  # saved checkpoints are complete or never promoted (atomic)
            saved = "no checkpoint saved"
            if trainer is not None:
                trainer.metrics.close()  # what TensorBoard still buffers
                if trainer.saved_iteration is not None:
                    saved = f"latest checkpoint: iteration {trainer.saved_iteration}"
                saved = f"at iteration {trainer.iteration}; {saved}"
            print(f"interrupted {saved}", file=sys.stderr)
            code = 130
        else:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(code)
    platform.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
