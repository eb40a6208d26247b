"""Checkpoints through megatron-core dist_checkpointing: sharded tensors with global keys, so what is saved at
one TP/PP/EP/DP layout loads at another."""

from __future__ import annotations

from pathlib import Path

import torch


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
    """Load base weights saved at any layout into this rank's model chunk."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    if not (directory / "metadata.json").exists():
        raise FileNotFoundError(f"no dist_checkpointing checkpoint at {directory} (metadata.json missing)")
    state = dist_checkpointing.load(_base_sharded_state_dict(model), str(directory))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if ".lora_" not in k and not k.endswith("._extra_state")]
    if missing:
        raise RuntimeError(f"base checkpoint {directory} lacks {missing[:5]}")
