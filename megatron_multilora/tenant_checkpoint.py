"""Per-tenant distributed checkpoints and the run-level resume state.

Layout of a ``--save`` directory (Megatron-LM's conventions, one level per tenant)::

    <save>/latest_checkpointed_iteration.txt      newest complete run checkpoint (an iteration number)
    <save>/run/iter_0000100/                      run state: iteration, slot table, queue, finished tenants,
                                                  data-source position, RNG states (one object per rank)
    <save>/run/run_id.txt                         the run that saves here (written before its first save)
    <save>/tenants/<tenant>/latest_checkpointed_iteration.txt
    <save>/tenants/<tenant>/iter_0000100/         that tenant only: its adapter sliced to ITS rank, its
                                                  optimizer moments and step (= scheduler position), its
                                                  data-stream position and its spec (common state and
                                                  tenant.yaml)

Every ``iter_*`` directory is a megatron-core dist_checkpointing (torch_dist) checkpoint. Adapter tensors are
ShardedTensors with GLOBAL keys (``<layer global name>.lora_A`` / ``.lora_B``, optimizer moments under
``optimizer.state.exp_avg.<key>`` / ``exp_avg_sq`` / ``fp32_param``) and global shapes ``[r, in]`` / ``[out, r]``
(a gated fc1's B, whose rows are [gate; up] with each TP rank holding [gate_i; up_i], is stored as
``[2, out / 2, r]`` and sharded on dim 1). Expert layers carry the global expert index in their key, so each
EP rank simply saves the experts it holds. Exactly one replica (replica_id 0) of every shard is written, so a
tenant checkpoint loads into any slot at any TP / PP / EP / DP layout.

Durability: a checkpoint is written into ``.tmp.iter_XXXXXXX`` next to its final place; rank 0 then records
the size and sha256 of every file in ``manifest.json`` (written last), renames the directory into place and
only then replaces the ``latest_checkpointed_iteration.txt`` pointer (temp file + ``os.replace``). A crash at
any point leaves either the previous complete checkpoint or the new one behind the pointer, never a partial
one (a run checkpoint promoted before the pointer moved is resumed: ``latest_run_iteration``; one that
``promote`` had moved aside when its process died is put back: ``recover``; pruning moves a checkpoint out of
sight before deleting it); loading verifies the manifest first and names the missing, truncated or corrupt file.

A tenant checkpoint's common state holds ``"tenant"``: ``format``, ``name``, ``iteration`` (of the run when
saved), ``run_id`` (the run lineage that wrote it), ``spec`` (TenantConfig fields, also written as
``tenant.yaml``), ``rank``, ``alpha``, ``rslora``, ``targets`` (the adapter's shape), ``steps`` (its trainer
steps), ``optimizer_step`` (AdamW step count = learning-rate schedule position), ``data`` (the data source's
``tenant_state``, or None for a fresh stream), ``done`` (finished its train_iters / epochs), ``has_master``
(fp32 master weights saved under ``optimizer.state.fp32_param.<key>``), ``tokenizer`` and ``base`` (what it
trained with). The run state (``<save>/run``) holds
``"run"``: ``run_id``, ``iteration``, ``tenants`` ({name: {slot, iteration}}), ``queue`` (TenantConfig dicts),
``finished``, ``data`` (source iteration and each tenant's last_step), ``layout``; and ``rng_state``, one
ShardedObject per global rank.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import CheckpointException

FORMAT = "megatron-multilora/1"
TRACKER = "latest_checkpointed_iteration.txt"
MANIFEST = "manifest.json"
TENANTS_DIR = "tenants"
RUN_DIR = "run"
RUN_ID_FILE = "run_id.txt"
SPEC_FILE = "tenant.yaml"  # a tenant checkpoint's settings (TenantConfig fields), readable without loading it
TMP_PREFIX = ".tmp."
OLD_PREFIX = ".old."  # a checkpoint promote() is replacing (put back if the process died before its successor)
DELETING_PREFIX = ".deleting."  # a checkpoint being pruned: never counted, never put back
_ITER_RE = re.compile(r"iter_(\d{7,})")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the directory or file."""


# What reading a checkpoint can raise besides our own errors: torch.distributed.checkpoint gathers every rank's
# failure (another model's shapes, a missing shard) into a CheckpointException, which derives from BaseException
# -- an `except Exception` lets it through and it ends the whole job.
LOAD_FAILURES = (Exception, CheckpointException)


