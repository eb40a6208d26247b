"""Tests of megatron_multilora.optim: per-slot AdamW, schedules, clipping, isolation, checkpoints."""

import math

import pytest
import torch

from megatron_multilora.optim import (
    LRSchedule,
    SlotHyperParams,
    SlotOptimizer,
    default_grad_sq_norm_reduce,
)

torch.set_num_threads(1)

SHAPES = {
    "decoder.layers.0.qkv.lora_A": (4, 6),  # [S, r, in]
    "decoder.layers.0.qkv.lora_B": (5, 4),  # [S, out, r]
    "decoder.layers.0.experts.lora_A": (2, 4, 6),  # [S, E_local, r, in]
    "decoder.layers.0.gate": (),  # [S]: a per-slot scalar (1-D parameter)
}


def make_params(S, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.nn.Parameter(torch.randn((S,) + shape, generator=g).to(dtype))
        for name, shape in SHAPES.items()
    }


def make_grads(params, seed, mag=1.0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) * mag for n, p in params.items()}


def set_grads(params, grads):
    for n, p in params.items():
        p.grad = grads[n].to(p.dtype).clone()


def snapshot(opt, params, k):
    """Bitwise-comparable picture of slot k: weight rows, optimizer state, step count."""
    out = {f"w:{n}": p.detach()[k].clone() for n, p in params.items()}
    out.update({f"s:{key}": v for key, v in opt.slot_state(k).items()})
    out["steps"] = opt.slot_step_count(k)
    return out


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype, key
            assert torch.equal(a[key].view(-1).view(torch.uint8), b[key].view(-1).view(torch.uint8)), key
        else:
            assert a[key] == b[key], key


