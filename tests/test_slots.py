"""SlotTable: validation errors (each with a message that names the problem), acquire / release / lookups,
and (on a tiny GPT) deterministic per-tenant initialisation and release that touches no other slot."""

import math
import re

import pytest
import torch

from megatron_multilora.lora.slots import (
    ALL_TARGETS,
    DENSE_TARGETS,
    LoRASpec,
    SlotError,
    SlotTable,
    check_tenant_name,
)
from tests.distributed import run_world


def _full_table():
    table = SlotTable(max_slots=3, max_rank=16)
    for name in ("a", "b", "c"):
        table.acquire(name, LoRASpec(rank=4))
    return table


# ---- validation -----------------------------------------------------------------------------------------


def test_no_free_slot():
    table = _full_table()
    with pytest.raises(SlotError, match=r"no free slot for tenant 'd': all 3 slots are taken"):
        table.acquire("d", LoRASpec(rank=4))
    assert set(table.tenants) == {"a", "b", "c"}


@pytest.mark.parametrize("rank", [0, -1, 17, 4.0])
def test_rank_out_of_range(rank):
    table = SlotTable(max_slots=2, max_rank=16)
    with pytest.raises(SlotError, match=rf"tenant 't': rank {rank} must be between 1 and max_rank 16"):
        table.acquire("t", LoRASpec(rank=rank))
    assert table.tenants == {} and table.free_slots == [0, 1]


def test_rank_equal_to_max_rank_and_one_are_allowed():
    table = SlotTable(max_slots=2, max_rank=16)
    assert table.acquire("lo", LoRASpec(rank=1)) == 0
    assert table.acquire("hi", LoRASpec(rank=16)) == 1


@pytest.mark.parametrize("kwargs", [dict(max_slots=0, max_rank=8), dict(max_slots=2, max_rank=0)])
def test_empty_pool(kwargs):
    with pytest.raises(SlotError, match="must be >= 1"):
        SlotTable(**kwargs)


def test_duplicate_tenant():
    table = _full_table()
    table.release("c")
    with pytest.raises(SlotError, match=r"tenant 'a' already holds slot 0"):
        table.acquire("a", LoRASpec(rank=8))
    assert table.record("a").spec.rank == 4 and table.free_slots == [2]


@pytest.mark.parametrize("call", ["release", "record", "slot_of"])
def test_unknown_tenant(call):
    table = _full_table()
    with pytest.raises(SlotError, match=r"unknown tenant 'zz' \(known: a, b, c\)"):
        getattr(table, call)("zz")
    with pytest.raises(SlotError, match=r"unknown tenant 'a' \(known: none\)"):
        getattr(SlotTable(2, 4), call)("a")


def test_release_twice():
    table = _full_table()
    table.release("b")
    with pytest.raises(SlotError, match="unknown tenant 'b'"):
        table.release("b")


def test_unknown_target_module_in_pool():
    with pytest.raises(SlotError, match=r"unknown target module\(s\) \['lm_head', 'q_proj'\]"):
        SlotTable(2, 8, target_modules=("linear_qkv", "q_proj", "lm_head"))
    assert SlotTable(2, 8, target_modules=list(ALL_TARGETS)).target_modules == ALL_TARGETS


@pytest.mark.parametrize("targets,bad", [(("linear_qkv", "q_proj"), "['q_proj']"),
                                         (("expert_fc1",), "['expert_fc1']")])
def test_unknown_target_module_for_tenant(targets, bad):
    table = SlotTable(2, 8, target_modules=DENSE_TARGETS)  # expert_fc1 is known but not wrapped here
    with pytest.raises(SlotError, match=r"tenant 't': unknown target module\(s\) " + re.escape(bad)
                       + r"; this pool wraps"):
        table.acquire("t", LoRASpec(rank=4, target_modules=targets))
    assert table.tenants == {}


@pytest.mark.parametrize("name", ["../escape", "", ".", "..", "a/b", "x" * 65, "/abs", "a\\b", ".hidden",
                                  "-dash", "sp ace", "nul\x00", "trailing\n", None, 3])
def test_unsafe_tenant_names(name):
    with pytest.raises(SlotError, match="is not safe as a directory name"):
        check_tenant_name(name)
    table = SlotTable(2, 8)
    with pytest.raises(SlotError, match="is not safe as a directory name"):
        table.acquire(name, LoRASpec(rank=4))
    assert table.tenants == {} and table.free_slots == [0, 1]


