"""Run configuration: dataclasses, YAML loading, validation messages, the command line, tenants dirs."""

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_multilora.arguments import build_parser, parse_run_config
from megatron_multilora.config import (
    DENSE_TARGET_MODULES,
    TARGET_MODULES,
    ConfigError,
    LoRAPoolConfig,
    RunConfig,
    TenantConfig,
    load_run_config,
    load_tenant_file,
    model_config_from,
    validate,
    validate_tenant,
)

REPO = Path(__file__).resolve().parent.parent


def write_data(path: Path, n: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": f"sample {i}"}) + "\n" for i in range(n)))
    return path


@pytest.fixture
def data(tmp_path):
    """Data files for three tenants under tmp_path/data/<name>/{train,valid}.jsonl."""
    for name in ("a", "b", "c"):
        write_data(tmp_path / "data" / name / "train.jsonl")
        write_data(tmp_path / "data" / name / "valid.jsonl")
    return tmp_path / "data"


@pytest.fixture
def raw(data):
    """A valid raw run mapping (absolute paths) for a 2-process EP=2 run of tiny-moe."""
    return {
        "model": "tiny-moe",
        "lora": {"max_slots": 2, "max_rank": 16},
        "tenants": [
            {"name": "a", "rank": 8, "lr": 1e-3, "train_data": str(data / "a/train.jsonl"),
             "valid_data": str(data / "a/valid.jsonl")},
            {"name": "b", "rank": 4, "lr": 2e-3, "lr_warmup_iters": 2, "lr_decay_style": "linear",
             "train_data": str(data / "b/train.jsonl"), "global_batch_size": 12},
        ],
        "seq_length": 64,
        "micro_batch_size": 4,
        "train_iters": 20,
        "expert_model_parallel_size": 2,
    }


def check(raw, world_size=2):
    return validate(load_run_config(raw), world_size)


def with_changes(raw, path, value):
    """A copy of ``raw`` with ``path`` ("lora.max_rank", "tenants.1.rank") set (or deleted for ...)."""
    out = copy.deepcopy(raw)
    *parents, last = path.split(".")
    node = out
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    key = int(last) if isinstance(node, list) else last
    if value is ...:
        del node[key]
    else:
        node[key] = value
    return out


# ---------------------------------------------------------------------------------------------- valid configs


def test_valid_config_defaults_and_resolution(raw):
    run = check(raw)
    assert isinstance(run.lora, LoRAPoolConfig) and run.lora.queue is True
    # MoE model: the pool's default targets include the expert linears; tenants default to the pool's
    assert run.lora.target_modules == list(TARGET_MODULES)
    a, b = run.tenants
    assert isinstance(a, TenantConfig) and a.target_modules == list(TARGET_MODULES)
    assert a.alpha == 8.0 and a.scaling == 1.0 and a.rslora is False and a.dropout == 0.0
    assert (a.lr_decay_style, a.init, a.adam_beta1, a.adam_beta2, a.adam_eps, a.clip_grad) == (
        "cosine", "kaiming", 0.9, 0.999, 1e-8, 1.0)
    assert a.decay_iters(run.train_iters) == 20 and run.seed_of(a) == run.seed == 1234
    assert b.valid_data is None and b.global_batch_size == 12
    assert run.parallel_layout().data_parallel_size(2) == 2
    assert run.distributed_backend is None and run.tokenizer is None


def test_dense_model_pool_defaults_to_the_dense_modules(raw):
    run = check({**raw, "model": "tiny-dense", "expert_model_parallel_size": 1})
    assert run.lora.target_modules == list(DENSE_TARGET_MODULES)


def test_seq_length_defaults_to_max_position_embeddings(raw):
    run = check(with_changes(raw, "seq_length", ...))
    assert run.seq_length == run.model.max_position_embeddings == 128


def test_round_trip_through_to_dict_and_yaml(raw, tmp_path):
    raw = with_changes(raw, "tenants.0.target_modules", ["linear_qkv", "expert_fc1"])
    raw["tenants"][1].update(rslora=True, alpha=16, seed=7, train_iters=10, max_epochs=3, init="gaussian")
    raw.update(save=str(tmp_path / "ckpt"), tensorboard_dir="tb", keep_last_checkpoints=2, save_interval=5,
               max_samples_per_iteration=24, distributed_backend="gloo", tenant_defaults={"weight_decay": 0.1})
    run = check(raw)
    assert run.tenants[1].weight_decay == 0.1 and run.tenants[1].scaling == 8.0
    again = load_run_config(run.to_dict())
    assert again == run and again.to_dict() == run.to_dict()
    path = run.save_yaml(tmp_path / "out" / "run.yaml")
    assert yaml.safe_load(path.read_text()) == run.to_dict()
    assert validate(load_run_config(path), 2) == run


def test_direct_construction_converts_sections(data):
    run = RunConfig(model="tiny-dense", lora={"max_slots": 1, "max_rank": 4},
                    tenants=[{"name": "a", "rank": "4", "lr": "1e-3", "train_data": str(data / "a/train.jsonl")}],
                    train_iters=5)
    validate(run)
    assert run.tenants[0].rank == 4 and run.tenants[0].lr == 1e-3 and run.tenants[0].alpha == 4.0


def test_yaml_strings_for_numbers_are_converted(raw, tmp_path):
    # PyYAML reads 1e-3 (no dot) as a string; it still means a number
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw).replace("0.001", "1e-3"))
    assert "1e-3" in (tmp_path / "run.yaml").read_text()
    assert check(load_run_config(tmp_path / "run.yaml").to_dict()).tenants[0].lr == 1e-3