def failure_said(e: BaseException) -> str:
    """One line for a load failure: a CheckpointException's first rank's own error (its str is every rank's
    traceback)."""
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    return f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"


# ---------------------------------------------------------------------------------------------- paths


def iter_name(iteration: int) -> str:
    return f"iter_{int(iteration):07d}"


def parse_iter_name(name: str) -> int | None:
    m = _ITER_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def tenant_root(save: str | Path, name: str) -> Path:
    """``<save>/tenants/<name>``, refusing names that are not plain directory names or paths that leave
    ``<save>/tenants`` once resolved (``..``, separators, symlinks pointing elsewhere)."""
    from .lora.slots import SlotError, check_tenant_name

    try:
        check_tenant_name(name)
    except SlotError as e:
        raise CheckpointError(str(e)) from None
    base = Path(save).resolve() / TENANTS_DIR
    path = (base / name).resolve()
    if path.parent != base or path.name != name:
        raise CheckpointError(f"tenant {name!r}: checkpoint path {path} is not inside {base}")
    return path


def run_root(save: str | Path) -> Path:
    return Path(save).resolve() / RUN_DIR


def latest_run_iteration(save: str | Path) -> int | None:
    """The run checkpoint of <save> to resume: the one its pointer names, else (a run stopped between
    promoting its checkpoint and writing the pointer) its newest complete one; None if it holds none."""
    it = read_tracker(Path(save))
    if it is None:
        done = complete_iterations(run_root(save))
        it = done[-1] if done else None
    return it


def saved_run_id(save: str | Path) -> str | None:
    """The run_id of the run that began saving into <save> (written before its first checkpoint's tenants, so a
    run stopped during that save is restarted as the same run: what that save left is its own, not resumed)."""
    path = run_root(save) / RUN_ID_FILE
    return path.read_text().strip() or None if path.is_file() else None


# ---------------------------------------------------------------------------------------------- files


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
        try:
            os.fsync(f.fileno())  # the ranks' writes are on disk before the checkpoint is promoted
        except OSError:
            pass
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path, meta: dict) -> None:
    """Record size and sha256 of every file of ``directory``; written last (its presence = complete)."""
    files = {
        str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(directory)
    }
    write_text_atomic(directory / MANIFEST, json.dumps({"format": FORMAT, "meta": meta, "files": files}, indent=1))


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {directory} is incomplete or not ours: {path} is missing (it is written last)"
        )
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
            raise ValueError(f"unknown format {manifest.get('format')!r}")
        bad = [rel for rel, info in manifest["files"].items()
               if not isinstance(info, dict) or not isinstance(info.get("size"), int)
               or not isinstance(info.get("sha256"), str)]
        if bad:
            raise ValueError(f"entries without a size and sha256: {bad[:3]}")
    except (ValueError, AttributeError) as e:  # (UnicodeDecodeError is a ValueError)
        raise CheckpointError(f"checkpoint manifest {path} is corrupt ({e})") from None
    return manifest


def verify_checkpoint(directory: Path) -> dict:
    """Check every file against the manifest; returns the manifest's ``meta``. Errors name the file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    manifest = read_manifest(directory)
    for rel, info in sorted(manifest["files"].items()):
        path = directory / rel
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing")
        size = path.stat().st_size
        if size != info["size"]:
            raise CheckpointError(
                f"checkpoint file {path} is truncated or damaged: {size} bytes, the manifest records {info['size']}"
            )
        if _sha256(path) != info["sha256"]:
            raise CheckpointError(f"checkpoint file {path} is corrupt: its sha256 does not match the manifest")
    return manifest.get("meta", {})


def promote(tmp: Path, final: Path) -> None:
    """Rename a complete temporary checkpoint into place (replacing an older one of the same name)."""
    old = None
    if final.exists():
        old = final.with_name(f"{OLD_PREFIX}{final.name}.{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_tracker(root: Path) -> int | None:
    """The iteration named by ``root/latest_checkpointed_iteration.txt`` (None if there is none)."""
    path = Path(root) / TRACKER
    if not path.is_file():
        return None
    text = path.read_bytes().decode("utf-8", errors="replace").strip()
    if not re.fullmatch(r"[0-9]+", text):
        raise CheckpointError(f"{path} does not hold an iteration number: {text[:40]!r}")
    return int(text)


def write_tracker(root: Path, iteration: int) -> None:
    write_text_atomic(Path(root) / TRACKER, f"{int(iteration)}\n")


def complete_iterations(root: Path) -> list[int]:
    """Iterations of ``root`` with a promoted directory that has a manifest, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        it = parse_iter_name(p.name)
        if it is not None and (p / MANIFEST).is_file():
            out.append(it)
    return sorted(out)


