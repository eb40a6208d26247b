"""Hugging Face import: tiny random transformers models (tests/hf_models.py: Llama with GQA and a sharded
safetensors save, Mistral, Qwen2 with qkv bias and tied embeddings, Mixtral, Qwen2-MoE with a gated shared expert
and pre-softmax routing, Qwen3-MoE with q/k norms and head_dim != hidden / heads) are saved with save_pretrained,
imported (the Llama one through the command line, with its tokenizer.json), and our GPTModel loaded from the
import gives transformers' logits at TP=1 and at TP=2 (dense) / EP=2 (MoE). A Megatron-LM-style torch_dist save
directory of the imported Llama loads too."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed import run_world
from tests.hf_models import ARCHITECTURES, MOE, randomize, rel, tiny_configs

ROOT = Path(__file__).resolve().parent.parent
TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, rms_norm_eps=1e-5)








# --------------------------------------------------------------------------------------------------------
# Worker functions (run in spawned gloo processes)
# --------------------------------------------------------------------------------------------------------


def _forward(base_dir, layout):
    """Our model at a layout, loaded from base_dir with the config of base_dir: full-vocab logits [b, s, v]."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_multilora import checkpointing, platform
    from megatron_multilora import model as M

    tp, ep = layout.get("tp", 1), layout.get("ep", 1)
    platform.initialize_model_parallel(platform.ParallelLayout(tp, 1, ep, False), seed=5)
    mc = checkpointing.load_base_model_config(base_dir)
    gpt = M.build_gpt_model(mc, M.transformer_config(mc, tensor_model_parallel_size=tp,
                                                     expert_model_parallel_size=ep))
    checkpointing.load_base(gpt, base_dir)
    gpt.eval()
    with torch.no_grad():
        logits = gpt(TOKENS, M.position_ids(TOKENS), M.causal_attention_mask(TOKENS.shape[1]))
        return gather_from_tensor_model_parallel_region(logits)


def _write_megatron_lm_save(base_dir, save_dir):
    """A Megatron-LM-style save dir of our base checkpoint: <save>/latest_checkpointed_iteration.txt and
    iter_0000007/ holding {"model": sharded_state_dict, "args": Namespace, ...} (what Megatron-LM's torch_dist
    save writes), with MoE pre-MLP norms under the key Megatron-LM's transformer-engine spec uses."""
    from argparse import Namespace

    from megatron.core import dist_checkpointing

    from megatron_multilora import checkpointing
    from megatron_multilora import model as M

    mc = checkpointing.load_base_model_config(base_dir)
    gpt = M.build_gpt_model(mc, M.transformer_config(mc))
    checkpointing.load_base(gpt, base_dir)
    args = Namespace(
        num_layers=mc.num_layers, hidden_size=mc.hidden_size, num_attention_heads=mc.num_attention_heads,
        group_query_attention=True, num_query_groups=mc.num_query_groups, ffn_hidden_size=mc.ffn_hidden_size,
        kv_channels=mc.hidden_size // mc.num_attention_heads, padded_vocab_size=mc.vocab_size,
        max_position_embeddings=mc.max_position_embeddings, rotary_base=int(mc.rotary_base),
        norm_epsilon=mc.norm_epsilon, untie_embeddings_and_output_weights=True, add_qkv_bias=False,
        add_bias_linear=False, normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
        rotary_percent=1.0, num_experts=mc.num_experts, bf16=False, fp16=False, params_dtype=torch.float32,
    )
    sharded = checkpointing._base_sharded_state_dict(gpt)
    if mc.is_moe:
        args.__dict__.update(moe_router_topk=mc.moe_router_topk, moe_ffn_hidden_size=mc.moe_ffn_hidden_size,
                             moe_router_pre_softmax=mc.moe_router_pre_softmax, moe_layer_freq=1,
                             moe_router_score_function="softmax")
        for t in sharded.values():
            if t.key.endswith(".mlp.linear_fc1.layer_norm_weight"):
                t.key = t.key.replace(".mlp.linear_fc1.layer_norm_weight", ".pre_mlp_layernorm.weight")
    iter_dir = Path(save_dir) / "iter_0000007"
    iter_dir.mkdir(parents=True)
    dist_checkpointing.save({"model": sharded, "args": args, "iteration": 7, "checkpoint_version": 3.0},
                            str(iter_dir))
    (Path(save_dir) / "latest_checkpointed_iteration.txt").write_text("7")


