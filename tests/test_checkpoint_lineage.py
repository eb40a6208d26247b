"""Which checkpoint a tenant comes back from, what a run may overwrite, what pruning keeps, and what a resume
may change: a tenant re-joins from its most recent checkpoint whatever directory and iteration number it has; a
tenant whose checkpoint already did its train_iters is not trained again (nor when it leaves the queue); a run
never writes over another run's checkpoints or pointer, even when a program builds the trainer without
validation; pruning keeps every tenant checkpoint a kept run checkpoint resumes from; a resume on another base
or model is refused before any model exists; moved data, a longer --train-iters, bf16 -> fp32 are taken (and
said); a pool too small for the checkpoint and garbled checkpoint files are named, not tracebacks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests import tenant_runs as tr
from tests.distributed import run_world


def _trainer(cfg: dict, validated: bool = True):
    from megatron_multilora.config import load_run_config, validate
    from megatron_multilora.training import MultiLoRATrainer

    run = load_run_config(cfg)
    return MultiLoRATrainer(validate(run, 1) if validated else run)


def _tree(root: Path) -> dict:
    """Every file under root with its size and modification time (what 'untouched' compares)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def _lineage_world(d: str) -> dict:
    """The scenarios, one trainer after another in one process."""
    from megatron_multilora import metrics
    from megatron_multilora import tenant_checkpoint as ckpt
    from megatron_multilora.lora.slots import SlotError

    notes = []
    metrics.MetricsWriter.note = lambda self, line: notes.append(line)  # (a process of its own)
    d, out = Path(d), {}
    x = tr.tenant(d, "x", rank=4, seed=1, valid=False)

    # A tenant stopped in --save B after resuming from --load A comes back from B (its newest), not from A's
    # older checkpoint with fewer steps.
    a_dir, b_dir = d / "A", d / "B"
    first = _trainer(tr.run_config([x], eval_interval=None, save=str(a_dir)))
    for _ in range(2):
        first.train_iteration()
    first.save_checkpoint()
    first.close()
    cfg = tr.run_config([x], eval_interval=None, save=str(b_dir), load=str(a_dir))
    second = _trainer(cfg)
    for _ in range(3):
        second.train_iteration()
    second.stop_tenant("x")
    second.add_tenant(second.run.tenants[0])
    out["rejoined_steps"] = second.tenants["x"].steps
    out["rejoined_from"] = str(second.find_tenant_checkpoint("x").relative_to(d))
    second.close()

    # Iteration numbers do not order runs: a run stops x at its iteration 2 before any run checkpoint; a new run
    # into the same --save resumes x (2 steps), trains 1 step and stops it at ITS iteration 1. x comes back
    # with 3 steps, from iter_1, not from the older iter_2.
    e_dir = d / "E"
    cfg = tr.run_config([x], eval_interval=None, save=str(e_dir))
    for iterations in (2, 1):
        run = _trainer(cfg)
        for _ in range(iterations):
            run.train_iteration()
        run.stop_tenant("x")
        run.close()
    run = _trainer(cfg)
    out["newer_run_steps"] = run.tenants["x"].steps
    run.close()
    # ... and the same when the tenant's pointer still names the older one (a process that died between promoting
    # its newer checkpoint and moving the pointer): both record when they were saved, the newer wins
    shutil.copytree(e_dir / "tenants", d / "stale-pointer" / "tenants")
    ckpt.write_tracker(d / "stale-pointer" / "tenants" / "x", 2)
    run = _trainer(tr.run_config([x], eval_interval=None, load=str(d / "stale-pointer")))
    out["stale_pointer_steps"] = run.tenants["x"].steps
    run.close()

    # A tenant stopped right after a periodic save (the same iteration, the same state) keeps the checkpoint that
    # save wrote, which the run's pointer names: rewriting it swapped that directory out and in (promote), a
    # window where a crash leaves the run checkpoint without its tenant.
    run = _trainer(tr.run_config([x], eval_interval=None, save=str(d / "stop-after-save")))
    run.train_iteration()
    run.save_checkpoint()
    saved = d / "stop-after-save" / "tenants" / "x" / "iter_0000001"
    before = (saved.stat().st_ino, _tree(saved))
    run.stop_tenant("x")
    out["stop_after_save_kept"] = (saved.stat().st_ino, _tree(saved)) == before
    run.add_tenant(run.run.tenants[0], resume=False)  # fresh weights in the slot, at the same iteration: saved
    run.stop_tenant("x")
    out["fresh_restop_saved"] = _tree(saved) != before
    run.add_tenant(run.run.tenants[0])  # it joins again from that checkpoint, and a later stop writes anew
    run.train_iteration()
    run.stop_tenant("x")
    out["stop_later_saved"] = sorted(p.name for p in saved.parent.glob("iter_*"))
    run.close()

    # A tenant checkpoint (copied to a directory of tenant checkpoints only) joining a job on another random base
    # (another seed draws other weights): it goes on, said with what differs; on its own base nothing is said.
    shutil.copytree(e_dir / "tenants", d / "other-base" / "tenants")
    for seed in (7, 99):
        notes.clear()
        run = _trainer(tr.run_config([x], eval_interval=None, load=str(d / "other-base"), seed=seed))
        out[f"base_notes_seed{seed}"] = [n for n in notes if "another base" in n]
        out[f"base_steps_seed{seed}"] = run.tenants["x"].steps
        run.close()

    # An imported tenant (an older import-peft: no saved_at in its manifest) trained 2 steps, its directory then
    # copied as `cp -r` does (new file times) into a directory of tenant checkpoints only: a job loading it
    # resumes the trained checkpoint, which the tenant's pointer names -- not the import, whose file is newer.
    from megatron_multilora.adapter_checkpoint import read_tenant_checkpoint, write_tenant_checkpoint

    imported = d / "imported"
    spec, tensors = read_tenant_checkpoint(e_dir / "tenants" / "x")
    write_tenant_checkpoint(imported, "y", spec, tensors)
    manifest = imported / "tenants" / "y" / "iter_0000000" / "manifest.json"
    old_format = json.loads(manifest.read_text())
    old_format["meta"].pop("saved_at")
    manifest.write_text(json.dumps(old_format))
    y = {**x, "name": "y"}
    run = _trainer(tr.run_config([y], eval_interval=None, save=str(imported), load=str(imported)))
    for _ in range(2):
        run.train_iteration()
    run.save_checkpoint()
    run.close()
    shutil.copytree(imported / "tenants", d / "copied" / "tenants", copy_function=shutil.copy)
    run = _trainer(tr.run_config([y], eval_interval=None, save=str(d / "after-copy"), load=str(d / "copied")))
    out["copied_steps"] = run.tenants["y"].steps
    run.close()

    # b finished (train_iters 2, saved as done) and the job died before its end-of-run save: the relaunch
    # resumes b's checkpoint, finds it complete and does not train it again.
    a = tr.tenant(d, "a", rank=4, seed=2, valid=False)
    b = tr.tenant(d, "b", rank=4, seed=3, valid=False, train_iters=2)
    done_dir = d / "done"
    cfg = tr.run_config([a, b], eval_interval=None, save=str(done_dir))
    died = _trainer(cfg)
    for _ in range(3):
        died.train_iteration()
    out["died_finished"] = list(died.finished)
    died.close()  # (no end-of-run save)
    before = _tree(done_dir / "tenants" / "b")
    relaunch = _trainer({**cfg, "load": str(done_dir)})
    out["relaunch_running"], out["relaunch_finished"] = sorted(relaunch.tenants), list(relaunch.finished)
    relaunch.train_iteration()
    out["b_untouched"] = _tree(done_dir / "tenants" / "b") == before
    relaunch.close()
    # ... and the same when b waits in the queue (one slot) and leaves it as q finishes
    q = tr.tenant(d, "q", rank=4, seed=9, valid=False, train_iters=1, lr_warmup_iters=0)
    queued = _trainer({**cfg, "tenants": [q, b], "load": str(done_dir),
                       "lora": {"max_slots": 1, "max_rank": 8, "queue": True}})
    out["queue_before"] = [t.name for t in queued.queue]
    queued.save_checkpoint()  # (iteration 0: b queued)
    queued.train_iteration()
    out["queue_after"], out["queue_finished"] = sorted(queued.tenants), list(queued.finished)
    queued.close()
    # resuming that checkpoint with b edited in the config: b stays queued as it was, and the log says so
    notes.clear()
    _trainer({**cfg, "tenants": [q, {**b, "lr": 0.02}], "load": str(done_dir),
              "lora": {"max_slots": 1, "max_rank": 8, "queue": True}}).close()
    out["queued_edit_notes"] = [n for n in notes if "not applied" in n]

    # A program building a trainer without validation, fresh, with --save = another run's directory: refused
    # before it writes anything; that run's files and pointer stay as they were.
    before = _tree(a_dir)
    try:
        _trainer(tr.run_config([x], eval_interval=None, save=str(a_dir)), validated=False).close()
        out["foreign"] = None
    except ckpt.CheckpointError as e:
        out["foreign"] = str(e)
    out["foreign_untouched"] = _tree(a_dir) == before

    # keep_last_checkpoints 2 with saves at 2, 4 and 6 and x stopped and re-joined at 5 (x's root: 2, 4, 5, 6):
    # the kept run checkpoints (4 and 6) resume from x's iterations 4 and 6, which must survive pruning.
    keep_dir = d / "keep"
    keep = _trainer(tr.run_config([x], eval_interval=None, save=str(keep_dir), save_interval=2,
                                  keep_last_checkpoints=2, train_iters=6))
    for _ in range(5):
        keep.train_iteration()
    keep.stop_tenant("x")
    keep.add_tenant(keep.run.tenants[0])
    keep.train_iteration()
    keep.close()
    runs = ckpt.complete_iterations(ckpt.run_root(keep_dir))
    out["kept_runs"] = runs
    out["kept_x"] = ckpt.complete_iterations(ckpt.tenant_root(keep_dir, "x"))
    referenced = [ckpt.tenant_root(keep_dir, name) / ckpt.iter_name(info["iteration"]) for it in runs
                  for name, info in ckpt.load_common(ckpt.run_root(keep_dir) / ckpt.iter_name(it))["run"]
                  ["tenants"].items()]  # what resuming each kept run checkpoint reads
    out["kept_runs_resumable"] = len(referenced) == 2 and all(ckpt.verify_checkpoint(p) for p in referenced)

    # Resuming a checkpoint of 2 running tenants (x rank 4, a rank 8) with lora.max_slots 1 and max_rank 4 (the
    # config lists x alone, so validation has nothing to say): named, nothing changed.
    two_dir = d / "two"
    cfg = tr.run_config([x, dict(a, rank=8)], eval_interval=None, save=str(two_dir))
    two = _trainer(cfg)
    two.train_iteration()
    two.save_checkpoint()
    try:
        two.release_tenant("nobody")
    except SlotError as e:
        out["release_unknown"] = str(e)
    two.close()
    before = _tree(two_dir)
    try:
        _trainer({**cfg, "tenants": [x], "load": str(two_dir), "lora": {"max_slots": 1, "max_rank": 4}}).close()
        out["small_pool"] = None
    except ckpt.CheckpointError as e:
        out["small_pool"] = str(e)
    out["small_pool_untouched"] = _tree(two_dir) == before
    out["two_dir"], out["two_cfg"] = str(two_dir), cfg
    # The random base saved and given as --load-base: allowed, and the log says the weights must be the same.
    from megatron_multilora import checkpointing

    two = _trainer({**cfg, "load": str(two_dir), "save": str(d / "two-saved")})
    checkpointing.save_base(two.model, d / "base")
    two.close()
    notes.clear()
    _trainer({**cfg, "load": str(two_dir), "save": str(d / "two-based"), "load_base": str(d / "base")}).close()
    out["base_notes"] = [n for n in notes if "it must be the same weights" in n]
    out["saved_base"] = str(d / "base")

    # A resume with a longer --train-iters: the tenants whose decay follows the run's length are named (not one
    # joining now: its schedule starts with the new length).
    notes.clear()
    joining = tr.tenant(d, "joining", rank=4, seed=12, valid=False)
    _trainer({**cfg, "tenants": [*cfg["tenants"], joining], "lora": {"max_slots": 3, "max_rank": 8},
              "load": str(two_dir), "save": str(d / "longer"), "train_iters": 20}).close()
    out["longer_notes"] = [n for n in notes if "train_iters 8 -> 20" in n]

    # Tenants joining at iteration 3 of 8: one whose decay follows the run's train_iters (8 of its own steps, 5
    # left) is named, and one whose data (8 samples, max_epochs 1: 2 steps) runs out first; one with its own
    # train_iters, one decaying over its own lr_decay_iters, one whose min_lr is its lr (nothing to decay), and
    # one whose lr_decay_iters fits its data, are not (one whose data ends within its warm-up is told so).
    from megatron_multilora.config import tenant_from_dict

    notes.clear()
    run = _trainer(tr.run_config([x], eval_interval=None, lora={"max_slots": 8, "max_rank": 8}))
    for _ in range(3):
        run.train_iteration()
    for name, fields in (("late", {}), ("own", {"train_iters": 4}), ("short", {"lr_decay_iters": 5}),
                         ("flat", {"min_lr": 5.0e-3}), ("epochs", {"count": 8, "max_epochs": 1}),
                         ("fits", {"count": 8, "max_epochs": 1, "lr_decay_iters": 2}),
                         ("warm", {"count": 8, "max_epochs": 1, "lr_warmup_iters": 3})):
        run.add_tenant(tenant_from_dict(tr.tenant(d, name, rank=4, seed=9, valid=False, **fields), "test"))
    out["late_running"] = sorted(run.tenants)
    out["late_notes"] = [n for n in notes if "ending above min_lr" in n]
    run.close()
    # (a program may run a trainer unvalidated, without train_iters: tenants join, nothing to say)
    run = _trainer(tr.run_config([], train_iters=None, eval_interval=None), validated=False)
    run.add_tenant(tenant_from_dict(tr.tenant(d, "free", rank=4, seed=9, valid=False), "test"))
    out["no_train_iters_running"] = sorted(run.tenants)
    run.close()

    # The data directory moved after the checkpoint: the resume reads the tenant's data where the config now
    # lists it (the checkpoint's own paths are gone).
    moved_dir, data_dir = d / "moved", d / "data-old"
    m = tr.tenant(data_dir, "m", rank=4, seed=8)
    cfg = tr.run_config([m], eval_interval=None, save=str(moved_dir))
    run = _trainer(cfg)
    run.train_iteration()
    run.save_checkpoint()
    run.close()
    data_dir.rename(d / "data-new")
    m_new = {**m, **{k: m[k].replace("data-old", "data-new") for k in ("train_data", "valid_data")}}
    run = _trainer({**cfg, "tenants": [m_new], "load": str(moved_dir)})
    run.train_iteration()
    out["moved_steps"], out["moved_data"] = run.tenants["m"].steps, run.tenants["m"].config.train_data
    run.close()
    # ... and so does a tenant that was queued at the checkpoint, when it leaves the queue (it was dropped)
    queue_dir, data_dir = d / "moved-queue", d / "data-q-old"
    first, waiting = tr.tenant(data_dir, "m", rank=4, seed=8, train_iters=2), tr.tenant(data_dir, "w", rank=4, seed=9)
    cfg = tr.run_config([first, waiting], eval_interval=None, save=str(queue_dir),
                        lora={"max_slots": 1, "max_rank": 8, "queue": True})
    run = _trainer(cfg)
    run.train_iteration()
    run.save_checkpoint()
    run.close()
    data_dir.rename(d / "data-q-new")
    moved = [{**t, **{k: t[k].replace("data-q-old", "data-q-new") for k in ("train_data", "valid_data")}}
             for t in (first, waiting)]
    try:  # a pool that no longer holds the queued tenant either: named (it was dropped leaving the queue)
        _trainer({**cfg, "tenants": [], "load": str(queue_dir), "lora": {**cfg["lora"], "max_rank": 2}},
                 validated=False).close()
        out["queued_small_pool"] = None
    except ckpt.CheckpointError as e:
        out["queued_small_pool"] = str(e)
    run = _trainer({**cfg, "tenants": moved, "load": str(queue_dir)})
    for _ in range(2):
        run.train_iteration()
    out["moved_queued"] = {n: t.config.train_data for n, t in run.tenants.items()}
    run.close()

    # A tenant trained in bf16 (fp32 masters in its checkpoint) resumes in an fp32 run: its weights are the
    # masters, bitwise, and it trains on.
    bf_dir = d / "bf16"
    cfg = tr.run_config([x], eval_interval=None, save=str(bf_dir),
                        model={"preset": "tiny-dense", "params_dtype": "bfloat16"})
    bf = _trainer(cfg)
    for _ in range(2):
        bf.train_iteration()
    bf.save_checkpoint()
    masters = {k: v for k, v in bf.optimizer.slot_state(bf.tenants["x"].slot).items() if k.endswith(".master")}
    bf.close()
    fp = _trainer({**cfg, "model": "tiny-dense", "load": str(bf_dir)})
    from megatron_multilora.lora.inject import lora_parameters

    slot = fp.tenants["x"].slot
    weights = {f"{n}.master": p.detach()[slot] for n, p in lora_parameters(fp.model)}
    out["fp32_weights_are_masters"] = bool(masters) and masters.keys() == weights.keys() and all(
        torch.equal(masters[k], weights[k]) for k in masters)
    out["fp32_finer_than_bf16"] = any(bool((w != w.bfloat16().float()).any()) for w in weights.values())
    from megatron_multilora.adapter_checkpoint import read_tenant_checkpoint  # (what export-peft writes)

    _, exported = read_tenant_checkpoint(bf_dir / "tenants" / "x")
    out["export_reads_masters"] = all(t.dtype == torch.float32 for ab in exported.values() for t in ab) and any(
        bool((t != t.bfloat16().float()).any()) for ab in exported.values() for t in ab)
    fp.train_iteration()
    out["fp32_steps"] = fp.tenants["x"].steps
    fp.close()
    # ... and an fp32 run that only evaluates it (scoped, not running) sees the same masters as its weights
    fp = _trainer({**cfg, "model": "tiny-dense", "tenants": [], "load": str(bf_dir), "save": None},
                  validated=False)
    fp.release_tenant("x", finished=False)  # (resumed with the run; scope it from its checkpoint instead)
    with fp.scoped("x") as scope:
        scoped = {f"{n}.master": p.detach()[scope.slot].clone() for n, p in lora_parameters(fp.model)}
    out["scoped_weights_are_masters"] = masters.keys() == scoped.keys() and all(
        torch.equal(masters[k], scoped[k]) for k in masters)
    fp.close()

    # Its tenant checkpoint (copied to a directory of tenant checkpoints only, which a run does not validate as a
    # run checkpoint) under another tokenizer: refused, its data would get other token ids.
    from tokenizers import Tokenizer, models

    other = d / "other-tokenizer.json"
    Tokenizer(models.WordLevel({"</s>": 0, "a": 1}, unk_token="a")).save(str(other))
    shutil.copytree(bf_dir / "tenants", d / "tenants-only" / "tenants")
    try:
        _trainer({**cfg, "model": "tiny-dense", "tokenizer": str(other), "load": str(d / "tenants-only"),
                  "save": None}).close()
        out["other_tokenizer"] = None
    except ckpt.CheckpointError as e:
        out["other_tokenizer"] = str(e)
    # A checkpoint of a version that did not record its tokenizer, resumed with one: said (that version took
    # the byte-level tokenizer unless given another, and a --load-base's is the default now).
    old_dir = d / "old-version"
    old_cfg = tr.run_config([x], eval_interval=None, save=str(old_dir))
    run = _trainer(old_cfg)
    run._tokenizer_identity = None  # (what such a version wrote: nothing)
    run.train_iteration()
    run.save_checkpoint()
    run.close()
    notes.clear()
    _trainer({**old_cfg, "load": str(old_dir), "tokenizer": str(other)}).close()
    out["unrecorded_tokenizer_notes"] = [n for n in notes if "does not record its tokenizer" in n]
    return out


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    return run_world(_lineage_world, 1, str(tmp_path_factory.mktemp("lineage")))[0]


