"""End-to-end training: isolation between tenants, layout invariance of per-tenant losses on the MoE preset,
optimizer isolation (idle tenant bitwise untouched, non-finite tenant skipped and reported), per-tenant
learning-rate schedules, metrics files, and configuration errors that fail before any process starts."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed import run_world

REPO = Path(__file__).resolve().parent.parent
WORDS = ["cat", "dog", "bird", "fish", "lion", "bear", "wolf", "frog", "duck", "goat", "mule", "crab"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    tasks = {
        "rev": lambda w: {"prompt": f"{w}=", "completion": w[::-1]},
        "up": lambda w: {"prompt": f"{w}=", "completion": w.upper()},
        # a per-sample loss weight (an RL advantage's sign): the layout tests compare weighted gradients too
        "txt": lambda w: {"text": f"the {w} sees the {w}.", "loss_weights": len(w) - 3.5},
        "mute": lambda w: {"input_ids": list(w.encode()), "loss_mask": [0] * (len(w) - 1) + [1]},
    }
    for name, make in tasks.items():
        for split in ("train", "valid"):
            rows = [make(w) for w in WORDS * 2]
            (root / f"{name}.{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def run_config(data, tenants=("rev", "up", "txt"), **overrides):
    specs = {
        "rev": dict(rank=4, alpha=8, lr=0.01, lr_warmup_iters=1, lr_decay_style="cosine", global_batch_size=4),
        "up": dict(rank=8, lr=0.02, lr_decay_style="linear", min_lr=0.001, global_batch_size=6,
                   target_modules=["linear_qkv", "linear_fc2", "expert_fc1"]),
        "txt": dict(rank=16, alpha=32, lr=0.005, lr_decay_style="constant", global_batch_size=2),
        "mute": dict(rank=4, lr=0.01, lr_warmup_iters=0, global_batch_size=2),
    }
    cfg = {
        "model": "tiny-moe",
        "lora": {"max_slots": 4, "max_rank": 16},
        "tenants": [
            dict(name=n, train_data=str(data / f"{n}.train.jsonl"), valid_data=str(data / f"{n}.valid.jsonl"),
                 **specs[n])
            for n in tenants
        ],
        "seq_length": 16, "micro_batch_size": 2, "train_iters": 3, "eval_interval": None, "eval_iters": 1,
        "log_interval": 1, "seed": 7,
    }
    cfg.update(overrides)
    return cfg


def _train(cfg, iters, probe=None):
    """Train `iters` iterations; returns per-iteration {tenant: metrics} (and whatever probe returns)."""
    from megatron_multilora.config import load_run_config
    from megatron_multilora.training import MultiLoRATrainer

    trainer = MultiLoRATrainer(load_run_config(cfg))
    history, probed = [], None
    try:
        if probe is not None:
            probed = probe(trainer, iters)
        else:
            for _ in range(iters):
                history.append(trainer.train_step()["per_tenant"])
    finally:
        trainer.close()
    return {"history": history, "probe": probed}


def _losses(history, tenant):
    return [it[tenant]["lm loss"] for it in history if tenant in it]


def test_a_tenants_losses_do_not_depend_on_other_tenants(data):
    together = run_world(_train, 1, run_config(data), 3)[0]["history"]
    alone = run_world(_train, 1, run_config(data, tenants=("rev",)), 3)[0]["history"]
    a, b = _losses(together, "rev"), _losses(alone, "rev")
    assert len(a) == 3 and a[0] > 0
    assert a == pytest.approx(b, rel=1e-5)
    assert a[-1] < a[0]  # it trains
    # its gradient is normalised by its own tokens only (a shared denominator would change the norm)
    for key in ("grad-norm", "tokens"):
        got, want = [it["rev"][key] for it in together], [it["rev"][key] for it in alone]
        assert got == pytest.approx(want, rel=1e-5) and got[0] > 0, key


def test_one_token_samples_train_each_tenant_as_alone(data):
    """seq_length 1: a token-major micro-batch is [b, 1, h], its samples along dimension 0 (it was read as one
    sample of b tokens: the dense LoRA crashed, the experts' token slots were b^2)."""
    cfg = run_config(data, tenants=("txt",), seq_length=1)
    other = dict(cfg["tenants"][0], name="txt2", rank=4, alpha=4, lr=0.02, target_modules=["expert_fc1"])
    together = run_world(_train, 1, dict(cfg, tenants=[other, *cfg["tenants"]]), 2)[0]["history"]
    alone = run_world(_train, 1, cfg, 2)[0]["history"]
    a, b = _losses(together, "txt"), _losses(alone, "txt")
    assert len(a) == 2 and a[0] > 0 and a == pytest.approx(b, rel=1e-5)


def test_lora_dropout_is_replayed_exactly_by_activation_recompute(data):
    """Recompute re-runs each layer's forward in backward: a tenant's LoRA dropout must draw the same masks
    there (megatron restores the RNG state around it), or its gradient would belong to other masks."""
    def history(dropout, recompute):
        cfg = run_config(data, tenants=("rev", "txt"), recompute_activations=recompute)
        cfg["tenants"][0]["dropout"] = dropout
        return run_world(_train, 1, cfg, 2)[0]["history"]

    plain, recomputed = history(0.3, False), history(0.3, True)
    for tenant in ("rev", "txt"):
        for key in ("lm loss", "grad-norm"):
            got, want = [it[tenant][key] for it in recomputed], [it[tenant][key] for it in plain]
            assert got == pytest.approx(want, rel=1e-6), (tenant, key)
    without = history(0.0, True)  # the masks matter: the comparison above is not vacuous
    assert without[0]["rev"]["grad-norm"] != pytest.approx(plain[0]["rev"]["grad-norm"], rel=1e-3)


LAYOUTS = [
    (dict(tensor_model_parallel_size=2, sequence_parallel=True), 2),
    (dict(expert_model_parallel_size=2), 2),  # DP 2 = EP 2
    (dict(expert_model_parallel_size=2), 4),  # DP 4 over EP 2: expert gradients summed over expert-DP pairs
    (dict(expert_model_parallel_size=2, moe_token_dispatcher_type="alltoall"), 2),
    (dict(pipeline_model_parallel_size=2), 2),
    (dict(), 2),  # DP 2
]


def _save_base(trainer, iters):
    from megatron_multilora import checkpointing

    checkpointing.save_base(trainer.model, trainer.run.save)


@pytest.fixture(scope="module")
def shared_base(data, tmp_path_factory):
    """One set of base weights for every layout (random init differs between layouts, e.g. experts)."""
    base = tmp_path_factory.mktemp("base")
    run_world(_train, 1, run_config(data, save=str(base)), 0, _save_base)
    return str(base)


@pytest.fixture(scope="module")
def single_process_losses(data, shared_base):
    return run_world(_train, 1, run_config(data, load_base=shared_base), 3)[0]["history"]


@pytest.mark.parametrize("layout,world", LAYOUTS, ids=lambda x: str(x))
def test_per_tenant_losses_are_layout_invariant(data, shared_base, single_process_losses, layout, world):
    outs = run_world(_train, world, run_config(data, load_base=shared_base, **layout), 3)
    for out in outs:  # every rank reports the same per-tenant losses and grad norms
        for tenant in ("rev", "up", "txt"):
            for key in ("lm loss", "grad-norm"):
                got = [it[tenant][key] for it in out["history"]]
                want = [it[tenant][key] for it in single_process_losses]
                assert got == pytest.approx(want, rel=1e-5), (tenant, key)


def _idle_and_nan_probe(trainer, iters):
    """Iteration 1 normal; then poison tenant 'txt' (inf in one B) and make 'up' idle (capacity)."""
    opt, table = trainer.optimizer, trainer.table
    results = {"steps": []}
    out = trainer.train_step()
    results["steps"].append(out["per_tenant"])
    up, txt = table.slot_of("up"), table.slot_of("txt")
    with torch.no_grad():
        table.layers[0].lora_B[txt].fill_(float("inf"))
    before = {k: ([p[k].clone() for p in trainer.params], opt.slot_state(k)) for k in (up, txt)}
    trainer.source.max_samples_per_iteration = 6  # rev (4) + txt (2) fit, up (6) must wait
    out = trainer.train_step()
    results["steps"].append(out["per_tenant"])
    for name, k in (("up", up), ("txt", txt)):  # idle / skipped: weights (inf included) and moments as before
        weights, state = before[k]
        after = opt.slot_state(k)
        results[f"{name}_untouched"] = all(torch.equal(a, p[k]) for a, p in zip(weights, trainer.params))
        results[f"{name}_state_untouched"] = all(torch.equal(state[key], after[key]) for key in state)
    results["txt_weights_finite_elsewhere"] = bool(torch.isfinite(table.layers[1].lora_A[txt]).all())
    return results


def _reference_probe(trainer, iters):
    """The same two iterations without the poisoned tenant's effect on the others (txt left alone)."""
    steps = [trainer.train_step()["per_tenant"]]
    trainer.source.max_samples_per_iteration = 6
    steps.append(trainer.train_step()["per_tenant"])
    return {"steps": steps}


def test_idle_tenant_is_bitwise_untouched_and_nan_tenant_is_skipped(data):
    out = run_world(_train, 1, run_config(data), 2, _idle_and_nan_probe)[0]["probe"]
    ref = run_world(_train, 1, run_config(data), 2, _reference_probe)[0]["probe"]
    second = out["steps"][1]
    assert "up" not in second  # did not step
    assert out["up_untouched"] and out["up_state_untouched"]
    assert second["txt"]["skipped"] == 1 and not math.isfinite(second["txt"]["grad-norm"])
    assert out["txt_untouched"] and out["txt_state_untouched"] and out["txt_weights_finite_elsewhere"]
    assert second["rev"]["skipped"] == 0
    assert second["rev"]["lm loss"] == pytest.approx(ref["steps"][1]["rev"]["lm loss"], rel=1e-6)
    assert second["rev"]["grad-norm"] == pytest.approx(ref["steps"][1]["rev"]["grad-norm"], rel=1e-5)


def _zero_token_probe(trainer, iters):
    """'mute' is planned every iteration but its samples have no loss token (as an RL batch can be): its slot
    must not move. (A file without any loss token is refused up front: tests/test_data.py.)"""
    trainer.source._streams["mute"].dataset._targets[:] = 0  # (loss masks and weights)
    k, opt = trainer.table.slot_of("mute"), trainer.optimizer
    weights, state = [p[k].clone() for p in trainer.params], opt.slot_state(k)
    steps = [trainer.train_step()["per_tenant"] for _ in range(iters)]
    after = opt.slot_state(k)
    return {"steps": steps, "mute_steps": trainer.tenants["mute"].steps,
            "untouched": all(torch.equal(a, p[k]) for a, p in zip(weights, trainer.params)),
            "state_untouched": all(torch.equal(state[key], after[key]) for key in state)}


def test_planned_tenant_without_loss_tokens_is_untouched(data):
    """A tenant whose micro-batch rows all have loss_mask 0 (e.g. prompts filling seq_length, or an RL batch
    with nothing to learn) is planned and run, but takes no step: weights, moments, step count and schedule
    position as before, no loss to report; the tenant beside it trains exactly as alone."""
    out = run_world(_train, 1, run_config(data, tenants=("rev", "mute")), 2, _zero_token_probe)[0]["probe"]
    alone = run_world(_train, 1, run_config(data, tenants=("rev",)), 2)[0]["history"]
    assert [sorted(it) for it in out["steps"]] == [["mute", "rev"]] * 2  # planned both times
    for it in out["steps"]:
        assert it["mute"]["tokens"] == 0 and math.isnan(it["mute"]["lm loss"]) and it["mute"]["skipped"] == 0
        assert it["mute"]["learning-rate"] == 0.01  # step 0 of a constant-warmup cosine: the schedule stays put
    assert out["mute_steps"] == 0 and out["untouched"] and out["state_untouched"]
    assert _losses(out["steps"], "rev") == pytest.approx(_losses(alone, "rev"), rel=1e-5)


def _weighted_gradient_probe(trainer, iters):
    """One iteration's gradients (before the optimizer) of a tenant with per-token loss_weights beside a plain one,
    and the same sums computed directly: the model's per-token losses times each token's weight, read from the
    raw JSON (shifted to the labels by hand), backpropagated one micro-batch at a time."""
    from megatron_multilora import model as M
    from megatron_multilora.lora.routing import AdapterRouting

    records = [json.loads(line) for line in Path(trainer.tenants["rl"].config.train_data).read_text().splitlines()]
    seq = trainer.seq_length  # (the samples' ids are < 256, padding is not)
    weight_of = {tuple(r["input_ids"]): [w * m for w, m in zip(r["loss_weights"][1:], r["loss_mask"][1:])]
                 for r in records}
    weight_of = {ids: torch.tensor(w + [0.0] * (seq - len(w))) for ids, w in weight_of.items()}
    slot_of = {name: t.slot for name, t in trainer.tenants.items()}
    with torch.no_grad():  # a nonzero B, so that A has a gradient too
        g = torch.Generator().manual_seed(2)
        for layer in trainer.table.layers:
            for k in slot_of.values():
                layer.lora_B[k].normal_(0.0, 0.1, generator=g)
    plan = trainer.source.next_iteration(slot_of)
    assert sorted(plan.tenants) == ["rev", "rl"]
    rows = list(slot_of.values())
    trainer.grads.zero(rows)
    loss_sum, tokens = trainer._run_micro_batches(plan.micro_batches, forward_only=False)
    got = [p.grad.clone() for p in trainer.params]
    trainer.grads.zero(rows)
    nll, counted = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    for mb in plan.micro_batches:
        weights = torch.stack([
            weight_of[tuple(i for i in t if i < 256)] if s == slot_of["rl"] else m.float()
            for t, m, s in zip(mb["tokens"].tolist(), mb["loss_mask"], mb["slots"].tolist())])
        with AdapterRouting(mb["slots"], trainer.table).active():
            per_token = M.forward_micro_batch(trainer.model, mb["tokens"], mb["labels"])
            (per_token * weights).sum().backward()
        nll.index_add_(0, mb["slots"], (per_token.detach() * mb["loss_mask"]).sum(1).double())
        counted.index_add_(0, mb["slots"], mb["loss_mask"].sum(1).double())
    want = [p.grad.clone() for p in trainer.params]
    return {"got": got, "want": want, "slots": slot_of, "loss": (loss_sum / tokens).tolist(),
            "nll": (nll / counted).tolist(), "tokens": tokens.tolist(), "counted": counted.tolist()}


def test_per_token_loss_weights_weigh_each_tokens_gradient(data, tmp_path):
    """RL-style samples ({"input_ids", "loss_mask", "loss_weights"}, signed advantages, weights also where the mask
    is 0) mixed with a plain tenant in one micro-batch: each slot's gradient sum is that of its tokens' NLL times
    their weights (masked ones ignored), the token count and the logged loss stay the plain NLL's."""
    import random

    rng = random.Random(4)
    records = []
    for _ in range(6):
        n = rng.randint(6, 14)
        records.append({"input_ids": [rng.randrange(1, 256) for _ in range(n)], "loss_mask": [0] * 3 + [1] * (n - 3),
                        "loss_weights": [round(rng.uniform(-2, 2), 3) for _ in range(n)]})
    path = tmp_path / "rl.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    cfg = run_config(data, tenants=("rev",))
    cfg["tenants"].append(dict(name="rl", train_data=str(path), rank=8, alpha=16, lr=0.01, global_batch_size=6))
    out = run_world(_train, 1, cfg, 1, _weighted_gradient_probe)[0]["probe"]
    slots = sorted(out["slots"].values())
    assert all(all(torch.count_nonzero(want[k]) > 0 for want in out["want"]) for k in slots)
    for got, want in zip(out["got"], out["want"]):
        for k in slots:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5 * want[k].abs().max().item())
    for k in slots:
        assert out["tokens"][k] == out["counted"][k] > 0
        assert out["loss"][k] == pytest.approx(out["nll"][k], rel=1e-5)