def _import_and_forward(hf_dirs, base_dirs, megatron_lm_saves):
    from megatron_multilora import hf, platform

    platform.initialize_model_parallel(platform.ParallelLayout(), seed=5)
    out = {}
    for name, hf_dir in hf_dirs.items():
        if name != "llama":  # llama was imported by the command line
            hf.import_hf(hf_dir, base_dirs[name])
        out[name] = _forward(base_dirs[name], {})
    for name, save_dir in megatron_lm_saves.items():
        _write_megatron_lm_save(base_dirs[name], save_dir)
        out["megatron_lm_" + name] = _forward(save_dir, {})
    return out


def _load_at_layouts(base_dirs, megatron_lm_saves):
    out = {}
    for name, base_dir in base_dirs.items():
        out[name] = _forward(base_dir, {"ep": 2} if name in MOE else {"tp": 2})
    for name, save_dir in megatron_lm_saves.items():
        out["megatron_lm_" + name] = _forward(save_dir, {"ep": 2} if name in MOE else {"tp": 2})
    return out


# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf_import")
    hf_dirs, base_dirs, reference, hf_models = {}, {}, {}, {}
    for name, config in tiny_configs(128).items():
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
        randomize(model)
        hf_dirs[name], base_dirs[name] = str(root / f"hf_{name}"), str(root / f"base_{name}")
        # llama: sharded (model.safetensors.index.json + several files)
        model.save_pretrained(hf_dirs[name], max_shard_size="40KB" if name == "llama" else "50GB")
        with torch.no_grad():
            reference[name] = model(TOKENS).logits
        hf_models[name] = model
    assert (Path(hf_dirs["llama"]) / "model.safetensors.index.json").exists()
    from tokenizers import Tokenizer, models  # the llama directory has a tokenizer, as a hub model does

    Tokenizer(models.WordLevel({"</s>": 0, **{f"w{i}": i for i in range(1, 40)}}, unk_token="w1")).save(
        str(Path(hf_dirs["llama"]) / "tokenizer.json"))
    (Path(hf_dirs["llama"]) / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")

    cli = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "import-hf",
         "--hf-dir", hf_dirs["llama"], "--save", base_dirs["llama"]],
        capture_output=True, text=True, timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    megatron_lm_saves = {name: str(root / f"megatron_lm_{name}") for name in ("llama", "mixtral")}
    tp1 = run_world(_import_and_forward, 1, hf_dirs, base_dirs, megatron_lm_saves)[0]
    parallel = run_world(_load_at_layouts, 2, base_dirs, megatron_lm_saves)
    return dict(reference=reference, tp1=tp1, parallel=parallel, hf_dirs=hf_dirs, base_dirs=base_dirs,
                hf_models=hf_models)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_logits_match_transformers_tp1(results, name):
    got, ref = results["tp1"][name], results["reference"][name]
    assert got.shape == ref.shape
    assert rel(got, ref) <= 1e-5, rel(got, ref)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_logits_match_transformers_tp2_or_ep2(results, name):
    ref = results["reference"][name]
    for rank_logits in results["parallel"]:
        assert rank_logits[name].shape == ref.shape
        assert rel(rank_logits[name], ref) <= 1e-5, rel(rank_logits[name], ref)


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_megatron_lm_save_dir_loads(results, name):
    """`--load-base <save>` with latest_checkpointed_iteration.txt, the model config from the stored Megatron-LM
    args, and (MoE) the pre-MLP norm under transformer-engine's key: TP=1 and TP=2 / EP=2."""
    ref = results["reference"][name]
    assert rel(results["tp1"]["megatron_lm_" + name], ref) <= 1e-5
    for rank_logits in results["parallel"]:
        assert rel(rank_logits["megatron_lm_" + name], ref) <= 1e-5