def test_a_tenant_rejoins_from_its_most_recent_checkpoint(lineage):
    assert lineage["rejoined_steps"] == 5  # 2 in A, then 3 more in this run (A's checkpoint had 2)
    assert lineage["rejoined_from"] == "B/tenants/x/iter_0000005"
    assert lineage["newer_run_steps"] == 3  # from the newer run's iter_1, not the older run's iter_2 (2 steps)
    assert lineage["stale_pointer_steps"] == 3
    assert lineage["copied_steps"] == 2  # the copied directory's trained checkpoint, not its (newer-file) import
    assert lineage["stop_after_save_kept"] and lineage["fresh_restop_saved"]
    assert lineage["stop_later_saved"] == ["iter_0000001", "iter_0000002"]


def test_a_tenant_checkpoint_on_another_base_is_named(lineage):
    assert lineage["base_notes_seed7"] == [] and lineage["base_steps_seed7"] == 3
    assert lineage["base_steps_seed99"] == 3 and len(lineage["base_notes_seed99"]) == 1
    assert "records another base than this run's (seed 7 -> 99)" in lineage["base_notes_seed99"][0]


def test_a_tenant_whose_checkpoint_is_complete_is_not_trained_again(lineage):
    assert lineage["died_finished"] == ["b"]
    assert lineage["relaunch_running"] == ["a"] and lineage["relaunch_finished"] == ["b"]
    assert lineage["b_untouched"], "the finished tenant's checkpoints changed"
    assert lineage["queue_before"] == ["b"]
    assert lineage["queue_after"] == [] and lineage["queue_finished"] == ["q", "b"]
    edits = lineage["queued_edit_notes"]
    assert len(edits) == 1 and "tenant 'b'" in edits[0] and "lr 0.005 -> 0.02" in edits[0], edits