@pytest.mark.parametrize("name", ["a", "x" * 64, "tenant-1.v2_final", "0abc", "A.B"])
def test_safe_tenant_names(name):
    assert check_tenant_name(name) == name
    assert SlotTable(1, 4).acquire(name, LoRASpec(rank=4)) == 0


def test_unknown_init():
    with pytest.raises(SlotError, match=r"tenant 't': unknown init 'xavier'; known: \['kaiming', 'gaussian'\]"):
        SlotTable(2, 8).acquire("t", LoRASpec(rank=4, init="xavier"))


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_dropout_out_of_range(dropout):
    with pytest.raises(SlotError, match=rf"tenant 't': dropout {dropout} must be in \[0, 1\)"):
        SlotTable(2, 8).acquire("t", LoRASpec(rank=4, dropout=dropout))


def test_explicit_slot_held_or_out_of_range():
    table = SlotTable(4, 8)
    table.acquire("a", LoRASpec(rank=4))
    with pytest.raises(SlotError, match="slot 0 is held by tenant 'a'"):
        table.acquire("b", LoRASpec(rank=4), slot=0)
    for bad in (4, -1, -4):  # a negative slot must not wrap around to the last slots
        with pytest.raises(SlotError, match=rf"slot {bad} is out of range: this table has slots 0..3"):
            table.acquire("b", LoRASpec(rank=4), slot=bad)
    assert table.free_slots == [1, 2, 3] and list(table.tenants) == ["a"]
    assert table.acquire("b", LoRASpec(rank=4), slot=3) == 3
    assert table.free_slots == [1, 2]


# ---- acquire / release / lookups ------------------------------------------------------------------------


def test_acquire_release_and_lookups():
    table = SlotTable(max_slots=4, max_rank=16)
    spec_b = LoRASpec(rank=8, alpha=16.0, target_modules=("linear_qkv", "linear_fc2"), dropout=0.1)
    assert table.acquire("a", LoRASpec(rank=4)) == 0
    assert table.acquire("b", spec_b) == 1
    assert table.acquire("c", LoRASpec(rank=16, rslora=True, alpha=8.0)) == 2
    assert table.free_slots == [3]

    rec = table.record("b")
    assert (rec.name, rec.slot, rec.spec) == ("b", 1, spec_b)
    assert rec.internal_name == "slot1.b"
    assert rec.targets == frozenset({"linear_qkv", "linear_fc2"})
    assert table.record("a").targets == frozenset(DENSE_TARGETS)
    assert table.slot_of("c") == 2 and table.at(2) is table.record("c") and table.at(3) is None
    assert set(table.tenants) == {"a", "b", "c"}
    table.tenants.pop("a")  # a copy: the table is not changed through it
    assert "a" in table.tenants

    assert table.record("a").spec.scale == 1.0  # alpha None = rank
    assert spec_b.scale == 2.0
    assert table.record("c").spec.scale == pytest.approx(8.0 / 4.0)  # rsLoRA: alpha / sqrt(16)

    # The lowest free slot is reused after a release.
    assert table.release("b") == 1
    assert table.at(1) is None and table.free_slots == [1, 3]
    assert table.acquire("d", LoRASpec(rank=2)) == 1
    assert table.acquire("e", LoRASpec(rank=2)) == 3
    assert table.release("a") == 0 and table.release("c") == 2
    assert table.acquire("f", LoRASpec(rank=2)) == 0
    assert table.record("f").internal_name == "slot0.f"
    assert table.acquire("b", spec_b) == 2  # a released name can come back (in a new slot)
    assert {n: r.slot for n, r in table.tenants.items()} == {"d": 1, "e": 3, "f": 0, "b": 2}


# ---- initialisation and release on a model --------------------------------------------------------------


