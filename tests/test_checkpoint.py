"""Per-tenant distributed checkpoints: exact resume after SIGKILL (during training and during a save) and after
leaving early (--exit-interval, SIGTERM with --exit-signal-handler), resharding across TP / PP / EP layouts and
slots, corruption detection, tenant names that would escape, a tenant re-joining with another adapter shape,
bf16 weights' fp32 masters across slot changes and resume."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests import tenant_runs as tr
from tests.distributed import run_world

# ---------------------------------------------------------------------------------------------- exact resume
#
# One process, tiny-dense, 2 slots, 3 tenants: a (LoRA dropout 0.1, so the RNG state matters), b (finishes
# at its own train_iters 5: evaluated, saved, released) and c (queued until b's slot frees). Saves every 2
# iterations. The run killed at iteration 6 or inside the save at iteration 6 resumes from iteration 4 (c
# still queued, b still running) and must log exactly the metrics of the uninterrupted run.


@pytest.fixture(scope="module")
def resume_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    cfg = tr.run_config([
        tr.tenant(d, "a", rank=4, seed=1, dropout=0.1),
        tr.tenant(d, "b", rank=8, seed=2, train_iters=5, lr_decay_style="linear"),
        tr.tenant(d, "c", rank=2, seed=3, lr_decay_style="constant"),
    ], save_interval=2, keep_last_checkpoints=2)
    config = tr.write_yaml(d / "run.yaml", cfg)
    code, out = tr.run_cli(config, "--save", str(d / "base_ckpt"), "--metrics-file", str(d / "base.jsonl"))
    assert code == 0, out
    baseline = tr.read_metrics(d / "base.jsonl")
    return d, config, baseline


def _kill_and_resume(d: Path, config: Path, tag: str, kill_at: str):
    save, m1, m2 = d / f"{tag}_ckpt", d / f"{tag}_1.jsonl", d / f"{tag}_2.jsonl"
    code, out = tr.run_cli(config, "--save", str(save), "--metrics-file", str(m1), kill_at=kill_at)
    assert code == -9, f"expected SIGKILL, got {code}:\n{out[-3000:]}"
    pointer = save / "latest_checkpointed_iteration.txt"
    on_disk = {
        "run": pointer.read_text().strip() if pointer.is_file() else None,
        "tenants": {t.name: sorted(os.listdir(t)) for t in sorted((save / "tenants").iterdir())},
    }
    code, out = tr.run_cli(config, "--save", str(save), "--load", str(save), "--metrics-file", str(m2))
    assert code == 0, out
    return on_disk, tr.read_metrics(m1), tr.read_metrics(m2), out, save


def _assert_same(baseline: list[dict], rows: list[dict], after: int, upto: int | None = None):
    want = {k: v for k, v in tr.per_tenant(baseline, after).items() if upto is None or k[0] <= upto}
    got = tr.per_tenant(rows, after)
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key] == want[key], (key, got[key], want[key])  # bitwise: same floats in the JSON


def test_sigkill_during_training_resumes_exactly(resume_setup):
    d, config, baseline = resume_setup
    on_disk, killed, resumed, out, save = _kill_and_resume(d, config, "iter", "iter:6")
    assert on_disk["run"] == "4"  # the last save before the kill
    _assert_same(baseline, killed, 0, upto=6)  # the killed run was the same run up to its death
    assert min(r["iteration"] for r in resumed if "tenant" in r) == 5
    _assert_same(baseline, resumed, 4)  # everything after the checkpoint, incl. b's finish and c's start
    assert "resumed from" in out and "'c'" in out  # c came back from the queue of the checkpoint
    # keep_last_checkpoints=2: only the last two run checkpoints and tenant checkpoints remain
    assert sorted(os.listdir(save / "run")) == ["iter_0000006", "iter_0000008", "run_id.txt"]
    assert sorted(os.listdir(save / "tenants" / "a")) == ["iter_0000006", "iter_0000008",
                                                          "latest_checkpointed_iteration.txt"]


def test_sigkill_during_save_leaves_no_partial_checkpoint_and_resumes_exactly(resume_setup):
    d, config, baseline = resume_setup
    # killed inside the save at iteration 6, after both tenants' checkpoints (a, and c which joined from the
    # queue at 5) were promoted, with the run state still in its temporary directory: the run's latest pointer
    # stays at 4 while a's and c's point at 6. The resumed run must not use those: a is restored from the run
    # state (iteration 4), and c -- queued at 4 -- must start fresh again at 5, not from "its" iteration 6
    # (written by the same run lineage after the checkpoint it resumes from).
    on_disk, killed, resumed, out, save = _kill_and_resume(d, config, "save", "save:6:run")
    assert on_disk["run"] == "4"
    assert on_disk["tenants"]["c"] == ["iter_0000006", "latest_checkpointed_iteration.txt"]
    assert "iter_0000006" in on_disk["tenants"]["a"]
    _assert_same(baseline, killed, 0, upto=6)
    _assert_same(baseline, resumed, 4)
    assert "tenant c: resumed" not in out
    assert sorted(os.listdir(save / "run")) == ["iter_0000006", "iter_0000008", "run_id.txt"]  # no .tmp leftover
    assert (save / "tenants" / "c" / "latest_checkpointed_iteration.txt").read_text().strip() == "8"


@pytest.mark.parametrize("kill_at", ["save:2:t1", "save:2:pointer"])
def test_sigkill_during_the_first_save_resumes_exactly(resume_setup, kill_at):
    """Killed inside the run's first save -- after tenant a's checkpoint (t1: no run checkpoint at all), or after
    the run checkpoint but before its pointer: the relaunch resumes the complete run checkpoint if there is one,
    else starts the same run again from iteration 0 without a's leftover checkpoint (it used to start a new run
    whose tenant a resumed 2 steps ahead, and to write over the unpointed run/iter_0000002)."""
    d, config, baseline = resume_setup
    on_disk, killed, resumed, out, save = _kill_and_resume(d, config, kill_at.replace(":", "_"), kill_at)
    assert on_disk["run"] is None and "iter_0000002" in on_disk["tenants"]["a"]
    _assert_same(baseline, killed, 0, upto=2)
    if kill_at.endswith("t1"):
        assert "was stopped during its first save; starting it again from iteration 0" in out
        _assert_same(baseline, resumed, 0)
    else:
        assert "resumed from" in out and "run/iter_0000002 at iteration 2" in out
        _assert_same(baseline, resumed, 2)


# ------------------------------------------------------------------------------------------- leaving early
# Megatron-LM's --exit-interval / --exit-duration-in-mins / --exit-signal-handler: the job leaves between
# iterations with a run checkpoint of the last one saved, exit code 0, and --load goes on from there exactly.


def _last_iteration(metrics: Path) -> int:
    return max(r["iteration"] for r in tr.read_metrics(metrics) if "iteration" in r)


def test_exit_interval_leaves_with_a_checkpoint_that_resumes_exactly(resume_setup):
    """Leaving at iteration 4 (a periodic save: not saved twice; no evaluation there: none is added)."""
    d, config, baseline = resume_setup
    save, m1, m2 = d / "exit_ckpt", d / "exit_1.jsonl", d / "exit_2.jsonl"
    code, out = tr.run_cli(config, "--save", str(save), "--metrics-file", str(m1), "--exit-interval", "4")
    assert code == 0, out
    assert f"leaving at iteration 4: --exit-interval 4; --load {save} resumes here" in out
    assert out.count("saved checkpoint at iteration 4") == 1 and "left early. TensorBoard logs" in out
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert _last_iteration(m1) == 4
    _assert_same(baseline, tr.read_metrics(m1), 0, upto=4)  # (the baseline evaluates at 3, 6 and its end, 8)
    code, out = tr.run_cli(config, "--save", str(save), "--load", str(save), "--metrics-file", str(m2))
    assert code == 0, out
    _assert_same(baseline, tr.read_metrics(m2), 4)


@pytest.mark.parametrize("handler", [True, False], ids=["exit-signal-handler", "no-handler"])
def test_sigterm_with_the_exit_signal_handler_saves_the_iteration_and_leaves(resume_setup, handler):
    """SIGTERM (a scheduler's preemption notice) sent to the job's process group mid-run: with
    --exit-signal-handler the iteration under way ends, is saved (megatron-core's checkpoint-writer helper, in
    the same group, survives the signal), the job leaves with 0 and --load goes on from it; without, the signal
    kills the job."""
    import re
    import signal

    d, config, _ = resume_setup
    save, metrics = d / f"signal_{handler}_ckpt", d / f"signal_{handler}.jsonl"
    # (signalled after the save at iteration 2, which started the checkpoint writer's helper process)
    flags = ["--save", str(save), "--metrics-file", str(metrics), "--train-iters", "2000", "--save-interval", "2"]
    once_running = tr.signal_when(lambda out: "iteration 3/2000" in out, signal.SIGTERM)
    code, out = tr.run_cli(config, *flags, *(["--exit-signal-handler"] if handler else []),
                           while_running=once_running)
    if not handler:
        assert code == -signal.SIGTERM, out[-3000:]
        return
    assert code == 0, out[-3000:]
    left = re.search(r"leaving at iteration (\d+): SIGTERM received", out)
    assert left, out[-3000:]
    iteration = int(left.group(1))
    assert 3 <= iteration < 1000 and _last_iteration(metrics) == iteration
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(iteration)
    code, out = tr.run_cli(config, *flags, "--load", str(save), "--exit-interval", str(iteration + 1))
    assert code == 0, out[-3000:]
    assert f"at iteration {iteration}" in out and f"leaving at iteration {iteration + 1}: --exit-interval" in out


def _exit_agreement() -> dict:
    """Each rank's answers of EarlyExit when only rank 1 receives the signal, and only rank 0's clock has run
    past the duration."""
    import signal
    import time
    import types

    import torch.distributed as dist

    from megatron_multilora.early_exit import EarlyExit

    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), {}
    run = types.SimpleNamespace(exit_interval=4, exit_duration_in_mins=None, exit_signal_handler=True,
                                exit_signal="SIGUSR1", save=None)
    with EarlyExit(run, time.monotonic()) as early:
        out["quiet"], out["interval"] = early.reason(3), early.reason(8)
        if rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        out["signal"] = early.reason(5)
    out["handler restored"] = signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    timed = types.SimpleNamespace(exit_interval=None, exit_duration_in_mins=1.0, exit_signal_handler=False,
                                  exit_signal="SIGTERM", save=None)
    out["late"] = EarlyExit(timed, time.monotonic() - (120 if rank == 0 else 0)).reason(5)
    dist.destroy_process_group()
    return out


def test_one_ranks_signal_or_clock_ends_every_ranks_run_at_the_same_iteration():
    for out in run_world(_exit_agreement, 2, timeout=120):
        assert out == {"quiet": None, "interval": "--exit-interval 4", "signal": "SIGUSR1 received",
                       "handler restored": True,
                       "late": "more than --exit-duration-in-mins 1 since the trainer started"}


def test_partial_tenant_save_is_never_promoted(resume_setup):
    d, config, _ = resume_setup
    # killed while tenant 1 (c) of the save at iteration 6 is in its temporary directory: a is complete at 6,
    # c has no checkpoint and no pointer at all, the run's pointer stays at 4
    save = d / "partial_ckpt"
    code, out = tr.run_cli(config, "--save", str(save), "--metrics-file", str(d / "partial.jsonl"),
                           kill_at="save:6:t1")
    assert code == -9, out[-3000:]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert sorted(os.listdir(save / "tenants" / "c")) == [".tmp.iter_0000006"]
    assert (save / "tenants" / "a" / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert json.loads((save / "tenants" / "a" / "iter_0000006" / "manifest.json").read_text())["meta"]["iteration"] == 6


# ---------------------------------------------------------------------------------------------- resharding
#
# tiny-moe with LoRA on the dense and the expert linears. World 1: TP=2 x EP=2 (sequence parallel, expert
# TP 2; 4 ranks) trains 3 iterations, evaluates, saves, trains 2 more. World 2: TP=1 x PP=2 x EP=1 (2 ranks)
# resumes the run from that checkpoint: same validation loss, same next two training losses (optimizer moments,
# step counts and data positions crossed the layout change); it saves again. World 3: back to TP=2 (sequence
# parallel, PP=1; 2 ranks), a fresh run whose tenants find their checkpoints (saved at TP=1 x PP=2) and land
# in other slots: same losses again.

MOE_TENANTS = [
    dict(name="a", rank=4, seed=11),
    dict(name="b", rank=8, seed=12, target_modules=["linear_qkv", "linear_fc1", "expert_fc1", "expert_fc2"]),
]


def _moe_config(d: Path, layout: dict, **fields) -> dict:
    tenants = [tr.tenant(d, **t) for t in MOE_TENANTS]
    cfg = tr.run_config(tenants, model="tiny-moe", lora={"max_slots": 3, "max_rank": 8}, eval_iters=2,
                        eval_interval=None, train_iters=10, **layout)
    cfg.update(fields)
    return cfg


def _reshard_world(cfg: dict, world: int, phase: str, base_dir: str, save: str):
    import torch.distributed as dist

    from megatron_multilora import checkpointing
    from megatron_multilora.config import load_run_config, validate
    from megatron_multilora.training import MultiLoRATrainer

    run = validate(load_run_config(cfg), world)
    trainer = MultiLoRATrainer(run)
    out = {}
    if phase == "save":
        checkpointing.save_base(trainer.model, base_dir)
        for _ in range(3):
            trainer.train_step()
        out["valid"] = trainer.evaluate()
        trainer.save_checkpoint()
    else:
        out["valid"] = trainer.evaluate()
        if phase == "resume":
            trainer.save_checkpoint()
    out["slots"] = {n: t.slot for n, t in trainer.tenants.items()}
    out["steps"] = {n: trainer.optimizer.slot_step_count(t.slot) for n, t in trainer.tenants.items()}
    out["train"] = [{n: m["lm loss"] for n, m in trainer.train_step()["per_tenant"].items()} for _ in range(2)]
    out["rank"] = dist.get_rank()
    return out


def _last_rank(results):
    return max(results, key=lambda r: r["rank"])  # the last pipeline stage holds the losses


def _close(x: dict, y: dict, tol=5e-6):
    """Across layouts only the order of float32 reductions differs (measured: <= 7e-7 on losses ~7)."""
    assert set(x) == set(y)
    for k in x:
        assert abs(x[k] - y[k]) <= tol, (k, x[k], y[k])


def _read_adapters(directories: list[str]):
    from megatron_multilora.adapter_checkpoint import read_tenant_checkpoint

    return [read_tenant_checkpoint(d)[1] for d in directories]


def test_reshard_tp2_ep2_to_tp1_pp2_and_back_to_tp2_into_other_slots(tmp_path):
    base, s1, s2 = str(tmp_path / "base"), str(tmp_path / "s1"), str(tmp_path / "s2")
    tp2ep2 = dict(tensor_model_parallel_size=2, expert_model_parallel_size=2, sequence_parallel=True)
    w1 = _last_rank(run_world(_reshard_world, 4, _moe_config(tmp_path, tp2ep2, save=s1), 4, "save", base, s1))

    pp2 = dict(pipeline_model_parallel_size=2)
    cfg2 = _moe_config(tmp_path, pp2, load_base=base, load=s1, save=s2)
    w2 = _last_rank(run_world(_reshard_world, 2, cfg2, 2, "resume", base, s2))
    _close(w2["valid"], w1["valid"])
    assert w2["steps"] == w1["steps"] == {"a": 3, "b": 3}
    for got, want in zip(w2["train"], w1["train"]):
        _close(got, want)
    # read outside a run, the adapter is whole whatever layout wrote it: TP2 x EP2 (s1) = TP1 x PP2 (s2, saved
    # right after loading s1), every layer and expert of both pipeline stages and EP ranks, B at full width
    by_tp2_ep2, by_pp2 = run_world(_read_adapters, 1, [f"{s1}/tenants/b", f"{s2}/tenants/b"])[0]
    assert sorted(by_tp2_ep2) == sorted(by_pp2)
    assert len([k for k in by_pp2 if ".local_experts." in k]) == 4 * 4 * 2  # layers x experts x (fc1, fc2)
    assert {k.split(".")[2] for k in by_pp2 if k.endswith("linear_qkv")} == {"0", "1", "2", "3"}
    for k, (a, b) in by_pp2.items():
        assert a.shape[0] == b.shape[-1] == 8, k
        assert torch.equal(a, by_tp2_ep2[k][0]) and torch.equal(b, by_tp2_ep2[k][1]), k

    # a fresh run at TP=2 (a new job: its own --save, holding the tenants' checkpoints copied from s2): tenant z
    # takes slot 0, a and b resume into slots 1 and 2
    s3 = str(tmp_path / "s3")
    shutil.copytree(f"{s2}/tenants", f"{s3}/tenants")
    tp2 = dict(tensor_model_parallel_size=2, sequence_parallel=True)
    cfg3 = _moe_config(tmp_path, tp2, load_base=base, save=s3)
    cfg3["tenants"] = [tr.tenant(tmp_path, "z", rank=2, seed=13)] + cfg3["tenants"]
    w3 = _last_rank(run_world(_reshard_world, 2, cfg3, 2, "fresh", base, s3))
    assert w3["slots"] == {"z": 0, "a": 1, "b": 2}
    _close({k: w3["valid"][k] for k in "ab"}, w1["valid"])
    for got, want in zip(w3["train"], w1["train"]):
        _close({k: got[k] for k in "ab"}, want)


# ---------------------------------------------------------------------------------------------- corruption
# and names


def _load_errors(cfg: dict, directories: list[str]):
    """For each directory: the errors of scoping tenant a from it and of resuming the run from it."""
    from megatron_multilora import tenant_checkpoint as ckpt
    from megatron_multilora.config import load_run_config, validate
    from megatron_multilora.training import MultiLoRATrainer

    trainer = MultiLoRATrainer(validate(load_run_config(cfg), 1))
    errors = []
    for directory in directories:
        trainer.run.load = directory  # where scoped() looks for a's checkpoint
        found = {}
        try:
            with trainer.scoped("a") as scope:
                found["scoped"] = scope.evaluate()
        except ckpt.CheckpointError as e:
            found["scoped"] = str(e)
        try:
            trainer.load_checkpoint(directory)
        except ckpt.CheckpointError as e:
            found["load"] = str(e)
        errors.append(found)
    return errors


def test_corrupt_shard_and_truncated_metadata_are_named(resume_setup, tmp_path):
    from megatron_multilora import tenant_checkpoint as ckpt

    d, _, _ = resume_setup  # its uninterrupted run saved <d>/base_ckpt (run at 8; a and c at iteration 8)
    broken_shard, broken_meta = tmp_path / "shard", tmp_path / "meta"
    for copy in (broken_shard, broken_meta):
        shutil.copytree(d / "base_ckpt", copy)
    shard = sorted((broken_shard / "tenants" / "a" / "iter_0000008").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    shard.write_bytes(bytes(data))
    meta = broken_meta / "tenants" / "a" / "iter_0000008" / "metadata.json"
    meta.write_bytes(meta.read_bytes()[:5])

    cfg = tr.run_config([tr.tenant(tmp_path, "z", seed=2)])
    shard_errors, meta_errors = run_world(_load_errors, 1, cfg, [str(broken_shard), str(broken_meta)])[0]
    for where in ("scoped", "load"):
        assert str(shard.resolve()) in shard_errors[where] and "corrupt" in shard_errors[where], shard_errors
        assert str(meta.resolve()) in meta_errors[where] and "truncated" in meta_errors[where], meta_errors

    (meta.parent / "manifest.json").unlink()  # an unpromoted or foreign directory
    with pytest.raises(ckpt.CheckpointError, match="manifest.json is missing"):
        ckpt.verify_checkpoint(meta.parent)


def test_tenant_names_cannot_escape_the_save_directory(tmp_path):
    from megatron_multilora import tenant_checkpoint as ckpt
    from megatron_multilora.config import ConfigError, validate_tenant, load_run_config

    save = tmp_path / "save"
    for bad in ("../escape", "..", ".", "a/b", "/abs", "x" * 65, ""):
        with pytest.raises(ckpt.CheckpointError):
            ckpt.tenant_root(save, bad)
    (save / "tenants").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (save / "tenants" / "sneaky").symlink_to(outside)  # a name that is fine, a path that is not
    with pytest.raises(ckpt.CheckpointError, match="not inside"):
        ckpt.tenant_root(save, "sneaky")
    assert ckpt.tenant_root(save, "ok-1.b_2") == (save / "tenants" / "ok-1.b_2").resolve()
    # the config refuses the name before any directory is made
    run = load_run_config(tr.run_config([tr.tenant(tmp_path, "a")]))
    bad = load_run_config(tr.run_config([tr.tenant(tmp_path, "a")])).tenants[0]
    bad.name = "../escape"
    with pytest.raises(ConfigError, match="escape"):
        validate_tenant(run, bad)


def _add_edited_tenant(cfg: dict, directory: str, tenant: dict, edits: list[dict]):
    """Add `tenant` (which has a checkpoint under `directory`) with each edit to its config: the error, or None
    and the step it resumed at; the slots and the other tenant's weights must be as before every attempt."""
    from megatron_multilora import tenant_checkpoint as ckpt
    from megatron_multilora.config import load_run_config, tenant_from_dict, validate
    from megatron_multilora.training import MultiLoRATrainer

    trainer = MultiLoRATrainer(validate(load_run_config(cfg), 1))
    trainer.run.load = directory  # where add_tenant finds a's checkpoint (no run checkpoint there)
    before = [p.detach().clone() for p in trainer.params]
    results = []
    for edit in edits:
        free = list(trainer.table.free_slots)
        try:
            trainer.add_tenant(tenant_from_dict({**tenant, **edit}, "test"))
            results.append(("resumed", trainer.tenants[tenant["name"]].steps))
            trainer.release_tenant(tenant["name"], finished=False)
        except ckpt.CheckpointError as e:
            results.append(("error", str(e)))
        assert list(trainer.table.free_slots) == free and "a" not in trainer.tenants
        assert all(bool((p == q).all()) for p, q in zip(trainer.params, before))
    return results


def test_a_tenant_whose_adapter_shape_changed_is_refused_on_resume(resume_setup, tmp_path):
    """A tenant joining with a checkpoint but an edited rank / alpha / rsLoRA / targets would load weights of
    another shape and scale: refused, naming each change, with the slot and other tenants untouched; editing
    only the optimizer settings resumes."""
    d, config, _ = resume_setup
    shutil.copytree(d / "base_ckpt" / "tenants" / "a", tmp_path / "only_a" / "tenants" / "a")
    a = next(t for t in yaml.safe_load(config.read_text())["tenants"] if t["name"] == "a")
    cfg = tr.run_config([tr.tenant(tmp_path, "z", seed=2)])
    results = run_world(_add_edited_tenant, 1, cfg, str(tmp_path / "only_a"), a, [
        {"lr": 1.0e-2, "train_iters": 20},
        {"rank": 8},
        {"alpha": 16.0, "rslora": True},
        {"target_modules": ["linear_qkv", "linear_fc1"]},
    ])[0]
    assert results[0] == ("resumed", 8)
    assert results[1][0] == "error" and "rank 4 -> 8" in results[1][1] and "new name" in results[1][1]
    assert "alpha 4.0 -> 16.0" in results[2][1] and "rslora False -> True" in results[2][1]
    assert "targets" in results[3][1] and "-> ['linear_fc1', 'linear_qkv']" in results[3][1]


# ---------------------------------------------------------------------------------------------- bf16 masters


def _masters(trainer, name):
    state = trainer.optimizer.slot_state(trainer.tenants[name].slot)
    return {k: v for k, v in state.items() if k.endswith(".master")}


def _bf16_world(cfg: dict, phase: str):
    from megatron_multilora.config import load_run_config, validate
    from megatron_multilora.training import MultiLoRATrainer

    trainer = MultiLoRATrainer(validate(load_run_config(cfg), 1))
    out = {}
    try:
        if phase == "train":
            for _ in range(3):
                trainer.train_step()
            before = _masters(trainer, "b")
            # fp32 masters that bf16 cannot hold (else reloading them through bf16 would go unnoticed)
            out["finer_than_bf16"] = any(bool((m != m.bfloat16().float()).any()) for m in before.values())
            trainer.release_tenant("a", finished=False)  # c, queued, takes a's slot: a fresh slot in bf16
            out["c_admitted"] = "c" in trainer.tenants
            out["b_master_kept"] = all(torch.equal(before[k], v) for k, v in _masters(trainer, "b").items())
            trainer.save_checkpoint()
        out["masters"] = _masters(trainer, "b")
        out["next"] = {n: (m["lm loss"], m["grad-norm"]) for n, m in trainer.train_step()["per_tenant"].items()}
    finally:
        trainer.close()
    return out


def test_bf16_masters_survive_slot_changes_and_resume(tmp_path):
    """bf16 weights with fp32 masters (a known bug elsewhere: retiring or loading one slot reloaded every slot's
    masters through bf16): another tenant joining keeps b's masters bitwise, its checkpoint restores them
    bitwise, and the resumed run's next step equals the uninterrupted one."""
    tenants = [tr.tenant(tmp_path, n, rank=4, seed=s) for n, s in (("a", 1), ("b", 2), ("c", 3))]
    cfg = tr.run_config(tenants, model={"preset": "tiny-dense", "params_dtype": "bfloat16"},
                        lora={"max_slots": 2, "max_rank": 8, "queue": True}, save=str(tmp_path / "s"),
                        eval_interval=None)
    trained = run_world(_bf16_world, 1, cfg, "train")[0]
    assert trained["finer_than_bf16"] and trained["c_admitted"] and trained["b_master_kept"]
    resumed = run_world(_bf16_world, 1, {**cfg, "load": str(tmp_path / "s")}, "resume")[0]
    assert trained["masters"].keys() == resumed["masters"].keys() and trained["masters"]
    assert all(torch.equal(v, resumed["masters"][k]) for k, v in trained["masters"].items())
    assert resumed["next"] == trained["next"] and set(trained["next"]) == {"b", "c"}


def _resume_notes(cfg: dict):
    """Resume `cfg`'s run: the console notes it writes, or the checkpoint error that stops it."""
    from megatron_multilora import metrics
    from megatron_multilora import tenant_checkpoint as ckpt
    from megatron_multilora.config import load_run_config, validate
    from megatron_multilora.training import MultiLoRATrainer

    notes = []
    metrics.MetricsWriter.note = lambda self, line: notes.append(line)  # (a process of its own)
    try:
        trainer = MultiLoRATrainer(validate(load_run_config(cfg), 1))
    except ckpt.CheckpointError as e:
        return notes, str(e)
    trainer.train()  # the run is at its train_iters already
    trainer.close()
    return notes, None


def test_resume_names_config_edits_it_does_not_apply(resume_setup, tmp_path):
    """--load resumes each tenant exactly, with the settings (adapter shape included) in its checkpoint: a config
    editing them is told which edits are not applied, and the run goes on."""
    d, config, _ = resume_setup
    shutil.copytree(d / "base_ckpt", tmp_path / "ckpt")
    cfg = {**yaml.safe_load(config.read_text()), "load": str(tmp_path / "ckpt"), "save": str(tmp_path / "ckpt")}
    a = next(i for i, t in enumerate(cfg["tenants"]) if t["name"] == "a")

    notes, error = run_world(_resume_notes, 1, cfg)[0]
    assert error is None and not any("not applied" in n for n in notes), notes  # the same config: nothing to say
    assert any("at iteration 8 already (train_iters 8): nothing to train" in n for n in notes), notes
    cfg["tenants"][a].update(lr=0.02, weight_decay=0.1)
    notes, error = run_world(_resume_notes, 1, cfg)[0]
    edits = [n for n in notes if "not applied" in n]
    assert error is None and len(edits) == 1 and "tenant 'a'" in edits[0], notes
    assert "lr 0.005 -> 0.02" in edits[0] and "weight_decay 0.0 -> 0.1" in edits[0]
    cfg["tenants"][a]["rank"] = 8
    notes, error = run_world(_resume_notes, 1, cfg)[0]
    assert error is None and any("tenant 'a'" in n and "rank 4 -> 8" in n for n in notes), notes
    # b finished (its train_iters 5) before the checkpoint: a longer train_iters is named, not silently ignored
    cfg["tenants"][next(i for i, t in enumerate(cfg["tenants"]) if t["name"] == "b")]["train_iters"] = 10
    notes, error = run_world(_resume_notes, 1, cfg)[0]
    assert error is None and any("tenant 'b': finished before the checkpoint and is not trained again; the "
                                 "config's changes are not applied: train_iters 5 -> 10" in n for n in notes), notes
    # a running tenant the config no longer lists is still resumed (the run restores every tenant): said
    cfg["tenants"] = [t for t in cfg["tenants"] if t["name"] != "a"]
    notes, error = run_world(_resume_notes, 1, cfg)[0]
    assert error is None and any(n.startswith("tenant a: resumed from the checkpoint though neither the config nor "
                                              "a control file lists it now") for n in notes), notes