def prune(root: Path, keep: int | None, protect=()) -> list[Path]:
    """Delete all but the newest ``keep`` iterations of ``root`` (never one in ``protect`` or the one the
    tracker names), and leftovers of interrupted saves. Rank 0 only. Returns what was removed."""
    root = Path(root)
    if not root.is_dir():
        return []
    recover(root)
    removed = []
    for p in sorted(root.iterdir()):
        if p.is_dir() and p.name.startswith((TMP_PREFIX, OLD_PREFIX, DELETING_PREFIX)):
            _remove(p)
            removed.append(p)
    if keep is None:
        return removed
    iterations = sorted({parse_iter_name(p.name) for p in root.iterdir()} - {None})
    protected = set(protect)
    try:
        tracked = read_tracker(root)
    except CheckpointError:
        tracked = None
    if tracked is not None:
        protected.add(tracked)
    for it in iterations[: max(len(iterations) - keep, 0)]:
        if it not in protected:
            _remove(root / iter_name(it))
            removed.append(root / iter_name(it))
    return removed


def recover(root: Path) -> None:
    """Put back a complete checkpoint that promote() had moved aside when its process died before the new one
    took its place (``.old.iter_XXXXXXX.<pid>`` and no ``iter_XXXXXXX``). Rank 0; a read-only root is left as
    it is (the missing checkpoint is named where it is needed)."""
    root = Path(root)
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        name, _, pid = p.name[len(OLD_PREFIX):].rpartition(".")
        if (p.name.startswith(OLD_PREFIX) and parse_iter_name(name) is not None and not (root / name).exists()
                and (p / MANIFEST).is_file() and not _alive(pid)):
            try:
                os.rename(p, root / name)
            except OSError:
                pass


def _alive(pid: str) -> bool:
    """Is process ``pid`` (of this machine) running -- still inside its promote()?"""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return int(pid) != os.getpid()


def _remove(path: Path) -> None:
    """Delete a checkpoint directory out of sight first: one half deleted (a crash, a file that would not go) is
    never taken for a complete one."""
    if not path.name.startswith(DELETING_PREFIX):
        gone = path.with_name(f"{DELETING_PREFIX}{path.name}")
        shutil.rmtree(gone, ignore_errors=True)
        try:
            os.rename(path, gone)
            path = gone
        except OSError:  # (pruning never fails a save: deleted in place, as best it can)
            pass
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- ranks


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(fn, *args):
    """Run ``fn`` on rank 0 only and hand its result (or its CheckpointError / OSError) to every rank, so
    all ranks go on or fail together."""
    outcome = None
    if _is_rank0():
        try:
            outcome = (True, fn(*args))
        except CheckpointError as e:
            outcome = (False, str(e))
        except Exception as e:  # noqa: BLE001 - the other ranks must not wait for an answer that never comes
            traceback.print_exc()  # not a checkpoint's fault, maybe a bug: where it happened, on rank 0
            outcome = (False, f"{type(e).__name__}: {e}")
    ok, value = broadcast_object(outcome)
    if not ok:
        raise CheckpointError(value)
    return value


# ---------------------------------------------------------------------------------------------- save / load