def test_a_program_cannot_write_a_new_run_over_another_runs_checkpoints(lineage):
    assert lineage["foreign"] is not None and "another run's checkpoint" in lineage["foreign"]
    assert lineage["foreign_untouched"]


def test_pruning_keeps_the_tenant_checkpoints_kept_run_checkpoints_resume_from(lineage):
    assert lineage["kept_runs"] == [4, 6]
    assert {4, 6} <= set(lineage["kept_x"]) and 2 not in lineage["kept_x"]
    assert lineage["kept_runs_resumable"]


def test_a_pool_too_small_for_the_checkpoint_is_named(lineage):
    msg = lineage["small_pool"]
    assert msg is not None and "lora.max_slots is 1" in msg and "'a' has rank 8 > lora.max_rank 4" in msg
    assert lineage["small_pool_untouched"]
    assert "queued tenant 'w' has rank 4 > lora.max_rank 2" in lineage["queued_small_pool"]


def test_a_longer_train_iters_on_resume_names_the_schedules_it_moves(lineage):
    assert len(lineage["longer_notes"]) == 1 and "['a', 'x']" in lineage["longer_notes"][0]


def test_a_tenant_joining_too_late_or_with_too_little_data_for_its_decay_is_named(lineage):
    assert lineage["late_running"] == ["epochs", "fits", "flat", "late", "own", "short", "warm", "x"]
    assert lineage["no_train_iters_running"] == ["free"]
    assert lineage["late_notes"] == [
        "tenant late: its learning rate decays over the run's train_iters (8) of its own steps; at iteration 3 "
        "with 0 done it can take 5 more, ending above min_lr (set its train_iters or lr_decay_iters to fit)",
        "tenant epochs: its learning rate decays over 8 of its own steps; with 0 done its data (max_epochs 1) "
        "lasts 2 more, ending above min_lr (set its lr_decay_iters to 2 to fit)",
        "tenant warm: its learning rate decays over 8 of its own steps; with 0 done its data (max_epochs 1) "
        "lasts 2 more, ending above min_lr (it ends within its lr_warmup_iters 3: lower them or raise max_epochs)"]