def _expected_lr(step, lr, min_lr, warmup, decay, style):
    """megatron's OptimizerParamScheduler.get_lr, written out (step = updates already done)."""
    if warmup > 0 and step <= warmup:
        return lr * step / warmup
    if style == "constant":
        return lr
    if step > decay:
        return min_lr
    ratio = (step - warmup) / (decay - warmup)
    coeff = 1.0 - ratio if style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return min_lr + coeff * (lr - min_lr)


def test_each_tenant_follows_its_own_schedule(data):
    cfg = run_config(data, tenants=("rev", "up"), train_iters=5)
    cfg["tenants"][0].update(lr_warmup_iters=2, lr_decay_iters=4, min_lr=0.001)
    cfg["tenants"][1].update(lr_warmup_iters=0, lr_decay_iters=5)
    history = run_world(_train, 1, cfg, 5)[0]["history"]
    for t, (lr, min_lr, warmup, decay, style) in {
        "rev": (0.01, 0.001, 2, 4, "cosine"), "up": (0.02, 0.001, 0, 5, "linear")
    }.items():
        got = [it[t]["learning-rate"] for it in history]
        want = [_expected_lr(s, lr, min_lr, warmup, decay, style) for s in range(5)]
        assert got == pytest.approx(want, rel=1e-6, abs=1e-12), t
    assert history[0]["rev"]["learning-rate"] == 0.0 and history[2]["rev"]["learning-rate"] == 0.01