def save_sharded(root: Path, iteration: int, sharded: dict, meta: dict, *, extra_files: dict | None = None,
                 before_promote=None, tracker: bool = True) -> Path:
    """Collective: write ``sharded`` (a dist_checkpointing state dict) as ``root/iter_XXXXXXX`` atomically and
    (with ``tracker``) point ``root/latest_checkpointed_iteration.txt`` at it. ``before_promote()`` runs on
    every rank once the data is written to the temporary directory (a test hook)."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = root / iter_name(iteration)
    tmp = root / f"{TMP_PREFIX}{iter_name(iteration)}"

    def prepare():
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a save that crashed
            shutil.rmtree(tmp)
        tmp.mkdir()

    on_rank0(prepare)
    # Adapters are small: one writer process per rank (megatron's default forks two).
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    strategy = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)
    dist_checkpointing.save(sharded, str(tmp), sharded_strategy=strategy)  # ends with a barrier
    if before_promote is not None:
        before_promote()

    def finish():
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        write_manifest(tmp, meta)
        promote(tmp, final)
        if tracker:
            write_tracker(root, iteration)

    on_rank0(finish)
    return final


def check_same_run(directory: Path, run_id: str) -> None:
    """Refuse to go on writing where run checkpoint ``directory`` (the one a pointer names) is another run's:
    this run would overwrite its iterations and move its pointer. Rank 0."""
    if not (Path(directory) / MANIFEST).is_file():
        return
    theirs = read_manifest(directory).get("meta", {}).get("run_id")
    if theirs is not None and theirs != run_id:
        raise CheckpointError(f"{directory} is another run's checkpoint (run {theirs}); this run ({run_id}) would "
                              "overwrite its iterations and pointer: save to another directory, or resume it with "
                              "--load")


def load_sharded(directory: Path, sharded: dict, strict: str = "raise_all", *, verify: bool = True) -> dict:
    """Collective: verify the manifest (rank 0; skip with ``verify=False`` if just done), then load
    ``sharded`` from ``directory``."""
    from megatron.core import dist_checkpointing

    if verify:
        on_rank0(verify_checkpoint, Path(directory))
    try:
        return dist_checkpointing.load(sharded, str(directory), strict=strict)
    except LOAD_FAILURES as e:  # every failure names the checkpoint
        raise CheckpointError(f"cannot load checkpoint {directory}: {failure_said(e)}") from e


def load_common(directory: Path, *, verify: bool = True) -> dict:
    """Collective: verify (rank 0; skip with ``verify=False`` if just done) and read the common (non-tensor)
    state of a checkpoint."""
    from megatron.core import dist_checkpointing

    if verify:
        on_rank0(verify_checkpoint, Path(directory))
    try:
        return dist_checkpointing.load_common_state_dict(str(directory))
    except LOAD_FAILURES as e:
        raise CheckpointError(f"cannot read checkpoint {directory}: {failure_said(e)}") from e


# ---------------------------------------------------------------------------------------------- adapters


def _global_view(layer, which: str, local: torch.Tensor):
    """(tensor, rank_offsets) of this rank's piece in the checkpoint's global coordinates."""
    axis, tp_rank, tp_size = layer.shard_info(which)
    blocks = layer.lora_out_blocks if which == "b" else 1
    if blocks > 1:  # [gate_i; up_i] -> [2, out_i / 2, r]: each block is sharded on its rows
        local = local.reshape(blocks, local.shape[0] // blocks, local.shape[1])
        axis = None if axis is None else axis + 1
    return local, ([] if axis is None else [(axis, tp_rank, tp_size)])


def _replica_id(layer, which: str):
    """Replicas of one piece: across data-parallel ranks (expert-data-parallel for expert layers) and, for
    the factor a TP group replicates, across its TP ranks. The piece with replica id (0, 0, 0) is written."""
    from megatron.core import parallel_state as ps

    if layer.lora_kind.startswith("expert_"):
        dp_rank = ps.get_expert_data_parallel_rank()
    else:
        dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
    axis, tp_rank, _ = layer.shard_info(which)
    return (0, tp_rank if axis is None else 0, dp_rank)


def _slice_rank(which: str, per_slot: torch.Tensor, rank: int) -> torch.Tensor:
    return per_slot[:rank] if which == "a" else per_slot[:, :rank]


MASTER_PREFIX = "fp32_param"  # (Megatron-LM's name for the fp32 master copy of a bf16 / fp16 parameter)
_OPT_KEYS = {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq", MASTER_PREFIX: "master"}


@dataclass
class AdapterEntry:
    key: str  # global key of the weight
    layer: object
    which: str  # "a" | "b"
    param_name: str  # the optimizer's name of the parameter


def adapter_entries(table, record, param_names: dict) -> list[AdapterEntry]:
    """The tenant's LoRA factors on this rank, in a fixed order."""
    entries = []
    for layer in table.layers:
        if layer.lora_kind not in record.targets:
            continue
        for which, p in (("a", layer.lora_A), ("b", layer.lora_B)):
            entries.append(AdapterEntry(f"{layer.global_name}.lora_{which.upper()}", layer, which, param_names[id(p)]))
    return entries