def test_preset_names_with_dots_load():
    # "qwen1.5-moe-a2.7b" has a Path suffix (".7b"); it used to be taken for a missing file
    assert model_config_from("qwen1.5-moe-a2.7b").num_experts == 60


# ---------------------------------------------------------------------------------------------- errors


def test_unsafe_and_bad_tenant_names_are_refused(raw):
    for name in ("../escape", "a/b", ".", "..", ".hidden", "", "x" * 65, "sp ace"):
        with pytest.raises(ConfigError, match=r"tenants\[1\]\.name .*(letter or digit|at most 64|non-empty)"):
            check(with_changes(raw, "tenants.1.name", name))
    check(with_changes(raw, "tenants.1.name", "Ok_name-1.v2"))


@pytest.mark.parametrize("path, value, message", [
    ("tenants.1.rank", 32, r"tenants\[1\]\.rank 32 exceeds lora\.max_rank 16 \(tenant 'b'\)"),
    ("tenants.1.rank", 0, r"tenants\[1\]\.rank must be >= 1, got 0"),
    ("tenants.0.alpha", 0, r"tenants\[0\]\.alpha must be > 0"),
    ("tenants.0.dropout", 1.0, r"tenants\[0\]\.dropout must be in \[0, 1\)"),
    ("tenants.0.init", "orthogonal", r"tenants\[0\]\.init must be one of \['kaiming', 'gaussian'\]"),
    ("tenants.1.name", "a", r"tenants\[1\]\.name: duplicate tenant name 'a' \(also tenants\[0\]\)"),
    ("tenants.0.target_modules", ["linear_qkv", "lm_head"],
     r"tenants\[0\]\.target_modules: unknown module\(s\) \['lm_head'\]; known: \['linear_qkv'"),
    ("lora.target_modules", ["linear_qkv", "q_proj"], r"lora\.target_modules: unknown module\(s\) \['q_proj'\]"),
    ("tenants.0.train_data", "/nonexistent/x/train.jsonl",
     r"tenants\[0\]\.train_data: data file not found: /nonexistent/x/train\.jsonl"),
    ("tenants.0.valid_data", "/nonexistent/x/valid.jsonl",
     r"tenants\[0\]\.valid_data: data file not found: /nonexistent/x/valid\.jsonl"),
    ("tenants.0.lr", -1e-3, r"tenants\[0\]\.lr must be >= 0, got -0\.001"),
    ("tenants.0.min_lr", 1e-2, r"tenants\[0\]\.min_lr 0\.01 is larger than lr 0\.001"),
    ("tenants.0.lr_warmup_iters", 20,
     r"tenants\[0\]\.lr_warmup_iters 20 must be smaller than lr_decay_iters \(= the run's train_iters\) 20"),
    ("tenants.0.lr_decay_style", "step", r"tenants\[0\]\.lr_decay_style must be one of"),
    ("tenants.0.adam_beta2", 1.0, r"tenants\[0\]\.adam_beta2 must be in \[0, 1\)"),
    ("tenants.0.adam_eps", 0, r"tenants\[0\]\.adam_eps must be > 0"),
    ("tenants.0.clip_grad", -1, r"tenants\[0\]\.clip_grad must be >= 0"),
    ("tenants.0.global_batch_size", 0, r"tenants\[0\]\.global_batch_size must be >= 1"),
    ("tenants.0.train_iters", 0, r"tenants\[0\]\.train_iters must be >= 1"),
    ("tenants.0.max_epochs", 0, r"tenants\[0\]\.max_epochs must be >= 1"),
    ("micro_batch_size", 0, r"^micro_batch_size must be >= 1, got 0$"),
    ("seq_length", 256, r"seq_length 256 exceeds model\.max_position_embeddings 128"),
    ("train_iters", ..., r"train_iters is required"),
    ("train_iters", 0, r"^train_iters must be >= 1, got 0$"),  # and nothing about schedules against it
    ("eval_iters", -1, r"eval_iters must be >= 0"),
    ("eval_interval", 0, r"eval_interval must be >= 1"),
    ("log_interval", 0, r"log_interval must be >= 1"),
    ("save_interval", 0, r"save_interval must be >= 1"),
    ("keep_last_checkpoints", 0, r"keep_last_checkpoints must be >= 1"),
    ("exit_interval", 0, r"exit_interval must be >= 1"),
    ("exit_duration_in_mins", 0, r"exit_duration_in_mins must be > 0"),
    ("exit_duration_in_mins", float("nan"), r"exit_duration_in_mins: expected a finite number"),
    ("exit_signal", "SIGKILL", r"exit_signal must be one of \['SIGTERM', 'SIGINT', 'SIGUSR1', 'SIGUSR2'\]"),
    ("exit_signal", "SIGUSR1", r"exit_signal SIGUSR1 is caught only with exit_signal_handler"),
    ("distributed_backend", "mpi", r"distributed_backend must be one of \['gloo', 'nccl'\]"),
    ("tenants_dir_idle_wait", -1.0, r"tenants_dir_idle_wait must be >= 0 seconds"),
    ("tenants_dir_idle_wait", 5.0, r"tenants_dir_idle_wait needs a tenants_dir"),
    ("moe_token_dispatcher_type", "flex", r"moe_token_dispatcher_type must be one of \['allgather', 'alltoall'\]"),
    ("distributed_timeout_minutes", 0, r"distributed_timeout_minutes must be >= 1"),
    ("lora.max_slots", 0, r"lora\.max_slots must be >= 1"),
    ("lora.max_rank", 0, r"lora\.max_rank must be >= 1"),
    ("max_samples_per_iteration", 8,
     r"tenants\[1\]\.global_batch_size 12 can never fit in max_samples_per_iteration 8"),
    ("load_base", "/nonexistent/base", r"load_base: directory not found: /nonexistent/base"),
    ("tokenizer", "/nonexistent/tokenizer.json", r"tokenizer: file not found: /nonexistent/tokenizer\.json"),
    ("tenants", [], r"no tenants"),
])
def test_validation_errors_name_the_field(raw, path, value, message):
    with pytest.raises(ConfigError, match=message):
        check(with_changes(raw, path, value))


