"""PEFT adapters: tiny random transformers models of every supported architecture (tests/hf_models.py: Llama with
GQA, Mistral, Qwen2 with qkv bias, Mixtral with packed experts, Qwen2-MoE with a gated shared expert, Qwen3-MoE
with head_dim != hidden / heads) are imported as our base; two tenants of different ranks (one rslora, one targeting a
subset) get random nonzero A and B on every target. Each tenant exported with export_peft and loaded with
peft.PeftModel.from_pretrained gives our logits with its slot active (fp32, <= 1e-5 relative);
import_peft(export_peft(x)) is x bit for bit; a PEFT adapter trained elsewhere (separate q/k/v with different
A's, per-module rank / alpha patterns, gate without up) fuses into a bigger rank with the same logits; too big a
rank is refused naming the module; the command line round-trips through a tenant checkpoint; and the trainer
resumes an imported tenant from its checkpoint."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tests.distributed import run_world
from tests.hf_models import ARCHITECTURES, MOE, randomize, rel, tiny_configs

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 320  # >= the byte tokenizer's 258, so the trainer can run the imported base
TOKENS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
MAX_SLOTS, MAX_RANK = 3, 16
TENANTS = [  # name, rank, alpha, rslora, targets (None = the pool's)
    ("lo", 4, 8.0, False, None),
    ("hi", 8, 6.0, True, ("linear_qkv", "linear_fc2", "expert_fc1")),
]
FOREIGN = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"],
               rank_pattern={"k_proj": 2}, alpha_pattern={"v_proj": 4, "o_proj": 16})
FOREIGN_RANK = 4 + 2 + 4  # q, k, v with different A's stack


# --------------------------------------------------------------------------------------------------------
# Worker (one spawned gloo process)
# --------------------------------------------------------------------------------------------------------


def _build(base_dir, targets):
    from megatron_multilora import checkpointing
    from megatron_multilora import model as M
    from megatron_multilora.lora.inject import inject_lora
    from megatron_multilora.lora.slots import SlotTable

    mc = checkpointing.load_base_model_config(base_dir)
    gpt = M.build_gpt_model(mc, M.transformer_config(mc))
    checkpointing.load_base(gpt, base_dir)
    table = SlotTable(MAX_SLOTS, MAX_RANK, targets, seed=1)
    inject_lora(gpt, table)
    gpt.eval()
    return mc, gpt, table


def _logits(gpt, table, slot):
    from megatron_multilora import model as M
    from megatron_multilora.lora.routing import AdapterRouting

    with torch.no_grad(), AdapterRouting([slot] * TOKENS.shape[0], table).active():
        return gpt(TOKENS, M.position_ids(TOKENS), M.causal_attention_mask(TOKENS.shape[1]))


def _tenant_tensors(table, name):
    record = table.record(name)
    return {layer.global_name: tuple(t.detach().clone() for t in layer.slot_shards(record.slot, record.spec.rank))
            for layer in table.layers if layer.lora_kind in record.targets}


def _set_tenant(table, name, spec, tensors):
    slot = table.acquire(name, spec)
    by_name = {layer.global_name: layer for layer in table.layers}
    for layer_name, (a, b) in tensors.items():
        by_name[layer_name].set_slot(slot, a=a, b=b)
    return slot


def _same(x, y):
    return x.keys() == y.keys() and all(torch.equal(x[k][0], y[k][0]) and torch.equal(x[k][1], y[k][1]) for k in x)


def _worker(hf_dirs, root, foreign_dir):
    from megatron_multilora import adapter_checkpoint, hf, platform
    from megatron_multilora import peft as P
    from megatron_multilora.lora.slots import ALL_TARGETS, DENSE_TARGETS, LoRASpec, stable_seed

    root = Path(root)
    for name, hf_dir in hf_dirs.items():
        hf.import_hf(hf_dir, root / f"base_{name}")
    platform.initialize_model_parallel(platform.ParallelLayout(), seed=5)
    out = {"logits": {}, "roundtrip": {}, "files": {}}
    for name in hf_dirs:
        arch = hf.hf_architecture(hf.read_hf_config(hf_dirs[name]))
        moe = name in MOE
        mc, gpt, table = _build(root / f"base_{name}", ALL_TARGETS if moe else DENSE_TARGETS)
        for tenant, rank, alpha, rslora, targets in TENANTS:
            targets = None if targets is None else tuple(t for t in targets if t in table.target_modules)
            spec = LoRASpec(rank=rank, alpha=alpha, target_modules=targets, rslora=rslora)
            slot = table.acquire(tenant, spec)
            for layer in table.layers:
                if layer.lora_kind in table.record(tenant).targets:
                    g = torch.Generator().manual_seed(stable_seed(tenant, layer.global_name))
                    layer.set_slot(slot, a=0.2 * torch.randn(layer.global_shape("a", rank), generator=g),
                                   b=0.2 * torch.randn(layer.global_shape("b", rank), generator=g))
            out["logits"][(name, tenant)] = _logits(gpt, table, slot)
            tensors = _tenant_tensors(table, tenant)
            assert all(a.abs().min() > 0 and b.abs().min() > 0 for a, b in tensors.values())
            # the kinds the tenant adapts in this model (Mixtral has no dense or shared-expert fc1 / fc2)
            kinds = tuple(sorted({layer.lora_kind for layer in table.layers
                                  if layer.lora_kind in table.record(tenant).targets}))
            full_spec = LoRASpec(rank=rank, alpha=alpha, target_modules=kinds, rslora=rslora)
            peft_dir = root / f"peft_{name}_{tenant}"
            state, config = P.export_peft(tensors, full_spec, mc, arch)
            P.write_peft_dir(peft_dir, state, config)
            out["files"][(name, tenant)] = str(peft_dir)
            spec2, tensors2 = P.import_peft(peft_dir, mc, MAX_RANK)
            out["roundtrip"][(name, tenant)] = dict(
                same=_same(tensors, tensors2), spec=(spec2.rank, spec2.alpha, spec2.rslora, spec2.target_modules),
                want=(rank, alpha, rslora, full_spec.target_modules), config=config)
        if name == "llama":
            # an adapter trained elsewhere: q/k/v with different A's, rank / alpha patterns, gate without up
            spec, tensors = P.import_peft(foreign_dir, mc, MAX_RANK)
            table.release("hi")
            slot = _set_tenant(table, "foreign", spec, tensors)
            out["logits"][("llama", "foreign")] = _logits(gpt, table, slot)
            out["foreign_spec"] = (spec.rank, spec.alpha, spec.target_modules)
            try:
                P.import_peft(foreign_dir, mc, FOREIGN_RANK - 1)
                out["too_big"] = None
            except P.PeftFormatError as e:
                out["too_big"] = str(e)
            save = root / "save"
            adapter_checkpoint.write_tenant_checkpoint(save, "foreign", spec, tensors)
            spec3, tensors3 = adapter_checkpoint.read_tenant_checkpoint(save / "tenants" / "foreign")
            out["checkpoint_roundtrip"] = _same(tensors, tensors3) and spec3 == spec
            out["foreign_tensors"] = tensors
    platform.destroy()
    return out


def _cli(*args):
    """tools/convert_checkpoint.py in a fresh process, as a user runs it (no process group, no patches yet)."""
    return subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), *args],
                          capture_output=True, text=True, timeout=300)


def _cli_round_trip(root, src, foreign_dir):
    """PEFT -> tenant checkpoint -> PEFT on the command line, for the MoE tenant with expert LoRA; then too big
    a rank (exit code 2, nothing written)."""
    save, base = root / "cli_save", str(root / "base_qwen2moe")
    imported = _cli("import-peft", "--peft-dir", src, "--base", base, "--name", "moe", "--save", str(save),
                    "--max-rank", str(MAX_RANK))
    assert imported.returncode == 0, imported.stderr[-3000:]
    exported = _cli("export-peft", "--tenant-checkpoint", str(save / "tenants" / "moe"), "--base", base,
                    "--out", str(root / "cli_peft"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    too_big = _cli("import-peft", "--peft-dir", foreign_dir, "--base", str(root / "base_llama"), "--name", "x",
                   "--save", str(root / "cli_save_2"), "--max-rank", "4")
    return dict(cli_too_big=too_big.returncode, cli_save_2_exists=(root / "cli_save_2").exists())


def _trainer_resumes(root, spec_fields, data, load="save", import_dtype=None, run_dtype="float32"):
    """The trainer (its params in `run_dtype`), told about the imported tenant, resumes it from
    <load>/tenants/foreign (first written there in `import_dtype`, as import-peft writes it for a base of that
    dtype, when given) and saves it; returns what it loaded, the tenant checkpoint it saved, and the one import
    wrote (None without `import_dtype`), each read as export-peft reads them."""
    from megatron_multilora.adapter_checkpoint import read_tenant_checkpoint
    from megatron_multilora.config import load_run_config
    from megatron_multilora.training import MultiLoRATrainer

    root = Path(root)
    if import_dtype is not None:
        from megatron_multilora import adapter_checkpoint

        spec, tensors = adapter_checkpoint.read_tenant_checkpoint(root / "save" / "tenants" / "foreign")
        adapter_checkpoint.write_tenant_checkpoint(root / load, "foreign", spec, tensors,
                                                   dtype=getattr(torch, import_dtype))
    imported = read_tenant_checkpoint(root / load / "tenants" / "foreign") if import_dtype else None
    cfg = {
        "model": {"preset": str(root / "base_llama" / "model.yaml"), "params_dtype": run_dtype},
        "load_base": str(root / "base_llama"),
        "lora": {"max_slots": 2, "max_rank": MAX_RANK},
        "tenants": [dict(name="foreign", lr=1e-3, train_data=data, **spec_fields)],
        "seq_length": 16, "micro_batch_size": 2, "train_iters": 1, "load": str(root / load),
        "save": str(root / f"{load}_resumed"), "eval_interval": None, "seed": 7,
    }
    trainer = MultiLoRATrainer(load_run_config(cfg))
    try:
        slot = trainer.tenants["foreign"].slot
        record = trainer.table.record("foreign")
        loaded = {layer.global_name: tuple(t.detach().clone() for t in layer.slot_shards(slot, record.spec.rank))
                  for layer in trainer.table.layers if layer.lora_kind in record.targets}
        trainer.save_tenant("foreign")  # the trainer's own checkpoint reads back as full tensors
        saved = read_tenant_checkpoint(root / f"{load}_resumed" / "tenants" / "foreign")
        return loaded, saved, imported
    finally:
        trainer.close()


# --------------------------------------------------------------------------------------------------------


def _foreign_adapter(model, directory):
    """A PEFT adapter as another trainer would write it (random nonzero weights), and its logits."""
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(model), LoraConfig(**FOREIGN, init_lora_weights=False))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(directory)
    pm.eval()
    with torch.no_grad():
        return pm(TOKENS).logits


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("peft")
    hf_dirs, models = {}, {}
    for name, config in tiny_configs(VOCAB).items():
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
        randomize(model)
        hf_dirs[name] = str(root / f"hf_{name}")
        model.save_pretrained(hf_dirs[name])
        models[name] = model
    foreign_dir = str(root / "peft_foreign")
    reference = {("llama", "foreign"): _foreign_adapter(models["llama"], foreign_dir)}
    out = run_world(_worker, 1, hf_dirs, str(root), foreign_dir)[0]
    out.update(_cli_round_trip(root, out["files"][("qwen2moe", "lo")], foreign_dir))
    return dict(out=out, models=models, root=root, reference=reference, hf_dirs=hf_dirs, foreign_dir=foreign_dir)


def _peft_logits(model, peft_dir):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(copy.deepcopy(model), peft_dir).eval()
    with torch.no_grad():
        return pm(TOKENS).logits


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize("tenant", ["lo", "hi"])
def test_exported_adapter_gives_our_logits_in_peft(results, name, tenant):
    ours = results["out"]["logits"][(name, tenant)]
    theirs = _peft_logits(results["models"][name], results["out"]["files"][(name, tenant)])
    with torch.no_grad():
        base = results["models"][name](TOKENS).logits
    assert rel(ours, base) > 1e-2  # the adapter matters
    assert rel(ours, theirs) <= 1e-5, rel(ours, theirs)


def test_export_layout(results):
    from safetensors.torch import load_file

    files = results["out"]["files"]
    cfg = results["out"]["roundtrip"][("mixtral", "lo")]["config"]
    assert cfg["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert cfg["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"], cfg["rank_pattern"]) == (4, 8, False, {})
    state = load_file(str(Path(files[("mixtral", "lo")]) / "adapter_model.safetensors"))
    pre = "base_model.model.model.layers.1."
    assert state[pre + "mlp.experts.base_layer.lora_A.weight"].shape == (4 * 4, 64)  # gate_up: inner wrapper
    assert state[pre + "mlp.experts.base_layer.lora_B.weight"].shape == (2 * 48, 4 * 4)
    assert state[pre + "mlp.experts.lora_A.weight"].shape == (4 * 4, 48)  # down_proj: outer wrapper
    assert state[pre + "self_attn.k_proj.lora_B.weight"].shape == (32, 4)  # GQA: 2 kv heads of 16
    assert torch.equal(state[pre + "self_attn.q_proj.lora_A.weight"], state[pre + "self_attn.v_proj.lora_A.weight"])
    # hi targets only gate_up among the experts: not nested; rslora
    hi = load_file(str(Path(files[("mixtral", "hi")]) / "adapter_model.safetensors"))
    assert hi[pre + "mlp.experts.lora_A.weight"].shape == (4 * 8, 64)
    cfg = results["out"]["roundtrip"][("qwen2moe", "hi")]["config"]
    assert cfg["target_parameters"] == ["mlp.experts.gate_up_proj"] and cfg["use_rslora"]
    assert cfg["target_modules"] == ["down_proj", "k_proj", "q_proj", "v_proj"]  # shared expert's down_proj
    qwen = load_file(str(Path(files[("qwen2moe", "lo")]) / "adapter_model.safetensors"))
    assert pre + "mlp.shared_expert.gate_proj.lora_A.weight" in qwen


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize("tenant", ["lo", "hi"])
def test_import_of_export_is_bit_exact(results, name, tenant):
    r = results["out"]["roundtrip"][(name, tenant)]
    assert r["same"]
    assert r["spec"] == r["want"]


def test_separate_qkv_adapters_fuse_with_the_same_logits(results):
    out = results["out"]
    rank, alpha, targets = out["foreign_spec"]
    assert rank == FOREIGN_RANK and targets == ("linear_fc1", "linear_proj", "linear_qkv")
    assert alpha == 8 / 4 * FOREIGN_RANK  # the adapter's default scale, at the grown rank
    ours, theirs = out["logits"][("llama", "foreign")], results["reference"][("llama", "foreign")]
    assert rel(ours, theirs) <= 1e-5, rel(ours, theirs)
    # o_proj (rank 4 of 10, its own alpha) is zero-padded with its scale folded into B
    a, b = out["foreign_tensors"]["decoder.layers.0.self_attention.linear_proj"]
    assert a[4:].abs().max() == 0 and b[:, 4:].abs().max() == 0 and a[:4].abs().min() > 0


def test_fused_rank_above_max_rank_is_refused(results):
    msg = results["out"]["too_big"]
    assert msg is not None
    for word in ("q_proj", "k_proj", "v_proj", "linear_qkv", f"rank {FOREIGN_RANK}", f"max_rank {FOREIGN_RANK - 1}"):
        assert word in msg, msg
    assert results["out"]["cli_too_big"] == 2 and not results["out"]["cli_save_2_exists"]


def test_cli_round_trip_through_a_tenant_checkpoint(results):
    from safetensors.torch import load_file

    root = results["root"]
    src = load_file(str(Path(results["out"]["files"][("qwen2moe", "lo")]) / "adapter_model.safetensors"))
    back = load_file(str(root / "cli_peft" / "adapter_model.safetensors"))
    assert src.keys() == back.keys()
    assert all(torch.equal(src[k], back[k]) for k in src)
    assert (root / "cli_save" / "tenants" / "moe" / "iter_0000000" / "tenant.yaml").is_file()


def test_trainer_resumes_an_imported_tenant(results):
    from tests.tenant_runs import make_data

    out = results["out"]
    assert out["checkpoint_roundtrip"]
    rank, alpha, targets = out["foreign_spec"]
    data = str(make_data(results["root"], "foreign-train", 8, 0))
    fields = dict(rank=rank, alpha=alpha, target_modules=list(targets))
    loaded, (spec, saved), _ = run_world(_trainer_resumes, 1, str(results["root"]), fields, data)[0]
    assert _same(loaded, out["foreign_tensors"])
    assert _same(saved, out["foreign_tensors"]) and (spec.rank, spec.alpha, spec.target_modules) == out["foreign_spec"]
    # exported against another model than the one it trained on: named, with the base it recorded (this was
    # "adapter tensor ... names no LoRA layer of this model config"), nothing written
    root = results["root"]
    wrong = _cli("export-peft", "--tenant-checkpoint", str(root / "save_resumed" / "tenants" / "foreign"),
                 "--model", "tiny-dense", "--out", str(root / "wrong_peft"))
    assert wrong.returncode == 2 and not (root / "wrong_peft").exists()
    assert "tenant 'foreign' was trained on another model than the one given: num_layers" in wrong.stderr
    assert wrong.stderr.rstrip().endswith(f"(give its base: --base {(root / 'base_llama').resolve()})")
    # imported for a bf16 base (import-peft writes the base's dtype): the fp32 adapter is kept as its masters --
    # every bit, not the bf16 rounding -- which export-peft reads, an fp32 run takes as its weights, and a bf16
    # run trains (its own checkpoint's masters, read back)
    loaded, _, (_, imported) = run_world(_trainer_resumes, 1, str(results["root"]), fields, data, "save_bf16",
                                         "bfloat16")[0]
    assert _same(imported, out["foreign_tensors"]) and _same(loaded, out["foreign_tensors"])
    _, (_, saved), _ = run_world(_trainer_resumes, 1, str(results["root"]), fields, data, "save_bf16_run",
                                 "bfloat16", "bfloat16")[0]
    assert _same(saved, out["foreign_tensors"])


def test_per_expert_adapters_import_like_packed_ones(results):
    """Per-expert modules (transformers 4's block_sparse_moe.experts.{e}.w1 / w3 / w2) fuse like the packed
    target_parameters layout they correspond to."""
    from megatron_multilora import hf
    from megatron_multilora import peft as P

    peft_dir = Path(results["out"]["files"][("mixtral", "lo")])
    config, state = P.read_peft_dir(peft_dir)
    mc = hf.model_config_from_hf(results["hf_dirs"]["mixtral"])
    spec, packed = P.import_peft(peft_dir, mc, MAX_RANK)
    per_expert = {k: v for k, v in state.items() if ".experts." not in k}
    n, r, f = mc.num_experts, spec.rank, mc.moe_ffn_hidden_size
    for layer in range(mc.num_layers):
        pre = f"base_model.model.model.layers.{layer}."
        for inner, parts in (("base_layer.", (("w1", slice(0, f)), ("w3", slice(f, 2 * f)))), ("", (("w2", None),))):
            a = state[f"{pre}mlp.experts.{inner}lora_A.weight"]
            b = state[f"{pre}mlp.experts.{inner}lora_B.weight"].reshape(-1, r, n)
            for e in range(n):
                for w, rows in parts:
                    key = f"{pre}block_sparse_moe.experts.{e}.{w}."
                    per_expert[key + "lora_A.weight"] = a[e * r:(e + 1) * r]
                    per_expert[key + "lora_B.weight"] = b[:, :, e] if rows is None else b[rows, :, e]
    config = {**config, "target_parameters": None, "target_modules": config["target_modules"] + ["w1", "w2", "w3"]}
    spec2, tensors = P.import_peft((config, per_expert), mc, MAX_RANK)
    assert spec2 == spec and _same(tensors, packed)


def test_export_into_a_non_empty_directory_is_refused_before_any_work(tmp_path, capsys):
    """The output directory is checked first (the tenant checkpoint here does not even exist), and what is in
    it stays."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    try:
        import convert_checkpoint
    finally:
        sys.path.pop(0)
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert convert_checkpoint.main(["export-peft", "--tenant-checkpoint", str(tmp_path / "missing"),
                                    "--out", str(out), "--model", "tiny-dense"]) == 2
    assert f"{out} exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    assert convert_checkpoint.main(["export-peft", "--tenant-checkpoint", str(tmp_path / "missing"),
                                    "--out", str(a_file), "--model", "tiny-dense"]) == 2
    assert f"{a_file} exists and is not a directory" in capsys.readouterr().err and a_file.read_text() == "mine"
    # a run's --save directory instead of one of its tenants: the tenants are named
    run_dir = tmp_path / "run"
    (run_dir / "tenants" / "alice").mkdir(parents=True)
    (run_dir / "latest_checkpointed_iteration.txt").write_text("4\n")
    assert convert_checkpoint.main(["export-peft", "--tenant-checkpoint", str(run_dir), "--out",
                                    str(tmp_path / "new"), "--model", "tiny-dense"]) == 2
    err = capsys.readouterr().err
    assert f"{run_dir} is a run's checkpoint directory: give one of its tenants" in err and "(alice)" in err