def adapter_sharded_state_dict(entries, slot: int, rank: int, optimizer=None, *, for_load: bool = False,
                               with_master: bool = False) -> dict:
    """ShardedTensors of one tenant's weights (and optimizer moments when ``optimizer`` is given) sliced to
    ``rank``: the data of ``slot`` to save, or zero tensors of the right shapes to load into."""
    from megatron.core.dist_checkpointing import ShardedTensor

    state = None if (optimizer is None or for_load) else optimizer.slot_state(slot)
    sharded = {}
    for e in entries:
        param = e.layer.lora_A if e.which == "a" else e.layer.lora_B
        sources = {"": _slice_rank(e.which, param.detach()[slot], rank)}
        if optimizer is not None:
            for prefix, opt_key in _OPT_KEYS.items():
                if opt_key == "master" and not with_master:
                    continue
                if state is not None:
                    sources[prefix] = _slice_rank(e.which, state[f"{e.param_name}.{opt_key}"], rank)
                else:
                    dtype = param.dtype if prefix == "" else torch.float32
                    sources[prefix] = torch.zeros(_slice_rank(e.which, param.detach()[slot], rank).shape, dtype=dtype)
        elif with_master and for_load:  # (the weights of an fp32 run, from a checkpoint's masters: no moments)
            sources[MASTER_PREFIX] = torch.zeros(sources[""].shape, dtype=torch.float32)
        for prefix, tensor in sources.items():
            tensor = torch.zeros_like(tensor) if for_load else tensor.detach().clone().contiguous()
            key = e.key if not prefix else f"optimizer.state.{prefix}.{e.key}"
            view, offsets = _global_view(e.layer, e.which, tensor)
            sharded[key] = ShardedTensor.from_rank_offsets(key, view, *offsets,
                                                           replica_id=_replica_id(e.layer, e.which))
    return sharded


@torch.no_grad()
def apply_adapter_state(loaded: dict, entries, slot: int, rank: int, optimizer=None, *, step: int = 0,
                        with_master: bool = False) -> None:
    """Write loaded weights (and optimizer moments / step) into ``slot``; the slot's other rows stay zero. A
    checkpoint's fp32 masters (``with_master``) are the weights of an fp32 run (the finer copy of what it
    trained in bf16 / fp16) and the masters of a run that keeps masters."""
    for e in entries:
        param = e.layer.lora_A if e.which == "a" else e.layer.lora_B
        target = _slice_rank(e.which, param[slot], rank)
        param[slot].zero_()
        weights = loaded[e.key]
        if with_master and param.dtype == torch.float32:
            weights = loaded[f"optimizer.state.{MASTER_PREFIX}.{e.key}"]
        target.copy_(weights.reshape(target.shape).to(param.dtype))
    if optimizer is None:
        return
    state = optimizer.slot_state(slot)  # called right after reset_slot: zero moments, masters = weights
    for e in entries:
        for prefix, opt_key in _OPT_KEYS.items():
            if opt_key == "master" and (not with_master or f"{e.param_name}.master" not in state):
                continue  # (an fp32 parameter keeps no master)
            full = state[f"{e.param_name}.{opt_key}"]
            full.zero_()
            piece = _slice_rank(e.which, full, rank)
            piece.copy_(loaded[f"optimizer.state.{prefix}.{e.key}"].reshape(piece.shape))
    if not with_master:  # re-read from the weights just written
        state = {k: v for k, v in state.items() if not k.endswith(".master")}
    state["step"] = torch.tensor(int(step), dtype=torch.int64)
    optimizer.load_slot_state(slot, state)


# ---------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """This rank's generators (plain types only, so loading needs no unpickling of arbitrary classes)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states({k: v.clone() for k, v in state["tracker"].items()})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rng_sharded_object(data=None):
    """One RNG object per global rank (restored only at the same layout)."""
    from megatron.core.dist_checkpointing import ShardedObject

    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    return ShardedObject("rng_state", data, (world,), (rank,), replica_id=0)
