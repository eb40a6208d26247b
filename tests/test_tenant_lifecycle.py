"""Tenants join and leave a running job through the control directory, without a restart.

Two ranks at TP=2 (rank 0 reads the directory and broadcasts the decision), tiny-dense, 3 slots, 8 iterations:

    iteration:     1    2    3    4  | 5    6  | 7    8
    a (2 iters)    0    0 -> finished: evaluated, saved, released
    b              1    1    1    1    1    1    1    1
    c  (joins)          2    2    2  | stopped | 2    2      c.yaml written after iteration 1; c.stop after 4,
                                                            removed after 6: resumes from its checkpoint
    d  (joins)          queued  0    0    0    0 -> finished (its max_epochs)

The baseline runs a, b, c, d from the config (d queued the same way) with no events. b and a and d must log
exactly the baseline's metrics (bitwise), and c its own first 5 steps exactly: joining, waiting, stopping,
resuming and other tenants' comings and goings change nothing for anyone else.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from tests import tenant_runs as tr
from tests.distributed import run_world

ITERATIONS = 8


def _tenants(d: Path) -> dict:
    return {
        "a": tr.tenant(d, "a", rank=4, seed=1, train_iters=2),
        "b": tr.tenant(d, "b", rank=8, seed=2),
        "c": tr.tenant(d, "c", rank=2, seed=3, valid=False, lr_decay_style="linear", lr_decay_iters=20),
        "d": tr.tenant(d, "d", rank=4, seed=4, count=16, max_epochs=1),
    }


def _config(d: Path, names, **fields) -> dict:
    t = _tenants(d)
    return tr.run_config([t[n] for n in names], lora={"max_slots": 3, "max_rank": 8}, train_iters=ITERATIONS,
                         eval_interval=None, tensor_model_parallel_size=2, **fields)


def _slot_rows(trainer, slot):
    return [p.detach()[slot].clone() for p in trainer.params]


def _baseline(cfg):
    from megatron_multilora.config import load_run_config, validate
    from megatron_multilora.training import MultiLoRATrainer

    trainer = MultiLoRATrainer(validate(load_run_config(cfg), 2))
    while trainer.iteration < ITERATIONS and trainer.train_iteration():
        pass
    trainer.close()


def _with_events(cfg, control: str, tenants: dict):
    import torch
    import torch.distributed as dist

    from megatron_multilora.config import load_run_config, validate
    from megatron_multilora.training import MultiLoRATrainer

    control = Path(control)
    trainer = MultiLoRATrainer(validate(load_run_config(cfg), 2))
    rank0 = dist.get_rank() == 0
    seen = {}

    def write(name, data):  # atomically, as the docs ask
        tmp = control / f"{name}.tmp"
        tr.write_yaml(tmp, data)
        os.replace(tmp, control / f"{name}.yaml")

    while trainer.iteration < ITERATIONS:
        it = trainer.iteration  # the boundary after iteration `it`
        if it == 1:
            if rank0:
                write("c", tenants["c"])
                write("d", tenants["d"])
                write("evil", {**tenants["b"], "name": "../escape"})
                write("b-edited", {**tenants["b"], "lr": 0.5})  # b is running: named, not applied
                write("huge", {**tenants["b"], "name": "huge", "rank": 64})
            decision = trainer.poll_tenants_dir()
            seen["after_join"] = ({n: t.slot for n, t in trainer.tenants.items()}, [q.name for q in trainer.queue])
            seen["notes"] = decision["notes"]
        if it == 4:
            if rank0:
                (control / "c.stop").write_text("")
            b, d = trainer.tenants["b"].slot, trainer.tenants["d"].slot
            before = (_slot_rows(trainer, b), _slot_rows(trainer, d))
            trainer.poll_tenants_dir()
            after = (_slot_rows(trainer, b), _slot_rows(trainer, d))
            seen["others_untouched"] = all(torch.equal(x, y) for xs, ys in zip(before, after) for x, y in zip(xs, ys))
            seen["freed_slot_zero"] = all(bool((row == 0).all()) for row in _slot_rows(trainer, 2))
            seen["freed_optimizer"] = (trainer.optimizer.slot_step_count(2), trainer.optimizer.slot_hparams(2))
            seen["after_stop"] = sorted(trainer.tenants)
        if it == 5:
            with trainer.scoped("a") as scope:  # a finished at 2: loaded from its checkpoint into the free slot
                seen["scoped_a"] = (scope.slot, scope.evaluate())
            seen["after_scope_zero"] = all(bool((row == 0).all()) for row in _slot_rows(trainer, 2))
        if it == 6 and rank0:
            (control / "c.stop").unlink()
        if not trainer.train_iteration():
            break
    seen["finished"] = list(trainer.finished)
    seen["rank"] = dist.get_rank()
    trainer.close()
    return seen


def _own_steps(rows, name):
    return [{k: r[k] for k in ("lm loss", "learning-rate", "grad-norm", "tokens")}
            for r in rows if r.get("tenant") == name and "lm loss" in r]


def test_tenants_join_wait_finish_stop_and_resume_without_disturbing_others(tmp_path):
    control = tmp_path / "control"
    control.mkdir()
    tenants = _tenants(tmp_path)
    base_cfg = _config(tmp_path, "abcd", metrics_file=str(tmp_path / "base.jsonl"))
    run_world(_baseline, 2, base_cfg)
    cfg = _config(tmp_path, "ab", tenants_dir=str(control), save=str(tmp_path / "save"), save_interval=3,
                  metrics_file=str(tmp_path / "events.jsonl"))
    seen = run_world(_with_events, 2, cfg, str(control), tenants)
    s0 = seen[0]
    assert all(s["others_untouched"] for s in seen)

    base = tr.read_metrics(tmp_path / "base.jsonl")
    events = tr.read_metrics(tmp_path / "events.jsonl")
    first = {n: min(r["iteration"] for r in events if r.get("tenant") == n and "lm loss" in r) for n in "abcd"}

    # c's YAML appeared after iteration 1: c trains from iteration 2; d waits (3 slots taken) ...
    assert s0["after_join"] == ({"a": 0, "b": 1, "c": 2}, ["d"])
    assert first["c"] == 2
    # ... until a finished at its train_iters (2): evaluated, saved, released; d takes slot 0 at iteration 3
    assert first["d"] == 3
    assert any(r.get("tenant") == "a" and r["iteration"] == 2 and "lm loss validation" in r for r in events)
    assert (tmp_path / "save" / "tenants" / "a" / "iter_0000002" / "manifest.json").is_file()
    # a name that would escape the save directory is refused, the job goes on
    assert any("escape" in n and "refused" in n for n in s0["notes"]), s0["notes"]
    assert not (tmp_path / "escape").exists()
    assert any("b-edited.yaml: tenant 'b' is already running with other settings; this file is not applied" in n
               for n in s0["notes"]), s0["notes"]
    assert any("huge.yaml refused: " in n and "huge.yaml: tenant.rank 64 exceeds lora.max_rank 8" in n
               for n in s0["notes"]), s0["notes"]

    # c.stop after iteration 4: c saved and released; only its slot was reset, optimizer state cleared
    assert s0["after_stop"] == ["b", "d"]
    assert s0["freed_slot_zero"] and s0["freed_optimizer"] == (0, None)
    c_dir = tmp_path / "save" / "tenants" / "c"
    assert "iter_0000004" in os.listdir(c_dir)  # saved when stopped (also at the periodic save of 3)
    assert not (c_dir / "iter_0000006").exists()  # not running at the periodic save of iteration 6
    assert not any(r.get("tenant") == "c" and r["iteration"] in (5, 6) for r in events)
    # a (finished) scoped for evaluation from its checkpoint in another slot: its final validation loss
    final_a = next(r["lm loss validation"] for r in events if r.get("tenant") == "a" and "lm loss validation" in r)
    assert s0["scoped_a"] == (2, final_a)
    assert s0["after_scope_zero"]

    # the other tenants' metrics are exactly those of the run without events
    got, want = tr.per_tenant(events), tr.per_tenant(base)
    for key in want:
        if key[1] in "abd":
            assert got[key] == want[key], (key, got[key], want[key])
    assert sorted(k for k in got if k[1] in "abd") == sorted(k for k in want if k[1] in "abd")
    assert s0["finished"] == ["a", "d"]  # d finished its one epoch (16 samples, 4 per step) at iteration 6
    # c resumed (stopped after its 3rd step, back at iteration 7) exactly where it was: its first 5 steps
    # are the baseline's first 5 steps (weights, Adam moments, step count / LR and data position restored)
    assert [r["iteration"] for r in events if r.get("tenant") == "c" and "lm loss" in r] == [2, 3, 4, 7, 8]
    assert _own_steps(events, "c") == _own_steps(base, "c")[:5]


def _idle_job(cfg, control: str, late: dict):
    """An idle job waits for a tenant file (written by rank 0 after it started waiting), trains it to its own
    train_iters, then waits again and ends. Without a wait it ends at once."""
    import threading
    import time

    import torch.distributed as dist

    from megatron_multilora.config import load_run_config, validate
    from megatron_multilora.training import MultiLoRATrainer

    out = {}
    trainer = MultiLoRATrainer(validate(load_run_config({**cfg, "tenants_dir_idle_wait": 0}), 2))
    out["no_wait"] = (trainer.train_iteration(), trainer.iteration)
    trainer.close()

    trainer = MultiLoRATrainer(validate(load_run_config(cfg), 2))
    notes = []
    note = trainer.metrics.note
    trainer.metrics.note = lambda line: (notes.append(line), note(line))
    if dist.get_rank() == 0:
        def join_later():
            time.sleep(1.5)
            tr.write_yaml(Path(control) / "late.tmp", late)
            os.replace(Path(control) / "late.tmp", Path(control) / "late.yaml")

        threading.Thread(target=join_later, daemon=True).start()
    trainer.train()
    out.update(iteration=trainer.iteration, finished=list(trainer.finished),
               waits=sum("waiting up to" in n for n in notes), joined=[n for n in notes if "joined" in n])
    trainer.close()
    return out


def test_an_idle_job_waits_for_tenants_to_join(tmp_path):
    control = tmp_path / "control"
    control.mkdir()
    late = tr.tenant(tmp_path, "late", rank=4, seed=5, train_iters=2)
    cfg = tr.run_config([], lora={"max_slots": 2, "max_rank": 8}, train_iters=50, eval_interval=None,
                        tensor_model_parallel_size=2, tenants_dir=str(control), tenants_dir_idle_wait=4.0)
    for out in run_world(_idle_job, 2, cfg, str(control), late, timeout=300):
        assert out["no_wait"] == (False, 0)
        assert out["joined"] == ["tenant late: joined at iteration 0, slot 0"]
        assert out["iteration"] == 2 and out["finished"] == ["late"]
        assert out["waits"] == 2  # before it joined, and after it finished


def test_sigterm_with_the_exit_signal_handler_ends_an_idle_wait(tmp_path):
    """An idle job (no tenant to train) waiting for one to join leaves at once on --exit-signal-handler's signal,
    not after its whole wait."""
    import signal

    control = tmp_path / "control"
    control.mkdir()
    config = tr.write_yaml(tmp_path / "run.yaml", tr.run_config(
        [], train_iters=50, eval_interval=None, tenants_dir=str(control), tenants_dir_idle_wait=600.0))
    once_waiting = tr.signal_when(lambda out: "waiting up to 600 s" in out, signal.SIGTERM)
    code, out = tr.run_cli(config, "--exit-signal-handler", while_running=once_waiting, timeout=60)
    assert code == 0 and "stopped waiting: SIGTERM received" in out, out[-3000:]


def test_a_job_with_nothing_to_train_says_why_it_ends(tmp_path):
    """An empty control directory and no idle wait: the job ends at once and says so (it used to say only
    "done"), and leaves --save empty: it wrote a run checkpoint of iteration 0, and the same command, run again once
    tenants were there, was told to resume that."""
    control, save = tmp_path / "control", tmp_path / "save"
    control.mkdir()
    config = tr.write_yaml(tmp_path / "run.yaml", tr.run_config([], eval_interval=None, tenants_dir=str(control),
                                                                save=str(save)))
    code, out = tr.run_cli(config, timeout=60)
    assert code == 0 and "no tenant running or queued at iteration 0: ending" in out, out[-3000:]
    assert f"nothing trained: no run checkpoint written to {save}" in out
    assert not save.exists() or not any(save.iterdir())


def _startup_with_files(cfg: dict) -> dict:
    """A job (then its resume) started with files already in its control directory: what it runs and notes."""
    from megatron_multilora import metrics
    from megatron_multilora.config import load_run_config, validate
    from megatron_multilora.training import MultiLoRATrainer

    notes = []
    metrics.MetricsWriter.note = lambda self, line: notes.append(line)  # (a process of its own)
    # "alien": an adapter of another model's hidden size (96, not 64) waiting under --save for its control file
    import torch

    from megatron_multilora.adapter_checkpoint import write_tenant_checkpoint
    from megatron_multilora.lora.slots import LoRASpec

    write_tenant_checkpoint(cfg["save"], "alien", LoRASpec(rank=4, alpha=4, target_modules=("linear_proj",)),
                            {f"decoder.layers.{i}.self_attention.linear_proj": (torch.zeros(4, 96), torch.zeros(96, 4))
                             for i in range(4)})
    out = {}
    for phase, fields in (("fresh", {}), ("resumed", {"load": cfg["save"]})):
        notes.clear()
        trainer = MultiLoRATrainer(validate(load_run_config({**cfg, **fields}), 1))
        trainer.train_iteration()
        if phase == "fresh":
            trainer.train_iteration()
            trainer.save_checkpoint()
            # c's data moves, and its control file says where: the resume reads it there
            c_file = Path(cfg["tenants_dir"]) / "c.yaml"
            c = yaml.safe_load(c_file.read_text())
            moved = Path(c["train_data"]).with_name("c-moved.jsonl")
            Path(c["train_data"]).rename(moved)
            tr.write_yaml(c_file, {**c, "train_data": str(moved)})
        out[phase] = dict(running=sorted(trainer.tenants), steps={n: t.steps for n, t in trainer.tenants.items()},
                          refused=[n for n in ("alien", "baddata", "broken", "huge", "typo")
                                   if any(n in line and "refused" in line for line in notes)])
        out[phase]["alien"] = any("tenant 'alien' refused: cannot load checkpoint" in n and "Global shape mismatch" in n
                                  for n in notes)
        out["moved_note"] = any("tenant c: data read where its config now lists it" in n for n in notes)
        out[phase]["stopped_note"] = any(n.startswith("tenant s: not started (s.stop in ") for n in notes)
        trainer.close()
    return out


def test_files_in_the_control_directory_at_start_are_read_like_later_ones(tmp_path):
    """A job (re)started with unusable tenant files in its control directory (broken YAML, an unknown key, a rank
    above max_rank, a data file with a bad line, a checkpoint of another model's shapes: torch's CheckpointException
    is no Exception) refuses them with a note and trains the others, as it does with
    files that appear while it runs: they no longer stop the job, nor its restart with --load. A running dir
    tenant whose data moved (its file saying where) resumes from there."""
    control = tmp_path / "control"
    control.mkdir()
    tr.write_yaml(control / "c.yaml", tr.tenant(tmp_path, "c", rank=2, seed=3, valid=False))
    (control / "broken.yaml").write_text("name: broken\nrank: [4\n")
    tr.write_yaml(control / "typo.yaml", {**tr.tenant(tmp_path, "typo", seed=4), "rnak": 4})
    tr.write_yaml(control / "huge.yaml", tr.tenant(tmp_path, "huge", rank=64, seed=5))
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"text": "fine"}\n{"text": oops}\n')
    tr.write_yaml(control / "baddata.yaml", {**tr.tenant(tmp_path, "baddata", seed=6), "train_data": str(bad_data)})
    tr.write_yaml(control / "alien.yaml", {**tr.tenant(tmp_path, "alien", seed=8), "alpha": 4,
                                           "target_modules": ["linear_proj"]})
    (control / "s.stop").write_text("")  # a config tenant stopped before the job starts
    cfg = tr.run_config([tr.tenant(tmp_path, "b", rank=4, seed=2), tr.tenant(tmp_path, "s", rank=4, seed=7)],
                        eval_interval=None, tenants_dir=str(control), save=str(tmp_path / "save"),
                        lora={"max_slots": 3, "max_rank": 8})
    out = run_world(_startup_with_files, 1, cfg)[0]
    refused = ["alien", "baddata", "broken", "huge", "typo"]
    assert out["fresh"] == {"running": ["b", "c"], "steps": {"b": 2, "c": 2}, "refused": refused,
                            "stopped_note": True, "alien": True}
    assert out["resumed"] == {"running": ["b", "c"], "steps": {"b": 3, "c": 3}, "refused": refused,
                              "stopped_note": False, "alien": True}  # (a resume restores the run: s was never in it)
    assert out["moved_note"], "the resume did not say where c's data is read now"