def test_releasing_a_tenant_without_a_slot_is_named(lineage):
    assert lineage["release_unknown"] == "tenant 'nobody' holds no slot: it is not running"


def test_a_resume_reads_tenant_data_where_the_config_now_lists_it(lineage):
    assert lineage["moved_steps"] == 2 and "/data-new/" in lineage["moved_data"]
    assert list(lineage["moved_queued"]) == ["w"] and "/data-q-new/" in lineage["moved_queued"]["w"]


def test_a_tenant_trained_in_bf16_resumes_in_fp32_and_exports_from_its_masters(lineage):
    assert lineage["fp32_weights_are_masters"] and lineage["fp32_finer_than_bf16"]
    assert lineage["scoped_weights_are_masters"]
    assert lineage["export_reads_masters"]  # (export-peft writes the fp32 masters, not their bf16 copy)
    assert lineage["fp32_steps"] == 3


def test_a_tenant_checkpoint_under_another_tokenizer_is_refused(lineage):
    assert lineage["other_tokenizer"] is not None and "tenant 'x': its checkpoint" in lineage["other_tokenizer"]
    assert "was trained with the tokenizer byte; this run tokenizes with" in lineage["other_tokenizer"]
    notes = lineage["unrecorded_tokenizer_notes"]
    assert len(notes) == 1 and "other-tokenizer.json: if it trained with the byte-level one" in notes[0], notes