def test_checkpoint_and_output_paths_are_checked_before_the_run(raw, tmp_path):
    """What a run would otherwise meet only at its first save or after training: an unwritable --save,
    --metrics-file or --tensorboard-dir; --save holding another run's checkpoints (a fresh run would write its
    iterations over them); a --load or --load-base that holds no checkpoint. Nothing on disk is changed."""
    old = tmp_path / "old_run"
    (old / "run").mkdir(parents=True)
    (old / "latest_checkpointed_iteration.txt").write_text("60\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    bad = {
        "save": (str(old), r"save: .*old_run already holds a run checkpoint .*: 60\): resume it with --load"),
        "load": (str(tmp_path / "typo"), r"load: directory not found: .*typo"),
        "metrics_file": (str(a_file / "m.jsonl"), r"metrics_file: cannot create .*m\.jsonl: .*a_file is not a dir"),
        "tensorboard_dir": (str(a_file), r"tensorboard_dir: .*a_file exists and is not a directory"),
        "load_base": (str(tmp_path), r"load_base: no dist_checkpointing checkpoint at"),
    }
    for key, (value, message) in bad.items():
        with pytest.raises(ConfigError, match=message):
            check({**raw, key: value})
    with pytest.raises(ConfigError, match=r"load: .* holds no checkpoint"):
        check({**raw, "load": str(tmp_path)})
    # a Hugging Face model or a PEFT adapter given as a checkpoint: named, with the conversion that makes one
    hf_dir, peft_dir = tmp_path / "hf", tmp_path / "peft"
    for d, files in ((hf_dir, ("config.json", "model.safetensors")), (peft_dir, ("adapter_config.json",))):
        d.mkdir()
        for f in files:
            (d / f).write_text("{}")
    with pytest.raises(ConfigError, match=r"a Hugging Face model directory -- convert it first with .* import-hf"):
        check({**raw, "load_base": str(hf_dir)})
    with pytest.raises(ConfigError, match=r"a PEFT adapter -- convert it first with .* import-peft"):
        check({**raw, "load": str(peft_dir)})
    # one tenant's checkpoints as --load (they have a pointer too); a run's checkpoint, or one of its iterations,
    # as --load-base (adapters, no base weights): named before any model is built
    prev = tmp_path / "prev_run"
    tenant_root, run_iter = prev / "tenants" / "a", prev / "run" / "iter_0000060"
    for where in (tenant_root / "iter_0000060", run_iter):
        where.mkdir(parents=True)
        (where / "manifest.json").write_text("{}")
        (where / "metadata.json").write_text("{}")
    for where in (prev, tenant_root):
        (where / "latest_checkpointed_iteration.txt").write_text("60\n")
    with pytest.raises(ConfigError, match=r"load: .*tenants/a is tenant 'a''s checkpoints, not a run's: --load takes "
                                          r"the run's directory \(.*prev_run\)"):
        check({**raw, "load": str(tenant_root)})
    # ... but a directory of tenant checkpoints that merely sits in a folder named "tenants" is one to load
    pool = tmp_path / "tenants" / "pool1"
    (pool / "tenants" / "a" / "iter_0000000").mkdir(parents=True)
    check({**raw, "load": str(pool)})
    for where in (prev, run_iter, tenant_root / "iter_0000060"):
        with pytest.raises(ConfigError, match=r"load_base: .* is a multi-LoRA checkpoint \(adapters and training "
                                              r"state, no base weights\)"):
            check({**raw, "load_base": str(where)})
    assert sorted(p.name for p in old.iterdir()) == ["latest_checkpointed_iteration.txt", "run"]
    # resuming it in place, the usual `--save DIR --load DIR` (also before the first checkpoint exists), or a
    # directory of tenant checkpoints only (import-peft's output) are fine
    check({**raw, "save": str(old), "load": str(old)})
    check({**raw, "save": str(tmp_path / "new"), "load": str(tmp_path / "new")})
    (tmp_path / "imported" / "tenants").mkdir(parents=True)
    check({**raw, "save": str(tmp_path / "new"), "load": str(tmp_path / "imported")})