def test_tokenizer_travels_with_the_base(results, tmp_path):
    """import-hf copies the model's tokenizer.json (and chat template) next to the base, and `--load-base B
    --tokenizer B` is a valid run (the launch scripts pass exactly that); a model without one gets none. Without
    --tokenizer a run takes the base's (the byte-level one would feed the base unrelated token ids); `--tokenizer byte` keeps it."""
    from megatron_multilora.arguments import parse_run_config
    from megatron_multilora.checkpointing import load_base_model_config

    base, hf_dir = Path(results["base_dirs"]["llama"]), Path(results["hf_dirs"]["llama"])
    for name in ("tokenizer.json", "chat_template.jinja"):  # (a chat template: what 'messages' samples need)
        assert (base / name).read_bytes() == (hf_dir / name).read_bytes()
    assert not (Path(results["base_dirs"]["qwen2"]) / "tokenizer.json").exists()
    data = tmp_path / "a.jsonl"
    data.write_text('{"text": "w1 w2 w3"}\n')
    tenants = tmp_path / "tenants"
    tenants.mkdir()
    (tenants / "a.yaml").write_text(f"rank: 4\nlr: 1.0e-3\ntrain_data: {data}\n")
    flags = ["--tenants-dir", str(tenants), "--max-slots", "2", "--max-rank", "4", "--train-iters", "5"]
    run = parse_run_config(["--load-base", str(base), "--tokenizer", str(base), *flags], world_size=1)
    assert run.model.hidden_size == load_base_model_config(base).hidden_size and run.tokenizer == str(base)
    assert parse_run_config(["--load-base", str(base), *flags], world_size=1).tokenizer == str(base / "tokenizer.json")
    from megatron_multilora.config import ConfigError, load_run_config

    # (this base's vocabulary is smaller than the byte-level tokenizer's: refused, which shows it is the one)
    with pytest.raises(ConfigError, match="byte-level tokenizer needs model.vocab_size"):
        parse_run_config(["--load-base", str(base), "--tokenizer", "byte", *flags], world_size=1)
    # an explicit "byte" stays so through the run's written configuration (to_dict / --print-config)
    explicit = load_run_config({"load_base": str(base), "tokenizer": "byte", "lora": {"max_slots": 1, "max_rank": 4},
                                "train_iters": 1})
    assert explicit.byte_tokenizer and load_run_config(explicit.to_dict()).byte_tokenizer


def test_model_yaml_written(results):
    from megatron_multilora.checkpointing import load_base_model_config

    mc = load_base_model_config(results["base_dirs"]["qwen3moe"])
    assert (mc.kv_channels, mc.qk_layernorm, mc.num_experts, mc.moe_router_pre_softmax) == (32, True, 4, False)
    mc = load_base_model_config(results["base_dirs"]["qwen2moe"])
    assert (mc.moe_shared_expert_intermediate_size, mc.moe_shared_expert_gate, mc.moe_router_pre_softmax,
            mc.add_qkv_bias) == (48, True, True, True)
    mc = load_base_model_config(results["base_dirs"]["qwen2"])
    assert (mc.untie_embeddings_and_output_weights, mc.add_qkv_bias, mc.rotary_base) == (False, True, 20000.0)


@pytest.mark.parametrize("name", ["mixtral", "qwen2moe"])
def test_packed_experts_convert_like_saved_ones(results, name):
    """transformers 5 keeps experts packed in memory (gate_up_proj [E, 2*ffn, h], down_proj [E, h, ffn]) and
    save_pretrained writes them per expert: both layouts convert to the same megatron tensors."""
    from megatron_multilora import hf

    hf_dir = results["hf_dirs"][name]
    config = hf.read_hf_config(hf_dir)
    mc = hf.model_config_from_hf(config)
    in_memory = results["hf_models"][name].state_dict()
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in in_memory)
    packed = hf.convert_hf_state_dict(in_memory, config, mc)
    saved = hf.convert_hf_state_dict(hf.HFCheckpoint(hf_dir), config, mc)
    assert packed.keys() == saved.keys()
    for k in saved:
        assert torch.equal(packed[k], saved[k]), k