def test_a_resume_on_another_base_is_refused_before_any_model_is_built(lineage, tmp_path):
    """The run checkpoint does not hold the frozen base: a resume on another one would train the tenants on
    against other weights with no error anywhere. A random base (seed 7, TP1 PP1 EP1 here) is another one with
    another seed or model-parallel layout; a saved base must be given again; the model must be the same. A bf16
    -> fp32 change, more data-parallel ranks, or the random base saved and given as --load-base keep it."""
    from megatron_multilora import tenant_checkpoint as ckpt
    from megatron_multilora.config import ConfigError, base_identity, load_run_config, validate

    cfg = {**lineage["two_cfg"], "load": lineage["two_dir"], "save": str(tmp_path / "next")}
    manifest = ckpt.run_root(lineage["two_dir"]) / ckpt.iter_name(1) / ckpt.MANIFEST
    assert json.loads(manifest.read_text())["meta"]["base"] == base_identity(load_run_config(cfg))

    def problems(world: int = 1, **changes) -> str:
        try:
            validate(load_run_config({**cfg, **changes}), world)
        except ConfigError as e:
            return str(e)
        return ""

    assert problems() == "" and problems(model={"preset": "tiny-dense", "params_dtype": "bfloat16"}) == ""
    # another tokenizer turns every tenant's text into other token ids
    from tokenizers import Tokenizer, models

    other = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(str(other))
    assert (f"was trained with the tokenizer byte; this run tokenizes with {other}" in problems(tokenizer=str(other)))
    assert problems(2) == ""  # DP=2
    drawn = "was trained on a random base drawn with seed 7 at TP1 PP1 EP1"
    assert drawn in problems(seed=8) and "(seed 8, TP1 PP1 EP1)" in problems(seed=8)
    assert drawn in problems(2, pipeline_model_parallel_size=2)
    assert "another model: hidden_size 64 -> 128" in problems(model={"preset": "tiny-dense", "hidden_size": 128})
    assert problems(load_base=lineage["saved_base"]) == ""  # the random base, saved (a note says so at resume)
    assert "trained on a random base; this run loads the base in" in lineage["base_notes"][0]

    # a run trained on a saved base (its identity written as save_checkpoint writes it), resumed without it
    based = tmp_path / "based"
    (based / ckpt.RUN_DIR / ckpt.iter_name(3)).mkdir(parents=True)
    ckpt.write_tracker(based, 3)
    identity = base_identity(load_run_config({**cfg, "load_base": "/bases/tiny"}))
    (based / ckpt.RUN_DIR / ckpt.iter_name(3) / ckpt.MANIFEST).write_text(
        json.dumps({"format": ckpt.FORMAT, "meta": {"base": identity}, "files": {}}))
    assert "the base in /bases/tiny; this run would build a random one" in problems(load=str(based))