def test_tenant_defaults_values_are_checked_even_when_unused(raw):
    """--lr -1 with every tenant setting its own lr would otherwise surface only when a tenant without one joins."""
    with pytest.raises(ConfigError, match=r"^tenant_defaults\.lr must be >= 0, got -1\.0$"):
        check({**raw, "tenant_defaults": {"lr": -1.0}})
    with pytest.raises(ConfigError, match=r"^tenant_defaults\.rank 64 exceeds lora\.max_rank 16$"):
        check({**raw, "tenant_defaults": {"rank": 64}})
    check({**raw, "tenant_defaults": {"min_lr": 1e-4, "global_batch_size": 2}})  # (min_lr without lr: fine)


def test_tenant_targets_must_be_in_the_pool(raw):
    raw = with_changes(raw, "lora.target_modules", ["linear_qkv", "linear_proj"])
    with pytest.raises(ConfigError, match=r"tenants\[0\]\.target_modules \['linear_fc1'\] are not in "
                                          r"lora\.target_modules \['linear_qkv', 'linear_proj'\]"):
        check(with_changes(raw, "tenants.0.target_modules", ["linear_qkv", "linear_fc1"]))
    # tenants without target_modules take the pool's
    assert check(raw).tenants[1].target_modules == ["linear_qkv", "linear_proj"]


def test_expert_targets_need_a_moe_model(raw):
    raw = {**raw, "model": "tiny-dense", "expert_model_parallel_size": 1}
    with pytest.raises(ConfigError, match=r"lora\.target_modules \['expert_fc1'\] need a MoE model"):
        check(with_changes(raw, "lora.target_modules", ["linear_qkv", "expert_fc1"]))


def test_more_tenants_than_slots(raw, data):
    raw["tenants"].append({"name": "c", "rank": 2, "lr": 1e-3, "train_data": str(data / "c/train.jsonl")})
    assert len(check(raw).tenants) == 3  # queue (default): the third waits for a slot
    with pytest.raises(ConfigError, match=r"3 tenants but lora\.max_slots is 2 and lora\.queue is false"):
        check(with_changes(raw, "lora.queue", False))


def test_warmup_versus_decay(raw):
    raw = with_changes(raw, "tenants.0.lr_warmup_iters", 5)
    with pytest.raises(ConfigError, match=r"tenants\[0\]\.lr_warmup_iters 5 must be smaller than lr_decay_iters 5"):
        check(with_changes(raw, "tenants.0.lr_decay_iters", 5))
    with pytest.raises(ConfigError, match=r"lr_warmup_iters 5 must be smaller than lr_decay_iters \(= its "
                                          r"train_iters\) 4"):
        check(with_changes(raw, "tenants.0.train_iters", 4))
    # a constant schedule has nothing to decay: a long warm-up is only checked against an explicit decay
    check(with_changes(with_changes(raw, "tenants.0.lr_decay_style", "constant"), "tenants.0.lr_warmup_iters", 50))


@pytest.mark.parametrize("changes, world_size, message", [
    ({"tensor_model_parallel_size": 3}, 6, r"--tensor-model-parallel-size 3 must divide num_attention_heads 4"),
    ({"pipeline_model_parallel_size": 3}, 6, r"--pipeline-model-parallel-size 3 must divide num_layers 4"),
    ({"expert_model_parallel_size": 3}, 3, r"--expert-model-parallel-size 3 must divide num_experts 4"),
    ({"tensor_model_parallel_size": 2}, 4, r"MoE with --tensor-model-parallel-size > 1 needs --sequence-parallel"),
    ({"tensor_model_parallel_size": 2, "sequence_parallel": True, "expert_model_parallel_size": 1}, 3,
     r"world size 3 is not divisible by tensor_model_parallel_size 2 x pipeline_model_parallel_size 1 = 2"),
    ({"pipeline_model_parallel_size": 2}, 2,
     r"data-parallel size 1 \(world size 2 / \(TP 1 x PP 2\)\) is not divisible by expert_model_parallel_size 2"),
    ({"expert_model_parallel_size": 0}, 2, r"expert_model_parallel_size must be >= 1, got 0"),
    ({"model": "no-such-model"}, 2, r"unknown model preset 'no-such-model'; presets: .*tiny-moe"),
    ({"model": {"preset": "tiny-moe", "num_experts": 3}}, 2, r"must divide num_experts 3"),
])
def test_layout_errors(raw, changes, world_size, message):
    with pytest.raises(ConfigError, match=message):
        check({**raw, **changes}, world_size)


def test_valid_layouts(raw):
    check(raw, 4)  # DP 4, EP 2
    check({**raw, "tensor_model_parallel_size": 2, "sequence_parallel": True}, 4)  # TP 2 x DP 2, EP 2
    check({**raw, "pipeline_model_parallel_size": 2, "expert_model_parallel_size": 1}, 2)


def test_all_problems_are_reported_together(raw):
    raw = with_changes(with_changes(raw, "tenants.1.rank", 99), "micro_batch_size", 0)
    with pytest.raises(ConfigError, match=r"(?s)2 configuration problems:.*micro_batch_size.*tenants\[1\]\.rank 99"):
        check(raw)


