"""A tenant checkpoint as full tensors, outside a training run: read one, or write one the trainer resumes from.

The format is :mod:`megatron_multilora.tenant_checkpoint`'s (``<save>/tenants/<name>/iter_XXXXXXX/``,
dist_checkpointing with global keys ``<layer global name>.lora_A`` [r, in] / ``.lora_B`` [out, r], a gated fc1's
B stored as [2, out / 2, r], optimizer moments under ``optimizer.state.exp_avg.<key>`` / ``exp_avg_sq``, the
tenant's metadata in the common state under ``"tenant"``, a manifest written last). Only that module's public
functions are used, so both stay in step.

* :func:`read_tenant_checkpoint` -> ``(spec, {global_name: (A, B)})``, full and unsharded whatever layout wrote it;
* :func:`write_tenant_checkpoint` writes iteration 0 of a tenant: the weights, zero optimizer moments at step 0
  and no data position, so a run that names the tenant (same rank / alpha / rslora / target_modules) with
  ``--load`` (or ``--save``) on that directory starts it from these weights with a fresh optimizer.

Both need a process group; in a process without one they start (and end) a single-process gloo group.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from pathlib import Path
from typing import Mapping

import torch

from . import tenant_checkpoint as ckpt
from .lora.slots import LoRASpec

_MOMENTS = ("exp_avg", "exp_avg_sq")


@contextlib.contextmanager
def _process_group():
    from . import platform

    platform.apply_cpu_patches()  # dist_checkpointing's CUDA assumptions (nothing with CUDA)
    started = not torch.distributed.is_initialized()
    if started:
        platform.init_distributed()
    try:
        yield
    finally:
        if started:
            torch.distributed.destroy_process_group()


def resolve_tenant_checkpoint(directory: str | Path) -> Path:
    """An ``iter_XXXXXXX`` directory of a tenant: ``directory`` itself, or the newest one named by a tenant
    root's ``latest_checkpointed_iteration.txt`` (``<save>/tenants/<name>``)."""
    directory = Path(directory)
    if (directory / ckpt.MANIFEST).is_file():
        return directory
    tenants = directory / ckpt.TENANTS_DIR
    if tenants.is_dir():  # a run's --save directory
        names = sorted(p.name for p in tenants.iterdir() if p.is_dir())
        raise ckpt.CheckpointError(f"{directory} is a run's checkpoint directory: give one of its tenants, "
                                   f"{tenants}/<name> ({', '.join(names) or 'none saved'})")
    it = ckpt.read_tracker(directory)
    if it is None:
        raise ckpt.CheckpointError(
            f"{directory} is not a tenant checkpoint: neither {ckpt.MANIFEST} (an iter_XXXXXXX directory) nor "
            f"{ckpt.TRACKER} (a <save>/tenants/<name> directory)"
        )
    return directory / ckpt.iter_name(it)


def _is_blocked_b(key: str) -> bool:
    """A gated fc1's B is stored as [2, out / 2, r] (see tenant_checkpoint)."""
    return key.endswith("linear_fc1.lora_B")