class RefSlot:
    """One slot trained alone by torch.optim.AdamW, clipped by torch.nn.utils.clip_grad_norm_."""

    def __init__(self, params, k, hp: SlotHyperParams):
        self.k, self.hp = k, hp
        self.params = {n: torch.nn.Parameter(p.detach()[k].float().clone()) for n, p in params.items()}
        self.opt = torch.optim.AdamW(
            list(self.params.values()),
            lr=hp.schedule.lr,
            betas=hp.betas,
            eps=hp.eps,
            weight_decay=hp.weight_decay,
            foreach=True,
        )
        self.steps = 0

    def step(self, grads, scale, coef_override=None):
        for n, p in self.params.items():
            p.grad = grads[n][self.k].float() * scale
        norm = None
        if coef_override is not None:
            for p in self.params.values():
                p.grad.mul_(coef_override)
        elif self.hp.clip_grad:
            norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.hp.clip_grad).item()
        lr = self.hp.schedule.lr_at(self.steps)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.steps += 1
        return norm, lr

    def assert_close(self, params, opt=None, atol=1e-6):
        for n, p in self.params.items():
            torch.testing.assert_close(params[n].detach()[self.k].float(), p.detach(), rtol=0, atol=atol)
        if opt is not None:
            st = opt.slot_state(self.k)
            for n, p in self.params.items():
                ts = self.opt.state[p]
                torch.testing.assert_close(st[f"{n}.exp_avg"], ts["exp_avg"], rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(st[f"{n}.exp_avg_sq"], ts["exp_avg_sq"], rtol=1e-5, atol=1e-9)
            assert opt.slot_step_count(self.k) == self.steps


HP_VARIANTS = [
    SlotHyperParams(
        LRSchedule(1e-2, min_lr=1e-3, warmup_iters=2, decay_iters=8, decay_style="cosine"),
        weight_decay=0.1,
        clip_grad=1.0,
    ),
    SlotHyperParams(
        LRSchedule(3e-2, decay_iters=6, decay_style="linear"),
        weight_decay=0.0,
        betas=(0.8, 0.95),
        eps=1e-6,
        clip_grad=0.5,
    ),
    SlotHyperParams(LRSchedule(5e-3, decay_style="constant"), weight_decay=0.01, betas=(0.5, 0.9), clip_grad=None),
    SlotHyperParams(
        LRSchedule(2e-2, min_lr=0.0, warmup_iters=1, decay_iters=5, decay_style="linear"),
        weight_decay=0.05,
        betas=(0.9, 0.99),
        eps=1e-7,
        clip_grad=2.0,
    ),
]


def make_opt(params, hps, **kw):
    opt = SlotOptimizer(params, next(iter(params.values())).shape[0], **kw)
    for k, hp in enumerate(hps):
        if hp is not None:
            opt.configure_slot(k, hp)
    return opt


# ------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("style", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup,decay,lr,min_lr", [(0, 10, 1e-3, 1e-5), (3, 12, 3e-4, 3e-5), (4, 5, 1.0, 0.0)])
def test_schedule_matches_megatron(style, warmup, decay, lr, min_lr):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    class DummyOptimizer:
        param_groups = [{}]

    dummy = DummyOptimizer()
    ref = OptimizerParamScheduler(
        dummy, init_lr=0.0, max_lr=lr, min_lr=min_lr, lr_warmup_steps=warmup, lr_decay_steps=decay,
        lr_decay_style=style, start_wd=0.0, end_wd=0.0, wd_incr_steps=1, wd_incr_style="constant",
    )
    sched = LRSchedule(lr, min_lr=min_lr, warmup_iters=warmup, decay_iters=decay, decay_style=style)
    seen = set()
    for step in range(decay + 4):
        assert sched.lr_at(step) == dummy.param_groups[0]["lr"], step
        seen.add(sched.lr_at(step))
        ref.step(1)
    assert len(seen) >= (1 if style == "constant" and warmup == 0 else 3)  # the test is not vacuous


def test_schedule_without_decay_iters_is_constant_after_warmup():
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    class DummyOptimizer:
        param_groups = [{}]

    dummy = DummyOptimizer()
    ref = OptimizerParamScheduler(
        dummy, init_lr=0.0, max_lr=2e-4, min_lr=0.0, lr_warmup_steps=3, lr_decay_steps=1000,
        lr_decay_style="constant", start_wd=0.0, end_wd=0.0, wd_incr_steps=1, wd_incr_style="constant",
    )
    for style in ("linear", "cosine"):
        sched = LRSchedule(2e-4, warmup_iters=3, decay_iters=None, decay_style=style)
        dummy.param_groups[0]["lr"] = None
        ref.num_steps = 0
        ref.step(0)
        for step in range(20):
            assert sched.lr_at(step) == dummy.param_groups[0]["lr"]
            ref.step(1)


def test_optimizer_lr_follows_megatron_scheduler_in_own_steps():
    """Each slot's n-th update uses the lr Megatron's scheduler holds after n-1 steps; a skipped
    step does not advance the schedule."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    class DummyOptimizer:
        param_groups = [{}]

    hp = SlotHyperParams(LRSchedule(1e-2, min_lr=1e-4, warmup_iters=3, decay_iters=9, decay_style="cosine"))
    params = make_params(2)
    opt = make_opt(params, [hp, hp])
    dummy = DummyOptimizer()
    ref = OptimizerParamScheduler(
        dummy, init_lr=0.0, max_lr=1e-2, min_lr=1e-4, lr_warmup_steps=3, lr_decay_steps=9,
        lr_decay_style="cosine", start_wd=0.0, end_wd=0.0, wd_incr_steps=1, wd_incr_style="constant",
    )
    ones = torch.ones(2)
    for it in range(12):
        grads = make_grads(params, it)
        if it == 4:  # slot 0 gets a NaN: skipped, its schedule does not move
            grads["decoder.layers.0.qkv.lora_A"][0, 0, 0] = float("nan")
        set_grads(params, grads)
        # slot 1 only steps on even iterations: its schedule runs at its own pace
        rep = opt.step(ones, torch.tensor([True, it % 2 == 0]))
        assert rep.lr[0].item() == dummy.param_groups[0]["lr"]
        if it != 4:
            ref.step(1)
    assert opt.slot_step_count(0) == 11
    assert opt.slot_step_count(1) == 6
    assert rep.lr[1].item() == 0.0  # inactive on the last iteration
    assert opt.slot_hparams(1).schedule.lr_at(5) == hp.schedule.lr_at(5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1e-3), "lr"),
        (dict(lr=float("nan")), "finite"),
        (dict(lr=1e-3, min_lr=1e-2), "min_lr"),
        (dict(lr=1e-3, decay_style="exponential"), "decay_style"),
        (dict(lr=1e-3, warmup_iters=5, decay_iters=5), "decay_iters"),
        (dict(lr=1e-3, warmup_iters=-1), "warmup_iters"),
    ],
)
def test_schedule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LRSchedule(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(betas=(1.0, 0.999)), r"betas\[0\]"),
        (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
        (dict(betas=(0.9,)), "pair"),
        (dict(eps=0.0), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(clip_grad=-1.0), "clip_grad"),
    ],
)
def test_hparams_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SlotHyperParams(LRSchedule(1e-3), **kwargs)
    with pytest.raises(TypeError, match="LRSchedule"):
        SlotHyperParams(schedule=1e-3)


def test_constructor_and_step_argument_errors():
    with pytest.raises(ValueError, match="slot dimension"):
        SlotOptimizer({"a": torch.nn.Parameter(torch.zeros(3, 2))}, 4)
    with pytest.raises(TypeError, match="pairs"):
        SlotOptimizer([torch.nn.Parameter(torch.zeros(3, 2))], 3)
    with pytest.raises(ValueError, match="duplicate"):
        p = torch.nn.Parameter(torch.zeros(3, 2))
        SlotOptimizer([("a", p), ("a", p)], 3)
    params = make_params(3)
    opt = SlotOptimizer(list(params.items()), 3)  # list of pairs works as well as a dict
    opt.configure_slot(0, HP_VARIANTS[0])
    set_grads(params, make_grads(params, 0))
    with pytest.raises(RuntimeError, match=r"\[1\].*not configured"):
        opt.step(torch.ones(3), torch.tensor([True, True, False]))
    with pytest.raises(ValueError, match="grad_scale"):
        opt.step(torch.ones(2), torch.tensor([True, False, False]))
    with pytest.raises(ValueError, match="active"):
        opt.step(torch.ones(3), torch.tensor([1, 0, 0]))
    with pytest.raises(IndexError):
        opt.configure_slot(3, HP_VARIANTS[0])


def test_a_torch_without_the_fused_adamw_kernel_is_refused_up_front(monkeypatch):
    monkeypatch.delattr(torch, "_fused_adamw_")
    with pytest.raises(RuntimeError, match="fused AdamW kernel"):
        SlotOptimizer(make_params(3), 3)


# ------------------------------------------------------------------------ AdamW equivalence
def test_single_slot_matches_torch_adamw_with_scaling_and_clipping():
    params = make_params(1)
    hp = HP_VARIANTS[0]
    opt = make_opt(params, [hp])
    ref = RefSlot(params, 0, hp)
    clipped = 0
    for it in range(10):
        grads = make_grads(params, 100 + it, mag=0.02 if it % 3 == 0 else 5.0)
        scale = 1.0 / (7 + 3 * it)  # 1 / tokens
        set_grads(params, grads)
        rep = opt.step(torch.tensor([scale]), torch.tensor([True]))
        norm, lr = ref.step(grads, scale)
        assert rep.stepped.tolist() == [True] and rep.skipped.tolist() == [False]
        assert rep.lr[0].item() == lr
        assert rep.grad_norm[0].item() == pytest.approx(norm, rel=1e-5)
        clipped += rep.clip_coef[0].item() < 1.0
        ref.assert_close(params, opt)
    assert 0 < clipped < 10  # both regimes were exercised
    # the optimizer never mutates the caller's gradients
    for n, p in params.items():
        assert torch.equal(p.grad, grads[n])


def test_several_slots_each_match_their_own_adamw():
    S = 5
    params = make_params(S, seed=1)
    hps = HP_VARIANTS + [None]  # slot 4 stays unconfigured and inactive
    opt = make_opt(params, hps)
    refs = [RefSlot(params, k, hp) for k, hp in enumerate(HP_VARIANTS)]
    patterns = [
        [1, 1, 1, 1, 0], [1, 0, 1, 1, 0], [0, 1, 0, 1, 0], [1, 1, 0, 0, 0],
        [1, 0, 0, 1, 0], [1, 1, 1, 1, 0], [0, 0, 1, 0, 0], [1, 1, 1, 1, 0],
    ]
    for it, pattern in enumerate(patterns):
        grads = make_grads(params, 200 + it, mag=3.0)
        scale = torch.tensor([1 / 5, 1 / 11, 1 / 3, 1 / 40, float("inf")])
        set_grads(params, grads)
        active = torch.tensor(pattern, dtype=torch.bool)
        rep = opt.step(scale, active)
        assert rep.stepped.tolist() == active.tolist()
        for k, ref in enumerate(refs):
            if pattern[k]:
                norm, lr = ref.step(grads, scale[k].item())
                assert rep.lr[k].item() == lr
                if norm is not None:
                    assert rep.grad_norm[k].item() == pytest.approx(norm, rel=1e-5)
            ref.assert_close(params, opt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_views_gather_and_row_groups_agree_bitwise(dtype):
    """Views per contiguous run vs gather / scatter, and any grouping of the rows (block_numel: one
    row per group, groups that mix parameters and cut runs, one group) give bitwise equal results."""
    S = 6
    base = make_params(S, dtype=dtype, seed=3)
    hps = (HP_VARIANTS * 2)[:S]
    results = []
    for max_runs, block_numel in [(None, None), (0, None), (None, 1), (None, 37), (0, 37), (None, 10**9)]:
        params = {n: torch.nn.Parameter(p.detach().clone()) for n, p in base.items()}
        opt = make_opt(params, hps)
        opt.max_view_runs = max_runs
        opt.block_numel = block_numel
        for it, pattern in enumerate([[1] * 6, [1, 0, 1, 1, 0, 1], [0, 1, 0, 1, 0, 1], [1] * 6]):
            set_grads(params, make_grads(params, 300 + it, mag=2.0))
            opt.step(torch.full((S,), 0.25), torch.tensor(pattern, dtype=torch.bool))
        results.append([snapshot(opt, params, k) for k in range(S)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert_bitwise_equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_runs,block_numel", [(None, None), (None, 1), (None, 37), (0, None)])
def test_idle_rows_bitwise_untouched_and_never_reduced(dtype, max_runs, block_numel):
    """Rows of idle slots -- weights, fp32 masters, both moments -- stay bitwise unchanged while slots
    around them step, whatever the row grouping, and their (garbage) grads never reach the norms."""
    S = 7
    params = make_params(S, dtype=dtype, seed=11)
    seen = []

    def reduce(sq):
        seen.append(sq)
        return default_grad_sq_norm_reduce(sq)

    opt = make_opt(params, (HP_VARIANTS * 2)[:S], grad_sq_norm_reduce=reduce)
    opt.max_view_runs = max_runs
    opt.block_numel = block_numel
    set_grads(params, make_grads(params, 1200))
    opt.step(torch.ones(S), torch.ones(S, dtype=torch.bool))  # non-trivial state everywhere
    state = {name: [t.detach().clone() for t in tensors] for name, tensors in
             [("p", [p for p in params.values()]), ("m", opt._exp_avg), ("v", opt._exp_avg_sq),
              ("master", [t for t in opt._master if t is not None])]}
    active = torch.tensor([1, 0, 1, 1, 0, 0, 1], dtype=torch.bool)
    idle = (~active).nonzero().flatten().tolist()
    grads = make_grads(params, 1201)
    for g in grads.values():
        g[~active] = float("nan")
    set_grads(params, grads)
    rep = opt.step(torch.full((S,), 0.5), active)
    assert rep.stepped.tolist() == active.tolist()
    for sq in seen[-1].values():
        assert torch.equal(sq[~active], torch.zeros(len(idle)))
    now = {"p": list(params.values()), "m": opt._exp_avg, "v": opt._exp_avg_sq,
           "master": [t for t in opt._master if t is not None]}
    assert len(state["master"]) == (0 if dtype == torch.float32 else len(params))
    for name, before in state.items():
        for b, a in zip(before, now[name]):
            a = a.detach()
            ity = {2: torch.int16, 4: torch.int32}[a.element_size()]
            assert torch.equal(a[idle].view(ity), b[idle].view(ity)), name
            assert not torch.equal(a[active], b[active]), name


# ------------------------------------------------------------------------------- isolation
@pytest.mark.parametrize("pattern", [[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]])
@pytest.mark.parametrize("max_runs", [None, 0])
def test_inactive_slots_bitwise_unchanged(pattern, max_runs):
    S = 4
    params = make_params(S, seed=4)
    opt = make_opt(params, HP_VARIANTS)
    opt.max_view_runs = max_runs
    for it in range(2):  # non-trivial moments everywhere
        set_grads(params, make_grads(params, 400 + it))
        opt.step(torch.ones(S), torch.ones(S, dtype=torch.bool))
    before = [snapshot(opt, params, k) for k in range(S)]
    grads = make_grads(params, 410)
    active = torch.tensor(pattern, dtype=torch.bool)
    for n in grads:  # garbage in every inactive row
        for k in (~active).nonzero().flatten().tolist():
            grads[n][k] = float("nan")
            grads[n][k].view(-1)[0] = float("inf")
    scale = torch.where(active, torch.tensor(0.5), torch.tensor(float("inf")))
    set_grads(params, grads)
    rep = opt.step(scale, active)
    assert rep.stepped.tolist() == active.tolist() and not rep.skipped.any()
    for k in range(S):
        after = snapshot(opt, params, k)
        if pattern[k]:
            assert after["steps"] == before[k]["steps"] + 1
            assert not torch.equal(after["w:decoder.layers.0.qkv.lora_B"], before[k]["w:decoder.layers.0.qkv.lora_B"])
        else:
            assert_bitwise_equal(after, before[k])
            assert rep.grad_norm[k] == 0 and rep.lr[k] == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_slot_is_skipped_and_others_step_as_alone(bad):
    S = 3
    base = make_params(S, seed=5)
    hps = HP_VARIANTS[:3]

    def run(active_last, poison):
        params = {n: torch.nn.Parameter(p.detach().clone()) for n, p in base.items()}
        opt = make_opt(params, hps)
        for it in range(3):
            grads = make_grads(params, 500 + it, mag=2.0)
            if it == 2 and poison:
                grads["decoder.layers.0.experts.lora_A"][1, 1, 2, 3] = bad
            set_grads(params, grads)
            active = torch.ones(S, dtype=torch.bool) if it < 2 else torch.tensor(active_last)
            rep = opt.step(torch.tensor([0.5, 0.25, 0.125]), active)
        return opt, params, rep

    opt, params, rep = run([True, True, True], poison=True)
    assert rep.skipped.tolist() == [False, True, False]
    assert rep.stepped.tolist() == [True, False, True]
    assert not math.isfinite(rep.grad_norm[1].item())
    assert opt.slot_step_count(1) == 2

    # slot 1 is exactly as if it had not been active this iteration ...
    opt_b, params_b, _ = run([True, False, True], poison=False)
    for k in range(S):
        assert_bitwise_equal(snapshot(opt, params, k), snapshot(opt_b, params_b, k))
    # ... and slots 0 and 2 exactly as if each had been the only slot stepping.
    for k in (0, 2):
        alone = [False] * S
        alone[k] = True
        opt_c, params_c, _ = run(alone, poison=False)
        assert_bitwise_equal(snapshot(opt, params, k), snapshot(opt_c, params_c, k))


def test_reset_slot_touches_no_other_slot():
    S = 4
    params = make_params(S, seed=6)
    opt = make_opt(params, HP_VARIANTS)
    for it in range(3):
        set_grads(params, make_grads(params, 600 + it))
        opt.step(torch.ones(S), torch.ones(S, dtype=torch.bool))
    before = [snapshot(opt, params, k) for k in range(S)]
    opt.reset_slot(2)
    for k in (0, 1, 3):
        assert_bitwise_equal(snapshot(opt, params, k), before[k])
    st = opt.slot_state(2)
    assert opt.slot_step_count(2) == 0 and opt.slot_hparams(2) is None
    assert all(not v.any() for key, v in st.items() if key != "step")
    for n, p in params.items():  # weights are the caller's business
        assert torch.equal(p.detach()[2], before[2][f"w:{n}"])
    set_grads(params, make_grads(params, 650))
    with pytest.raises(RuntimeError, match="not configured"):
        opt.step(torch.ones(S), torch.tensor([False, False, True, False]))
    # reconfigured, the slot trains like a fresh AdamW from its current weights
    opt.configure_slot(2, HP_VARIANTS[1])
    ref = RefSlot(params, 2, HP_VARIANTS[1])
    for it in range(3):
        grads = make_grads(params, 660 + it)
        set_grads(params, grads)
        opt.step(torch.full((S,), 0.5), torch.tensor([False, False, True, False]))
        ref.step(grads, 0.5)
        ref.assert_close(params, opt)
    opt.reset_slot(1, keep_hparams=True)
    assert opt.slot_hparams(1) == HP_VARIANTS[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slot_state_round_trip_into_another_slot(dtype):
    hp = HP_VARIANTS[0]
    p1 = make_params(3, dtype=dtype, seed=7)
    opt1 = make_opt(p1, [hp, None, None])
    act0 = torch.tensor([True, False, False])
    act2 = torch.tensor([False, False, True])
    for it in range(3):
        set_grads(p1, make_grads(p1, 700 + it))
        opt1.step(torch.full((3,), 0.2), act0)
    state = opt1.slot_state(0)
    assert state["step"].item() == 3
    assert all(v.dtype == torch.float32 for key, v in state.items() if key != "step")
    assert any(key.endswith(".master") for key in state) == (dtype != torch.float32)

    # a different optimizer, different weights; the tenant moves from slot 0 to slot 2
    p2 = make_params(3, dtype=dtype, seed=8)
    opt2 = make_opt(p2, [HP_VARIANTS[1], None, hp])
    with torch.no_grad():
        for n in p2:
            p2[n][2].copy_(p1[n][0])  # what the weight checkpoint loader does
    opt2.load_slot_state(2, {k: v.clone() for k, v in state.items()})
    assert opt2.slot_step_count(2) == 3
    for it in range(4):
        grads = make_grads(p1, 750 + it, mag=4.0)
        set_grads(p1, grads)
        r1 = opt1.step(torch.full((3,), 0.2), act0)
        moved = {n: torch.roll(g, 2, dims=0) for n, g in grads.items()}  # row 0 -> row 2
        set_grads(p2, moved)
        r2 = opt2.step(torch.full((3,), 0.2), act2)
        assert r1.lr[0] == r2.lr[2] and r1.grad_norm[0] == r2.grad_norm[2]
        a, b = snapshot(opt1, p1, 0), snapshot(opt2, p2, 2)
        assert_bitwise_equal(a, b)


def test_load_slot_state_errors_are_clear_and_atomic():
    params = make_params(2)
    opt = make_opt(params, [HP_VARIANTS[0], HP_VARIANTS[0]])
    set_grads(params, make_grads(params, 800))
    opt.step(torch.ones(2), torch.ones(2, dtype=torch.bool))
    good = opt.slot_state(0)
    before = snapshot(opt, params, 1)

    bigger = {n: torch.nn.Parameter(torch.zeros((2,) + tuple(s + 1 for s in shape))) for n, shape in SHAPES.items()}
    other = SlotOptimizer(bigger, 2)
    with pytest.raises(ValueError, match=r"shape .*per-slot shape"):
        other.load_slot_state(0, good)
    bad = dict(good)
    del bad["decoder.layers.0.gate.exp_avg_sq"]
    with pytest.raises(KeyError, match="missing keys.*gate.exp_avg_sq"):
        opt.load_slot_state(1, bad)
    bad = dict(good, **{"nonsense.exp_avg": torch.zeros(1)})
    with pytest.raises(KeyError, match="unexpected keys.*nonsense"):
        opt.load_slot_state(1, bad)
    bad = dict(good)
    bad["decoder.layers.0.qkv.lora_B.exp_avg"] = torch.zeros(5, 3)  # last, after valid entries
    with pytest.raises(ValueError, match="lora_B.exp_avg"):
        opt.load_slot_state(1, bad)
    assert_bitwise_equal(snapshot(opt, params, 1), before)  # nothing was half-loaded


# --------------------------------------------------------------------- distributed grad norm
def test_norm_groups_duplicates_and_reduce_wiring():
    S = 3
    g = torch.Generator().manual_seed(9)
    params = {
        "dense.A": torch.nn.Parameter(torch.randn(S, 4, 6, generator=g)),
        "dense.dup": torch.nn.Parameter(torch.randn(S, 4, generator=g)),
        "expert.A": torch.nn.Parameter(torch.randn(S, 2, 3, 4, generator=g)),
        "tp.dup": torch.nn.Parameter(torch.randn(S, 5, generator=g)),
    }
    params["dense.dup"].norm_duplicate = True
    params["expert.A"].norm_group = "expert"
    params["tp.dup"].norm_group = "tp"
    params["tp.dup"].norm_duplicate = True
    hp = SlotHyperParams(LRSchedule(1e-2), weight_decay=0.0, clip_grad=1.0)
    calls = []
    mode = {"inf_slot": None}

    def reduce(sq):
        calls.append({k: v.clone() for k, v in sq.items()})
        total = sq["dense"] + 2.0 * sq["expert"]  # as if the expert group spanned two EP ranks
        if mode["inf_slot"] is not None:
            total = total.clone()
            total[mode["inf_slot"]] = float("inf")
        return total

    opt = make_opt(params, [hp] * S, grad_sq_norm_reduce=reduce)
    refs = [RefSlot(params, k, hp) for k in range(S)]
    grads = make_grads(params, 900, mag=3.0)
    set_grads(params, grads)
    scale = torch.tensor([0.5, 0.1, 2.0])
    active = torch.tensor([True, False, True])
    rep = opt.step(scale, active)
    (sq,) = calls
    assert list(sq) == ["dense", "expert", "tp"]
    want_dense = grads["dense.A"].square().sum((1, 2)) * scale**2
    want_expert = grads["expert.A"].square().sum((1, 2, 3)) * scale**2
    torch.testing.assert_close(sq["dense"], torch.where(active, want_dense, 0.0), rtol=1e-6, atol=0)
    torch.testing.assert_close(sq["expert"], torch.where(active, want_expert, 0.0), rtol=1e-6, atol=0)
    assert not sq["tp"].any()  # group present, nothing counted locally
    total = want_dense + 2.0 * want_expert
    torch.testing.assert_close(rep.grad_norm, torch.where(active, total.double().sqrt(), 0.0), rtol=1e-6, atol=0)
    for k in (0, 2):  # clipping used the REDUCED norm
        coef = min(1.0, 1.0 / (math.sqrt(total[k].item()) + 1e-6))
        assert rep.clip_coef[k].item() == pytest.approx(coef, rel=1e-6)
        refs[k].step(grads, scale[k].item(), coef_override=coef)
        refs[k].assert_close(params, opt)

    # a non-finite REDUCED norm skips the slot even though its local grads are finite
    mode["inf_slot"] = 2
    before = snapshot(opt, params, 2)
    rep = opt.step(scale, torch.ones(S, dtype=torch.bool))
    assert rep.skipped.tolist() == [False, False, True]
    assert_bitwise_equal(snapshot(opt, params, 2), before)
    assert torch.equal(default_grad_sq_norm_reduce({"a": torch.ones(2), "b": torch.ones(2)}), torch.full((2,), 2.0))


# -------------------------------------------------------------------------------- bf16 masters
def test_bf16_params_fp32_masters_and_isolation():
    S = 3
    params = make_params(S, dtype=torch.bfloat16, seed=10)
    hp = HP_VARIANTS[0]
    opt = make_opt(params, [hp] * S)
    initial = {n: p.detach().clone() for n, p in params.items()}
    ref = RefSlot(params, 1, hp)
    active = torch.tensor([False, True, False])
    for it in range(4):
        grads = make_grads(params, 1000 + it)
        grads = {n: g.to(torch.bfloat16).float() for n, g in grads.items()}  # what bf16 grads hold
        for n in grads:
            grads[n][0] = float("nan")
        set_grads(params, grads)
        opt.step(torch.full((S,), 0.3), active)
        ref.step(grads, 0.3)
    state = opt.slot_state(1)
    for n, p in params.items():
        for k in (0, 2):  # other tenants were never rounded through anything
            assert torch.equal(p.detach()[k].view(torch.int16), initial[n][k].view(torch.int16))
            assert torch.equal(opt.slot_state(k)[f"{n}.master"], initial[n][k].float())
        master = state[f"{n}.master"]
        assert master.dtype == torch.float32 and state[f"{n}.exp_avg"].dtype == torch.float32
        torch.testing.assert_close(master, ref.params[n].detach(), rtol=0, atol=1e-6)
        assert torch.equal(p.detach()[1], master.to(torch.bfloat16))
        assert not torch.equal(master, master.to(torch.bfloat16).float())  # fp32 precision kept

    # external writes into a row: detected through the parameter's version counter ...
    new_row = {n: (torch.randn(p.shape[1:]) * 0.1).to(torch.bfloat16) for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p[2].copy_(new_row[n])
    opt.reset_slot(2, keep_hparams=True)
    ref2 = RefSlot(params, 2, hp)
    grads = make_grads(params, 1100)
    grads = {n: g.to(torch.bfloat16).float() for n, g in grads.items()}
    set_grads(params, grads)
    opt.step(torch.full((S,), 0.3), torch.tensor([False, False, True]))
    ref2.step(grads, 0.3)
    for n in params:
        torch.testing.assert_close(opt.slot_state(2)[f"{n}.master"], ref2.params[n].detach(), rtol=0, atol=1e-6)
        # slot 1's fp32 master was not re-read from its bf16 row
        assert torch.equal(opt.slot_state(1)[f"{n}.master"], state[f"{n}.master"])
    # ... and writes through .data need sync_slot_from_params
    for n, p in params.items():
        p.data[0] = new_row[n]
    opt.sync_slot_from_params(0)
    for n in params:
        assert torch.equal(opt.slot_state(0)[f"{n}.master"], new_row[n].float())
        assert torch.equal(opt.slot_state(1)[f"{n}.master"], state[f"{n}.master"])


def test_fp32_params_move_into_the_flat_weights_buffer_and_a_replaced_one_is_refused():
    """fp32 parameters become views of the optimizer's [slots, width] weights (values unchanged, updates land in
    the parameter); replacing a parameter's .data afterwards would silently detach it, so the step refuses."""
    S = 3
    params = make_params(S)
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = make_opt(params, [SlotHyperParams(LRSchedule(lr=0.1))] * S)
    for n, p in params.items():
        assert torch.equal(p.detach(), before[n]), n
        assert p.untyped_storage().data_ptr() == opt._weights.untyped_storage().data_ptr(), n
    set_grads(params, make_grads(params, seed=1))
    opt.step(torch.ones(S), torch.tensor([True, False, True]))
    for n, p in params.items():
        assert not torch.equal(p.detach()[0], before[n][0]) and torch.equal(p.detach()[1], before[n][1]), n
    name = next(iter(params))
    params[name].data = params[name].detach().clone()
    with pytest.raises(RuntimeError, match=f"{name}.*no longer lives in the optimizer"):
        opt.step(torch.ones(S), torch.tensor([True, False, True]))