def test_an_adapter_and_a_base_of_different_depth_are_refused(results):
    """An adapter of a 2-layer model against a 4-layer base (or the reverse, exporting): without
    layers_to_transform PEFT adapted every layer, so the missing ones mean another base -- not zeros."""
    import dataclasses

    from megatron_multilora import peft as P
    from megatron_multilora.checkpointing import load_base_model_config

    mc = load_base_model_config(results["root"] / "base_llama")
    deeper = dataclasses.replace(mc, num_layers=4)
    exported = results["out"]["files"][("llama", "lo")]
    with pytest.raises(P.PeftFormatError, match=r"adapts layers \[0, 1\] but this base has 4 layers"):
        P.import_peft(exported, deeper, MAX_RANK)
    spec, tensors = P.import_peft(exported, mc, MAX_RANK)
    with pytest.raises(P.PeftFormatError, match=r"no weights for \d+ .*layers of this model config \(first: "
                                                r"decoder\.layers\.2\..*is the model config the adapter's base"):
        P.export_peft(tensors, spec, deeper)
    # an adapter that says it adapts only some layers imports, the others without a delta
    config, state = P.read_peft_dir(exported)
    for limited in ({**config, "layers_to_transform": [0, 1]}, {**config, "exclude_modules": ["o_proj"]},
                    {**config, "target_modules": r".*\.(q|k|v|o)_proj"},
                    {**config, "target_modules": [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]}):
        _, got = P.import_peft((limited, state), deeper, MAX_RANK)
        assert all(not b.any() for name, (_, b) in got.items() if ".layers.2." in name or ".layers.3." in name)
        assert any(b.any() for name, (_, b) in got.items() if ".layers.1." in name)