def read_tenant_checkpoint(directory: str | Path, *, with_meta: bool = False):
    """``(spec, {global_name: (A [r, in], B [out, r])})`` of a tenant checkpoint (an ``iter_XXXXXXX`` directory or
    a tenant root); ``with_meta``: also the metadata the trainer stored (``(spec, tensors, meta)``)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    directory = resolve_tenant_checkpoint(directory)
    with _process_group():
        common = ckpt.load_common(directory)  # verifies the manifest
        meta = common.get("tenant") if isinstance(common, dict) else None
        if not isinstance(meta, dict) or "rank" not in meta:
            raise ckpt.CheckpointError(f"{directory} is not a tenant checkpoint (no tenant metadata)")
        available = dist_checkpointing.load_tensors_metadata(str(directory))
        keys = sorted(k for k in available if not k.startswith("optimizer.") and k.endswith((".lora_A", ".lora_B")))
        # The fp32 masters when it keeps them (a tenant trained in bf16: the weights its optimizer updates, of
        # which the forward used a bf16 copy), else the weights.
        source = {k: f"optimizer.state.{ckpt.MASTER_PREFIX}.{k}" if meta.get("has_master") else k for k in keys}
        sharded = {
            k: ShardedTensor.from_rank_offsets(
                source[k], torch.zeros(available[source[k]].global_shape, dtype=available[source[k]].dtype),
                replica_id=0)
            for k in keys
        }
        loaded = ckpt.load_sharded(directory, sharded, strict="raise_unexpected")
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    names = sorted({k.rsplit(".", 1)[0] for k in keys})
    for name in names:
        if f"{name}.lora_A" not in loaded or f"{name}.lora_B" not in loaded:
            raise ckpt.CheckpointError(f"{directory}: {name} has only one of lora_A / lora_B")
        a, b = loaded[f"{name}.lora_A"], loaded[f"{name}.lora_B"]
        if b.ndim == 3:
            b = b.reshape(-1, b.shape[-1])
        tensors[name] = (a, b)
    spec_dict = meta.get("spec") or {}
    spec = LoRASpec(
        rank=int(meta["rank"]), alpha=float(meta["alpha"]), target_modules=tuple(meta["targets"]),
        dropout=float(spec_dict.get("dropout", 0.0)), rslora=bool(meta["rslora"]),
        init=spec_dict.get("init", "kaiming"),
    )
    return (spec, tensors, meta) if with_meta else (spec, tensors)


def write_tenant_checkpoint(
    save: str | Path, name: str, spec: LoRASpec, tensors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *,
    dtype: torch.dtype = torch.float32, tenant_config: Mapping | None = None, iteration: int = 0,
    source: str = "import",
) -> Path:
    """Write ``<save>/tenants/<name>/iter_XXXXXXX`` (and its tracker) holding the tenant's weights (in ``dtype``,
    the run's params_dtype) and as the fp32 masters a run trains from (an fp32 adapter keeps every bit whatever
    the run's dtype), zero Adam moments, optimizer step 0 and a fresh data position. ``tenant_config``:
    the TenantConfig fields stored as its spec (rank, alpha, rslora, dropout, init and target_modules are
    taken from ``spec``). Every rank of the current process group must call it (one process is enough)."""
    from megatron.core.dist_checkpointing import ShardedTensor

    import yaml

    root = ckpt.tenant_root(save, name)
    if ckpt.complete_iterations(root):
        raise FileExistsError(f"{root} already holds checkpoints of tenant {name!r}: choose another name or --save")
    alpha = float(spec.rank if spec.alpha is None else spec.alpha)
    targets = sorted(spec.target_modules) if spec.target_modules is not None else None
    if targets is None:
        raise ValueError("write_tenant_checkpoint: the spec must name its target_modules")
    config = {"lr": 0.0, "train_data": "", **dict(tenant_config or {})}
    config.update(name=name, rank=spec.rank, alpha=alpha, rslora=spec.rslora, dropout=spec.dropout,
                  init=spec.init, target_modules=list(targets))
    from .config import tenant_from_dict

    config = tenant_from_dict(config, f"tenant {name!r}").to_dict()  # the trainer reads it back with this
    sharded = {}
    for layer, (a, b) in sorted(tensors.items()):
        if a.shape[0] != spec.rank or b.shape[1] != spec.rank:
            raise ValueError(f"{layer}: A {tuple(a.shape)} / B {tuple(b.shape)} are not of rank {spec.rank}")
        for key, t in ((f"{layer}.lora_A", a), (f"{layer}.lora_B", b)):
            if _is_blocked_b(key):
                t = t.reshape(2, t.shape[0] // 2, t.shape[1])
            values = {"": t.to(dtype), ckpt.MASTER_PREFIX: t.to(torch.float32),
                      **{m: torch.zeros(t.shape, dtype=torch.float32) for m in _MOMENTS}}
            for prefix, value in values.items():
                full = f"optimizer.state.{prefix}.{key}" if prefix else key
                sharded[full] = ShardedTensor.from_rank_offsets(full, value.contiguous().clone(), replica_id=0)
    run_id = f"{source}-{uuid.uuid4().hex}"
    meta = {
        "format": ckpt.FORMAT, "name": name, "iteration": iteration, "run_id": run_id, "spec": config,
        "rank": spec.rank, "alpha": alpha, "rslora": bool(spec.rslora), "targets": targets, "steps": 0,
        "optimizer_step": 0, "data": None, "done": False, "has_master": True,
    }
    sharded["tenant"] = meta
    with _process_group():
        return ckpt.save_sharded(
            root, iteration, sharded,
            {**{k: meta[k] for k in ("name", "iteration", "run_id", "done")}, "saved_at": time.time()},
            extra_files={ckpt.SPEC_FILE: yaml.safe_dump(config, sort_keys=False)},
        )