def test_garbled_trackers_and_manifests_are_named(tmp_path):
    from megatron_multilora import tenant_checkpoint as ckpt

    tracker = tmp_path / ckpt.TRACKER
    for raw in ("²\n".encode(), b"\xff\xfe12\n", b"-3\n"):
        tracker.write_bytes(raw)
        with pytest.raises(ckpt.CheckpointError, match="does not hold an iteration number"):
            ckpt.read_tracker(tmp_path)
    for files in ({"a.distcp": {"sha256": "00"}}, {"a.distcp": "12"}):
        (tmp_path / ckpt.MANIFEST).write_text(json.dumps({"format": ckpt.FORMAT, "meta": {}, "files": files}))
        with pytest.raises(ckpt.CheckpointError, match="manifest .* is corrupt"):
            ckpt.verify_checkpoint(tmp_path)
    (tmp_path / ckpt.MANIFEST).write_bytes(b"\xff{")
    with pytest.raises(ckpt.CheckpointError, match="is corrupt"):
        ckpt.read_manifest(tmp_path)


def test_pruning_and_a_promote_cut_short_lose_no_complete_checkpoint(tmp_path):
    """A process that died inside promote() (the old checkpoint moved aside, the new one not yet in place) leaves
    the only complete copy as .old.iter_X.<pid>: it is put back, not deleted with the other leftovers. A
    checkpoint being pruned is moved out of sight first, so one half deleted is never counted as complete."""
    from megatron_multilora import tenant_checkpoint as ckpt

    def checkpoint(name: str) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text("{}")
        return tmp_path / name

    checkpoint(".old.iter_0000002.4242")
    (tmp_path / ".tmp.iter_0000002").mkdir()  # the successor that never took its place
    checkpoint(".deleting.iter_0000001")  # a prune cut short earlier
    checkpoint(".old.iter_0000003.4242")
    checkpoint("iter_0000003")  # promote() finished: the old copy is only a leftover
    assert ckpt.complete_iterations(tmp_path) == [3]
    ckpt.recover(tmp_path)
    assert ckpt.complete_iterations(tmp_path) == [2, 3]
    ckpt.prune(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000003"]
    ckpt.write_tracker(tmp_path, 3)
    checkpoint("iter_0000004")
    assert ckpt.prune(tmp_path, keep=1) == [] and ckpt.complete_iterations(tmp_path) == [3, 4]  # the tracker's
    # a prune whose delete stops half way (here: every file but the manifest goes) leaves nothing that counts
    real_rmtree = ckpt.shutil.rmtree

    def half_rmtree(path, ignore_errors=False):
        for f in Path(path).glob("*"):
            if f.name != "manifest.json":
                f.unlink()

    ckpt.write_tracker(tmp_path, 4)
    (tmp_path / "iter_0000003" / "shard.distcp").write_text("x")
    ckpt.shutil.rmtree = half_rmtree
    try:
        ckpt.prune(tmp_path, keep=1)
    finally:
        ckpt.shutil.rmtree = real_rmtree
    assert ckpt.complete_iterations(tmp_path) == [4]