def _model_worker():
    from megatron_multilora.config import model_config_from
    from megatron_multilora.lora.inject import inject_lora
    from megatron_multilora.model import build_gpt_model, transformer_config
    from tests import lora_world as W

    gpt, table = W.build("tiny-dense", {}, None, DENSE_TARGETS)  # tenants a (slot 0), b (1), c (2); seed 5
    layers = table.layers

    def snap(layers):
        return {l.global_name: (l.lora_A.detach().clone(), l.lora_B.detach().clone()) for l in layers}

    out = dict(kinds={l.global_name: l.lora_kind for l in layers},
               fan_in={l.global_name: l.global_shape("a", 1)[1] for l in layers})
    out["before"] = snap(layers)
    out["released_slot"] = table.release("b")
    out["after_release"] = snap(layers)
    out["d_slot"] = table.acquire("d", LoRASpec(rank=8, init="gaussian"))
    out["after_d"] = snap(layers)

    def other_model(seed, table_seed, max_slots, max_rank, tenants):
        torch.manual_seed(seed)  # a different base model
        mc = model_config_from("tiny-dense")
        m = build_gpt_model(mc, transformer_config(mc))
        t = SlotTable(max_slots, max_rank, DENSE_TARGETS, seed=table_seed)
        inject_lora(m, t)
        for name, spec in tenants:
            t.acquire(name, spec)
        return snap(t.layers), {n: r.slot for n, r in t.tenants.items()}

    # Same table seed, different model, pool size and max rank; "a" lands in slot 1 there.
    out["m2"] = other_model(123, 5, 6, 32, [("zz", LoRASpec(rank=4)), ("a", LoRASpec(rank=4, alpha=8.0))])
    # A different table seed.
    out["m3"] = other_model(5, 6, 4, 16, [("a", LoRASpec(rank=4, alpha=8.0))])
    return out


@pytest.fixture(scope="module")
def model_world():
    return run_world(_model_worker, 1)[0]


def test_same_tenant_same_seed_gives_identical_initial_a(model_world):
    before = model_world["before"]
    m2, slots2 = model_world["m2"]
    assert slots2 == {"zz": 0, "a": 1}
    for name, (a1, _) in before.items():
        a2, b2 = m2[name]
        assert a1.shape[1] == 16 and a2.shape[1] == 32
        assert torch.equal(a1[0, :4], a2[1, :4]), name  # bitwise, across models, pools and slots
        assert a1[0, :4].abs().min() > 0
        assert not a1[0, 4:].any() and not a2[1, 4:].any()
        assert not b2.any(), f"{name}: B must start at zero"
        # A different tenant name (same rank, same table) and a different table seed give a different A.
        assert not torch.isclose(a2[0, :4], a2[1, :4]).any(), name
        a3 = model_world["m3"][0][name][0]
        assert not torch.isclose(a3[0, :4], a1[0, :4]).any(), name


def test_initial_a_distributions(model_world):
    after_d, d = model_world["after_d"], model_world["d_slot"]
    kaiming, gauss = [], []
    for name, (a, _) in model_world["before"].items():
        bound = 1.0 / math.sqrt(model_world["fan_in"][name])
        assert a[0, :4].abs().max() <= bound, name  # kaiming-uniform (PEFT's default)
        kaiming.append(a[0, :4].flatten() / bound)
        gauss.append(after_d[name][0][d, :8].flatten())
    assert torch.cat(kaiming).std().item() == pytest.approx(1 / math.sqrt(3), rel=0.05)
    assert torch.cat(gauss).std().item() == pytest.approx(1 / 8, rel=0.05)  # gaussian: std 1/rank
    assert torch.cat(gauss).abs().max() > 1.5 / 8


def test_tenant_targets_limit_initialisation(model_world):
    # Tenant c (slot 2) targets only linear_qkv and linear_fc2.
    for name, (a, _) in model_world["before"].items():
        targeted = model_world["kinds"][name] in ("linear_qkv", "linear_fc2")
        assert bool(a[2].any()) == targeted, name


def test_release_zeros_only_its_slot(model_world):
    before, after = model_world["before"], model_world["after_release"]
    assert model_world["released_slot"] == 1
    for name in before:
        for i, which in enumerate("AB"):
            old, new = before[name][i], after[name][i]
            assert old[1].any(), f"{name}.{which}: slot 1 was not in use before the release"
            assert not new[1].any(), f"{name}.{which}: slot 1 not zeroed"
            for s in (0, 2, 3):
                assert torch.equal(old[s], new[s]), f"{name}.{which}: slot {s} changed by the release"


def test_acquire_after_release_reuses_slot_and_touches_no_other(model_world):
    after, after_d, d = model_world["after_release"], model_world["after_d"], model_world["d_slot"]
    assert d == 1
    for name in after:
        a, b = after_d[name]
        assert a[1, :8].any() and not a[1, 8:].any() and not b[1].any(), name
        for s in (0, 2, 3):
            assert torch.equal(after[name][0][s], a[s]) and torch.equal(after[name][1][s], b[s]), (name, s)