def _full_run(trainer, iters):
    trainer.train()


def test_metrics_files_have_per_tenant_rows(data, tmp_path):
    cfg = run_config(data, tensorboard_dir=str(tmp_path / "tb"), metrics_file=str(tmp_path / "m.jsonl"),
                     eval_interval=2, train_iters=2)
    run_world(_train, 1, cfg, 2, _full_run)
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "lm loss" in r]
    valid_rows = [r for r in rows if "lm loss validation" in r]
    assert {(r["iteration"], r["tenant"]) for r in train_rows} == {(i, t) for i in (1, 2) for t in ("rev", "up", "txt")}
    assert {r["tenant"] for r in valid_rows} == {"rev", "up", "txt"}
    for r in train_rows:
        assert {"learning-rate", "grad-norm", "tokens", "iteration-time", "throughput", "batch-size"} <= set(r)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"rev/lm loss", "up/lm loss validation", "txt/learning-rate", "throughput"} <= tags


BAD = [
    ({"lora": {"max_slots": 4, "max_rank": 4}}, "exceeds lora.max_rank"),
    ({"model": "no-such-model"}, "unknown model preset"),
    ({"lora": {"max_slots": 2, "max_rank": 16, "queue": False}}, "slots"),
]


@pytest.mark.parametrize("change,message", BAD, ids=lambda x: str(x)[:30])
def test_bad_configuration_fails_fast_with_a_clear_message(data, tmp_path, change, message):
    import yaml

    cfg = run_config(data)
    cfg.update(change)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "megatron_multilora.train", "--config", str(path)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "initialize" not in proc.stderr.lower() and "megatron.core" not in proc.stderr