@pytest.mark.parametrize("changes, message", [
    ({"learning_rate": 1e-3}, r"unknown key\(s\) 'learning_rate'; known: model, lora, tenants, .*train_iters"),
    ({"lora": {"max_slots": 2, "max_rank": 8, "slots": 3}}, r"lora: unknown key\(s\) 'slots'; known: max_slots"),
    ({"lora": {"max_slots": 2}}, r"lora: missing required key\(s\) max_rank"),
    ({"model": {"preset": "tiny-moe", "layers": 2}}, r"unknown model field\(s\) \['layers'\]"),
    ({"tenant_defaults": {"name": "x"}}, r"tenant_defaults: unknown or per-tenant-only key\(s\) 'name'"),
    ({"train_iters": "many"}, r"^train_iters: expected an integer, got 'many'$"),
    ({"sequence_parallel": "yes"}, r"^sequence_parallel: expected true or false"),
])
def test_load_errors(raw, changes, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config({**raw, **changes})


def test_tenant_load_errors(raw):
    with pytest.raises(ConfigError, match=r"tenants\[1\]: unknown key\(s\) 'learning_rate'; known: name, rank, lr"):
        load_run_config(with_changes(raw, "tenants.1.learning_rate", 1e-3))
    with pytest.raises(ConfigError, match=r"tenants\[0\]: missing required key\(s\) lr"):
        load_run_config(with_changes(raw, "tenants.0.lr", ...))
    with pytest.raises(ConfigError, match=r"tenants\[1\]\.rank: expected an integer, got 'eight'"):
        load_run_config(with_changes(raw, "tenants.1.rank", "eight"))
    with pytest.raises(ConfigError, match=r"missing required section\(s\) lora"):
        load_run_config(with_changes(raw, "lora", ...))


def test_tokenizer_vocabulary_must_fit_the_model(raw, tmp_path):
    from tokenizers import Tokenizer, models

    def save(size):
        vocab = {"</s>": 0, **{f"w{i}": i for i in range(1, size)}}
        Tokenizer(models.WordLevel(vocab, unk_token="w0")).save(str(tmp_path / "tokenizer.json"))

    save(100)
    run = check({**raw, "tokenizer": str(tmp_path)})
    assert run.tokenizer == str(tmp_path)  # a directory with one
    # what run checkpoints record of it covers the tokenizer_config.json beside it (its eos_token)
    from megatron_multilora.config import tokenizer_identity

    before = tokenizer_identity(run)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w1"}))
    assert tokenizer_identity(run)["sha256"] != before["sha256"] and before["file"].endswith("tokenizer.json")
    (tmp_path / "tokenizer_config.json").unlink()
    save(400)
    with pytest.raises(ConfigError, match=r"tokenizer .* has 400 tokens, more than model\.vocab_size 320"):
        check({**raw, "tokenizer": str(tmp_path / "tokenizer.json")})
    assert check({**raw, "tokenizer": "byte"}).byte_tokenizer
    Tokenizer(models.WordLevel({"w0": 0}, unk_token="w0")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ConfigError, match=r"tokenizer .* cannot be loaded \(.*no eos token found"):
        check({**raw, "tokenizer": str(tmp_path)})


def test_optimizer_settings_of_a_tenant(raw):
    pytest.importorskip("torch")
    raw["tenants"][0].update(lr_warmup_iters=2, min_lr=1e-4, weight_decay=0.01, adam_beta2=0.95, clip_grad=0.5)
    raw["tenants"][1].update(lr_decay_style="constant")
    a, b = check(raw).tenants
    hp = a.hyper_params(20)
    assert (hp.schedule.lr, hp.schedule.min_lr, hp.schedule.warmup_iters, hp.schedule.decay_iters) == (
        1e-3, 1e-4, 2, 20)
    assert (hp.schedule.decay_style, hp.weight_decay, hp.betas, hp.eps, hp.clip_grad) == (
        "cosine", 0.01, (0.9, 0.95), 1e-8, 0.5)
    assert b.lr_schedule(20).decay_iters is None and b.lr_schedule(20).lr_at(100) == 2e-3


def test_tenants_without_valid_data_are_fine_with_eval(raw):
    run = check({**raw, "eval_interval": 5, "eval_iters": 2})
    assert [t.valid_data is None for t in run.tenants] == [False, True]


# ---------------------------------------------------------------------------------------------- YAML files


def test_relative_paths_resolve_against_the_yaml_directory(tmp_path, monkeypatch):
    write_data(tmp_path / "demo_data" / "a" / "train.jsonl")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "metadata.json").write_text("{}")  # what marks a dist_checkpointing directory
    (tmp_path / "configs" / "tenants").mkdir(parents=True)
    (tmp_path / "configs" / "tenants" / "d.yaml").write_text(
        "rank: 2\nlr: 1.0e-3\ntrain_data: ../../demo_data/a/train.jsonl\n")
    (tmp_path / "configs" / "run.yaml").write_text(yaml.safe_dump({
        "model": "tiny-dense",
        "lora": {"max_slots": 2, "max_rank": 8},
        "tenants": [{"name": "a", "rank": 4, "lr": 1e-3, "train_data": "../demo_data/a/train.jsonl"}],
        "tenants_dir": "tenants", "load_base": "../base", "save": "ckpt", "train_iters": 3,
    }))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = validate(load_run_config(Path("..") / "configs" / "run.yaml"))
    assert run.tenants[0].train_data == str(tmp_path / "demo_data" / "a" / "train.jsonl")
    d = load_tenant_file(Path(run.tenants_dir) / "d.yaml")  # a tenant file's paths: against its own directory
    assert d.name == "d" and d.train_data == run.tenants[0].train_data
    assert run.load_base == str(tmp_path / "base") and run.tenants_dir == str(tmp_path / "configs" / "tenants")
    assert run.save == "ckpt"  # output paths stay relative to the working directory, as in Megatron-LM