# --------------------------------------------------------------------------------------------------------
# Config mapping and errors (no model, no process group)
# --------------------------------------------------------------------------------------------------------


def _convert_checkpoint():
    """tools/convert_checkpoint.py as a module (its main() returns the exit code a user would see)."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import convert_checkpoint
    finally:
        sys.path.pop(0)
    return convert_checkpoint


def test_unsupported_architecture_lists_supported(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from megatron_multilora import hf

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(
        tmp_path / "gpt2"
    )
    with pytest.raises(hf.UnsupportedModelError) as e:
        hf.model_config_from_hf(tmp_path / "gpt2")
    for word in ("GPT2LMHeadModel", "LlamaForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM"):
        assert word in str(e.value)
    convert_checkpoint = _convert_checkpoint()
    assert convert_checkpoint.main(["import-hf", "--hf-dir", str(tmp_path / "gpt2"), "--save",
                                    str(tmp_path / "out")]) == 2
    assert "GPT2LMHeadModel is not supported" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _config(kind, **kw):
    from transformers import LlamaConfig, MistralConfig, Qwen2MoeConfig

    cls = dict(llama=LlamaConfig, mistral=MistralConfig, qwen2moe=Qwen2MoeConfig)[kind]
    d = cls(**COMMON, intermediate_size=96, **kw).to_dict()
    d["architectures"] = [cls.__name__.replace("Config", "ForCausalLM")]
    return d


@pytest.mark.parametrize("kind,kw,expected", [
    ("llama", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 32}), "RoPE scaling 'llama3'"),
    ("llama", dict(attention_bias=True), "attention_bias=true"),
    ("llama", dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    ("qwen2moe", dict(num_experts=4, mlp_only_layers=[1]), "dense layers between MoE layers"),
])
def test_unsupported_features_are_named(kind, kw, expected):
    from megatron_multilora import hf

    with pytest.raises(hf.UnsupportedModelError, match="supported Hugging Face architectures") as e:
        hf.model_config_from_hf(_config(kind, **kw))
    assert expected in str(e.value)


def test_sliding_window_caps_max_positions(capsys):
    from megatron_multilora import hf

    notes = []
    mc = hf.model_config_from_hf(_config("mistral", sliding_window=32), notes=notes)
    assert mc.max_position_embeddings == 32 and "sliding_window 32" in notes[0]
    assert hf.model_config_from_hf(_config("mistral", sliding_window=None)).max_position_embeddings == 64


def test_a_run_cannot_lift_the_sliding_window_cap(tmp_path):
    """The imported model records its window: max_position_embeddings (a field a run may otherwise change) can
    not exceed it, and a model section without it is another model than the base (it trained with full
    attention past the window, another model than Mistral's, with no word)."""
    from megatron_multilora import hf
    from megatron_multilora.checkpointing import save_model_config
    from megatron_multilora.config import ConfigError, load_run_config, model_config_from, validate

    mc = hf.model_config_from_hf(_config("mistral", sliding_window=32))
    assert mc.sliding_window == 32 and hf.model_config_from_hf(_config("mistral", sliding_window=None)).sliding_window \
        is None
    with pytest.raises(ConfigError, match="max_position_embeddings 4096 exceeds sliding_window 32"):
        model_config_from({**mc.to_dict(), "max_position_embeddings": 4096})
    wide = hf.model_config_from_hf(_config("mistral", sliding_window=128))  # (wider than its 64 positions)
    assert (wide.max_position_embeddings, wide.sliding_window) == (64, 128)
    with pytest.raises(ConfigError, match="max_position_embeddings 4096 exceeds sliding_window 128"):
        model_config_from({**wide.to_dict(), "max_position_embeddings": 4096})
    base = tmp_path / "base"
    base.mkdir()
    (base / "metadata.json").write_text("{}")  # (the model is all this check reads of a base)
    save_model_config(base, mc)
    run = {"load_base": str(base), "lora": {"max_slots": 1, "max_rank": 4}, "train_iters": 1, "tenants": [],
           "model": {**mc.to_dict(), "sliding_window": None, "max_position_embeddings": 4096}}
    with pytest.raises(ConfigError, match="holds another model than the run's: sliding_window 32 -> None"):
        validate(load_run_config(run))


def test_a_float16_checkpoint_imports_as_bfloat16():
    """Runs refuse fp16 (no loss scaling), so a float16 checkpoint (Llama-2's config says so) imports as bf16."""
    from megatron_multilora import hf

    notes: list[str] = []
    assert hf.model_config_from_hf(_config("llama", torch_dtype="float16"), notes=notes).params_dtype == "bfloat16"
    assert "the checkpoint is float16: imported as bfloat16" in notes[0]
    assert hf.model_config_from_hf(_config("llama", torch_dtype="float16"), params_dtype="float32").params_dtype \
        == "float32"


def test_print_config(results, capsys):
    import yaml

    convert_checkpoint = _convert_checkpoint()
    assert convert_checkpoint.main(["import-hf", "--hf-dir", results["hf_dirs"]["mixtral"], "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["num_experts"] == 4 and printed["moe_router_pre_softmax"] is False
    assert printed["moe_ffn_hidden_size"] == 48 and printed["rotary_base"] == 1e6


def test_missing_tensor_is_named(results):
    from megatron_multilora import hf

    config = hf.read_hf_config(results["hf_dirs"]["llama"])
    state = dict(results["hf_models"]["llama"].state_dict())
    del state["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(hf.HFCheckpointError, match="lacks model.layers.1.self_attn.k_proj.weight"):
        hf.convert_hf_state_dict(state, config, hf.model_config_from_hf(config))


def test_a_truncated_safetensors_file_is_named(results, tmp_path, capsys):
    """(A half-finished download: the safetensors library's own error, with no file name, was a traceback.)"""
    convert_checkpoint = _convert_checkpoint()
    broken = tmp_path / "hf"
    shutil.copytree(results["hf_dirs"]["mixtral"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert convert_checkpoint.main(["import-hf", "--hf-dir", str(broken), "--save", str(tmp_path / "base")]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot read {weights}" in err and "an incomplete download?" in err
    assert "Traceback" not in err


def test_a_missing_shard_is_named_before_any_conversion(results, tmp_path, capsys):
    """(It was found when the conversion reached it: for a Mixtral-8x7B, after building the whole model.)"""
    convert_checkpoint = _convert_checkpoint()
    broken = tmp_path / "hf"
    shutil.copytree(results["hf_dirs"]["llama"], broken)  # (sharded: an index and several files)
    shards = sorted(broken.glob("model-*.safetensors"))
    shards[-1].unlink()
    assert convert_checkpoint.main(["import-hf", "--hf-dir", str(broken), "--save", str(tmp_path / "base")]) == 2
    captured = capsys.readouterr()
    assert f"error: cannot read {shards[-1]}" in captured.err
    assert "converting" not in captured.out + captured.err and not (tmp_path / "base").exists()


def test_a_missing_output_or_model_source_is_named_like_other_errors(tmp_path, capsys):
    """(They ended with SystemExit: exit code 1 and another message format than every other error.)"""
    convert_checkpoint = _convert_checkpoint()
    assert convert_checkpoint.main(["import-hf", "--hf-dir", str(tmp_path)]) == 2
    assert "error: import-hf: --save DIR is required" in capsys.readouterr().err
    assert convert_checkpoint.main(["export-peft", "--tenant-checkpoint", str(tmp_path), "--out",
                                    str(tmp_path / "out")]) == 2
    assert "error: export-peft: the model's shape is needed: give --base" in capsys.readouterr().err
    # two sources of the model's shape: refused (one was taken by order, unsaid)
    with pytest.raises(SystemExit) as e:
        convert_checkpoint.main(["export-peft", "--tenant-checkpoint", str(tmp_path), "--out", str(tmp_path / "o"),
                                 "--base", str(tmp_path), "--hf-dir", str(tmp_path)])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