def test_bad_data_fails_in_one_line_before_any_process_group(data, tmp_path):
    """A malformed line of a tenant's data is named (file, line, column) before any process group or model
    exists: started as rank 0 of 2 with no rank 1 ever coming, the job would otherwise wait in the rendezvous."""
    import yaml

    from megatron_multilora.platform import free_port

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n' * 4 + '{"prompt": "x=", "completion": "X"\n')
    cfg = run_config(data)
    cfg["tenants"][1]["train_data"] = str(bad)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-m", "megatron_multilora.train", "--config", str(path)], env=env,
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: {bad}, line 5: invalid JSON (Expecting ',' delimiter at column 35)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ctrl_c_ends_the_job_with_one_line(data, tmp_path):
    import signal
    import time

    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config(data, train_iters=10_000, metrics_file=str(tmp_path / "m.jsonl"))))
    proc = subprocess.Popen([sys.executable, "-m", "megatron_multilora.train", "--config", str(path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not (tmp_path / "m.jsonl").exists() or not (tmp_path / "m.jsonl").read_text():
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # training, as a user's Ctrl-C
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert last.startswith("interrupted at iteration ") and last.endswith("; no checkpoint saved"), last


def test_missing_data_file_duplicate_names_and_tp_not_dividing_heads(data, tmp_path):
    import yaml

    cfg = run_config(data)
    cfg["tenants"][1]["train_data"] = str(tmp_path / "missing.jsonl")
    cfg["tenants"][2]["name"] = "rev"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_multilora.train", "--config", str(path),
         "--tensor-model-parallel-size", "3", "--sequence-parallel"],
        capture_output=True, text=True, cwd=REPO, timeout=120, env={**__import__("os").environ, "WORLD_SIZE": "3"},
    )
    assert proc.returncode == 2
    for part in ("missing.jsonl", "duplicate", "num_attention_heads"):
        assert part in proc.stderr, (part, proc.stderr)


def test_micro_batches_are_moved_to_the_model_device():
    """The data source builds micro-batches on the host; the schedule hands the model and the loss their tensors
    on this rank's device (the meta device stands in for a GPU here) and leaves the host-side slot ids alone."""
    from megatron_multilora.schedule import DEVICE_KEYS, to_device

    batch = {"tokens": torch.zeros(2, 4, dtype=torch.long), "labels": torch.zeros(2, 4, dtype=torch.long),
             "loss_mask": torch.ones(2, 4), "loss_weights": torch.ones(2, 4), "slots": torch.tensor([0, 1])}
    moved = to_device(batch, torch.device("meta"))
    assert moved is batch and all(batch[k].device.type == "meta" for k in DEVICE_KEYS)
    assert batch["slots"].device.type == "cpu"