def test_demo_config_is_valid_for_two_processes(tmp_path):
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    for name in ("reverse", "caps", "arith", "echo"):
        write_data(tmp_path / "demo_data" / name / "train.jsonl")
        write_data(tmp_path / "demo_data" / name / "valid.jsonl")
    run = validate(load_run_config(tmp_path / "configs" / "demo.yaml"), 2)
    assert [(t.name, t.rank) for t in run.tenants] == [("reverse", 8), ("caps", 4), ("arith", 16), ("echo", 8)]
    assert (run.lora.max_slots, run.lora.max_rank, run.model.num_experts) == (4, 16, 4)
    assert run.expert_model_parallel_size == 2
    assert len({t.lr_decay_style for t in run.tenants}) == 3
    assert run.tenants[0].valid_data == str(tmp_path / "demo_data" / "reverse" / "valid.jsonl")


# ---------------------------------------------------------------------------------------------- tenants dir


def test_tenant_files_and_tenants_dir(raw, data, tmp_path):
    tenants = tmp_path / "tenants"
    tenants.mkdir()
    (tenants / "c.yaml").write_text("rank: 2\nlr: 5.0e-4\ntrain_data: ../data/c/train.jsonl\n")
    (tenants / "zeta.yml").write_text("name: z\nrank: 4\nlr: 1.0e-3\ntrain_data: ../data/a/train.jsonl\n")
    (tenants / "notes.txt").write_text("ignored")
    c = load_tenant_file(tenants / "c.yaml")
    assert c.name == "c" and c.alpha == 2.0 and c.train_data == str(data / "c" / "train.jsonl")
    assert load_tenant_file(tenants / "zeta.yml").name == "z"

    # the job reads the directory itself (tests/test_tenant_lifecycle.py): the config's tenants are its own
    run = check({**raw, "tenants_dir": str(tenants)})
    assert [t.name for t in run.tenants] == ["a", "b"] and run.tenants_dir == str(tenants)
    assert load_run_config(run.to_dict()) == run