@pytest.mark.parametrize("change,named", [
    ({"alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens set (aLoRA"),
    ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights='pissa_niter_4' (PEFT changes the base weights"),
    ({"init_lora_weights": "olora"}, "init_lora_weights='olora'"),
    ({"init_lora_weights": "loftq"}, "init_lora_weights='loftq'"),
    ({"use_dora": True}, "use_dora=true (DoRA"),
    ({"bias": "lora_only"}, "bias='lora_only'"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save=['lm_head']"),
])
def test_adapters_that_are_not_plain_lora_are_refused_by_name(results, change, named):
    """PEFT variants that add no tensors of their own (aLoRA applies the adapter only after its invocation
    tokens; PiSSA / OLoRA / LoftQ / CorDA / LoRA-GA adapters are applied to a base PEFT re-initialises at load)
    imported as plain LoRA without a word, and gave other logits than PEFT's."""
    from megatron_multilora import peft as P
    from megatron_multilora.checkpointing import load_base_model_config

    mc = load_base_model_config(results["root"] / "base_llama")
    config, state = P.read_peft_dir(results["out"]["files"][("llama", "lo")])
    with pytest.raises(P.PeftFormatError, match=re.escape(named)):
        P.import_peft(({**config, **change}, state), mc, MAX_RANK)
    for harmless in (True, False, "gaussian", "eva"):  # initialisations of the adapter alone
        P.import_peft(({**config, "init_lora_weights": harmless}, state), mc, MAX_RANK)