def test_tenant_file_errors_use_the_same_validation(raw, tmp_path, data):
    run = check(raw)
    bad = tmp_path / "big.yaml"
    bad.write_text(f"rank: 64\nlr: 1.0e-3\ntrain_data: {data / 'a/train.jsonl'}\n")
    with pytest.raises(ConfigError, match=r"tenant\.rank 64 exceeds lora\.max_rank 16 "
                                          r"\(tenant 'big', from .*big\.yaml\)"):
        validate_tenant(run, load_tenant_file(bad))
    dup = tmp_path / "a.yaml"
    dup.write_text(f"rank: 4\nlr: 1.0e-3\ntrain_data: {data / 'a/train.jsonl'}\n")
    with pytest.raises(ConfigError, match=r"duplicate tenant name 'a'"):
        validate_tenant(run, load_tenant_file(dup), others=run.tenants)
    (tmp_path / "typo.yaml").write_text("rank: 4\nlr: 1.0e-3\ntrain_dat: x\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml: tenant: unknown key\(s\) 'train_dat'"):
        load_tenant_file(tmp_path / "typo.yaml")
    with pytest.raises(ConfigError, match=r"tenants_dir: directory not found: .*missing"):
        check({**raw, "tenants_dir": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match=r"tenants_dir: not a directory: .*typo\.yaml"):  # (a tenant file given)
        check({**raw, "tenants_dir": str(tmp_path / "typo.yaml")})


# ---------------------------------------------------------------------------------------------- command line


@pytest.fixture
def run_yaml(raw, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_flags_override_yaml(run_yaml):
    run = parse_run_config(["--config", str(run_yaml), "--train-iters", "7", "--micro-batch-size", "2",
                            "--expert-model-parallel-size", "1", "--seq-length", "32", "--max-slots", "3",
                            "--no-queue", "--eval-interval", "none", "--distributed-backend", "auto",
                            "--log-interval", "1", "--moe-token-dispatcher-type", "alltoall",
                            "--exit-interval", "5", "--exit-duration-in-mins", "0.5", "--exit-signal-handler",
                            "--exit-signal", "SIGUSR1"], world_size=1)
    assert run.moe_token_dispatcher_type == "alltoall"
    assert (run.exit_interval, run.exit_duration_in_mins, run.exit_signal_handler, run.exit_signal) == (
        5, 0.5, True, "SIGUSR1")
    assert (run.train_iters, run.micro_batch_size, run.expert_model_parallel_size, run.seq_length) == (7, 2, 1, 32)
    assert (run.lora.max_slots, run.lora.max_rank, run.lora.queue) == (3, 16, False)
    assert run.eval_interval is None and run.log_interval == 1 and run.distributed_backend is None
    # flags not given leave the YAML (or the defaults) alone
    same = parse_run_config(["--config", str(run_yaml)], world_size=2)
    assert same == load_run_config(run_yaml)
    assert (same.train_iters, same.micro_batch_size, same.seed) == (20, 4, 1234)


def test_model_flags(run_yaml):
    run = parse_run_config(["--config", str(run_yaml), "--num-layers", "2", "--num-experts", "2",
                            "--moe-router-topk", "1"], world_size=2)
    assert (run.model.num_layers, run.model.num_experts, run.model.moe_router_topk) == (2, 2, 1)
    assert run.model.hidden_size == 64  # the rest of the preset stays
    run = parse_run_config(["--config", str(run_yaml), "--model", "tiny-dense", "--hidden-size", "128",
                            "--expert-model-parallel-size", "1"], world_size=1)
    assert not run.model.is_moe and run.model.hidden_size == 128
    assert run.lora.target_modules == list(DENSE_TARGET_MODULES)
    with pytest.raises(ConfigError, match=r"--pipeline-model-parallel-size 2 must divide num_layers 3"):
        parse_run_config(["--config", str(run_yaml), "--num-layers", "3", "--pipeline-model-parallel-size", "2",
                          "--expert-model-parallel-size", "1"], world_size=2)
    assert parse_run_config(["--config", str(run_yaml), "--bf16"], world_size=2).model.params_dtype == "bfloat16"


def test_fp16_training_is_refused_for_want_of_loss_scaling(run_yaml, tmp_path):
    """(It trained: LoRA gradients in fp16 with no loss scaler underflow to zero unnoticed.) A float16 base (a
    Megatron-LM --fp16 save, an older import) trains in bfloat16 unless the run names its dtype."""
    from megatron_multilora.checkpointing import save_model_config

    with pytest.raises(ConfigError, match=r"params_dtype float16: fp16 training needs loss scaling.*--bf16"):
        validate(load_run_config(run_yaml, {"model": {"params_dtype": "float16"}}), 2)
    base = tmp_path / "base"
    base.mkdir()
    (base / "metadata.json").write_text("{}")  # (the model is all a run reads of a base before it starts)
    save_model_config(base, model_config_from({"preset": "tiny-moe", "params_dtype": "float16"}))
    raw = {"load_base": str(base), "lora": {"max_slots": 1, "max_rank": 4}, "train_iters": 1,
           "tenants_dir": str(tmp_path)}
    assert validate(load_run_config(raw)).model.params_dtype == "bfloat16"
    assert load_run_config(raw, {"model": {"params_dtype": "float32"}}).model.params_dtype == "float32"


@pytest.mark.parametrize("field,value,error", [
    ("moe_router_topk", 2.7, "model.moe_router_topk: expected an integer, got 2.7"),
    ("untie_embeddings_and_output_weights", "no", "untie_embeddings_and_output_weights: expected true or false"),
    ("max_position_embeddings", 64.5, "model.max_position_embeddings: expected an integer"),
    ("norm_epsilon", "tiny", "model.norm_epsilon: expected a number, got 'tiny'"),
    ("num_experts", 0, "model.num_experts must be >= 1"),
])
def test_model_field_types_are_checked_before_any_model_is_built(field, value, error):
    """(They failed inside torch once the model was built, or were taken as they came: "no" is true.)"""
    with pytest.raises(ConfigError, match=re.escape(error)):
        model_config_from({"preset": "tiny-moe", field: value})
    # YAML 1.1 reads 1e-5 as a string, "4" may come from a flag: converted like the run's own fields
    m = model_config_from({"preset": "tiny-moe", "norm_epsilon": "1e-5", "num_experts": "4"})
    assert (m.norm_epsilon, m.num_experts) == (1e-5, 4)


def test_tenant_default_flags_fill_only_missing_fields(tmp_path, data):
    tenants = tmp_path / "tenants"
    tenants.mkdir()
    (tenants / "x.yaml").write_text(f"train_data: {data / 'a/train.jsonl'}\n")
    (tenants / "y.yaml").write_text(f"train_data: {data / 'b/train.jsonl'}\nlr: 5.0e-4\nrank: 2\n")
    run = parse_run_config(["--model", "tiny-dense", "--max-slots", "2", "--max-rank", "8", "--train-iters", "10",
                            "--tenants-dir", str(tenants), "--lr", "1e-3", "--lora-rank", "4",
                            "--global-batch-size", "16", "--lr-decay-style", "linear", "--clip-grad", "0"])
    x, y = (load_tenant_file(tenants / f, run.tenant_defaults) for f in ("x.yaml", "y.yaml"))
    assert (x.name, x.lr, x.rank, x.global_batch_size, x.lr_decay_style, x.clip_grad) == ("x", 1e-3, 4, 16,
                                                                                        "linear", 0.0)
    assert (y.lr, y.rank, y.global_batch_size) == (5e-4, 2, 16)
    assert run.tenant_defaults["lr"] == 1e-3


def test_command_line_paths_are_relative_to_the_working_directory(run_yaml, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "metadata.json").write_text("{}")
    run = parse_run_config(["--config", "run.yaml", "--load-base", "base", "--save", "out"], world_size=2)
    assert run.load_base == "base" and run.save == "out"


def test_world_size_from_environment(run_yaml, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match=r"data-parallel size 1 .* not divisible by expert_model_parallel_size 2"):
        parse_run_config(["--config", str(run_yaml)])
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert parse_run_config(["--config", str(run_yaml)]).expert_model_parallel_size == 2


def test_cli_errors(run_yaml, capsys):
    with pytest.raises(ConfigError, match=r"missing required section\(s\) model, lora .*--model"):
        parse_run_config(["--train-iters", "3"])
    with pytest.raises(SystemExit):
        parse_run_config(["--config", str(run_yaml), "--tensor-model-parallel-size", "two"])
    with pytest.raises(SystemExit):
        parse_run_config(["--config", str(run_yaml), "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_help_and_print_config(run_yaml, capsys):
    text = " ".join(build_parser("train").format_help().split())  # argparse wraps lines
    for expected in ("parallelism:", "LoRA pool:", "tenant defaults:", "--tensor-model-parallel-size TP",
                     "--expert-model-parallel-size EP", "(default: 1234)", "--lr-decay-style", "tiny-moe",
                     "--tenants-dir DIR", "--sequence-parallel, --no-sequence-parallel"):
        assert expected in text, expected
    with pytest.raises(SystemExit) as exit_info:
        parse_run_config(["--config", str(run_yaml), "--train-iters", "9", "--print-config"], world_size=2)
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train_iters"] == 9 and load_run_config(printed).train_iters == 9


def test_an_imported_base_names_its_own_model(raw, tmp_path):
    from megatron_multilora.checkpointing import save_model_config
    from megatron_multilora.config import model_config_from

    base = tmp_path / "base"
    base.mkdir()
    (base / "metadata.json").write_text("{}")  # a dist checkpoint's marker; the weights are not read here
    wanted = model_config_from({"preset": "tiny-dense", "num_layers": 2, "rotary_base": 500000.0})
    save_model_config(base, wanted)
    del raw["model"]
    raw["expert_model_parallel_size"] = 1
    run = load_run_config({**raw, "load_base": str(base)})
    assert run.model == wanted
    with pytest.raises(ConfigError, match="load_base"):
        load_run_config({**raw, "load_base": str(tmp_path / "nowhere")})
    # a flag changes one field of the base's model (it replaced the whole section), which validation then
    # names: the run's model must be the base's, but for what its weights do not fix
    run = load_run_config({**raw, "load_base": str(base)}, {"model": {"hidden_size": 128}})
    assert run.model == model_config_from({**wanted.to_dict(), "hidden_size": 128})
    with pytest.raises(ConfigError, match=r"load_base: .* holds another model than the run's: hidden_size 64 -> "
                                          r"128 \(leave the model section out"):
        validate(run, 2)
    with pytest.raises(ConfigError, match=r"another model than the run.s: rotary_base 500000.0 -> 10000.0 \("):
        check({**raw, "load_base": str(base), "model": {"preset": "tiny-dense", "num_layers": 2}})
    free = {"params_dtype": "bfloat16", "max_position_embeddings": 256, "init_method_std": 0.5}
    check({**raw, "load_base": str(base), "model": {**wanted.to_dict(), **free}})


def test_mixtral_launch_script_makes_a_valid_run(tmp_path):
    """examples/pretrain_mixtral_multilora.sh (a GPU job, never launched here) with torchrun replaced by a stub that
    records its arguments: they parse and validate as its 8-process run (the imported base's tokenizer, the tenants
    dir the script makes), and the template examples/tenant.yaml copied into that dir with its data joins it."""
    from tokenizers import Tokenizer, models

    stub_dir, record = tmp_path / "bin", tmp_path / "argv.json"
    stub_dir.mkdir()
    (stub_dir / "torchrun").write_text(
        f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    (stub_dir / "torchrun").chmod(0o755)
    base, save = tmp_path / "base", tmp_path / "save"
    base.mkdir()
    (base / "metadata.json").write_text("{}")  # what marks a dist_checkpointing directory
    Tokenizer(models.WordLevel({"</s>": 0, "w": 1}, unk_token="w")).save(str(base / "tokenizer.json"))
    env = {**os.environ, "PATH": f"{stub_dir}{os.pathsep}{os.environ['PATH']}", "BASE": str(base), "SAVE": str(save)}
    subprocess.run(["bash", str(REPO / "examples" / "pretrain_mixtral_multilora.sh")], env=env, check=True, timeout=60)
    argv = json.loads(record.read_text())
    assert argv[argv.index("-m") + 1] == "megatron_multilora.train"
    args, world = argv[argv.index("-m") + 2:], int(argv[argv.index("--nproc-per-node") + 1])

    run = parse_run_config(args, world_size=world)
    assert (run.tensor_model_parallel_size, run.sequence_parallel, run.expert_model_parallel_size) == (2, True, 4)
    assert (run.model.num_experts, run.tokenizer, run.tenants) == (8, str(base), [])
    incoming = Path(run.tenants_dir)
    assert incoming == save / "incoming" and incoming.is_dir()

    shutil.copy(REPO / "examples" / "tenant.yaml", incoming / "customer-a.yaml")
    for split in ("train", "valid"):
        write_data(incoming / "data" / "customer-a" / f"{split}.jsonl")
    tenant = load_tenant_file(incoming / "customer-a.yaml", run.tenant_defaults)
    validate_tenant(run, tenant)  # as the job's control-directory reader does
    assert (tenant.name, tenant.rank, tenant.train_iters) == ("customer-a", 16, 2000)
