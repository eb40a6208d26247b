#!/usr/bin/env python
"""Benchmarks of multi-LoRA training. Every figure is a RATIO of variants timed side by side in one process:
the variants run interleaved round by round (the order rotates every round) and each figure is the median of
the per-round ratios, so a noisy shared machine moves both sides of a ratio alike (a ratio of two differences,
like case 8's LoRA times, is the ratio of the medians of the per-round differences). On a CPU with --threads 1
the clock is the process's CPU time (all work runs on the calling thread, autograd included), which other
processes competing for the cores hardly move; elsewhere it is wall time.

    python tools/bench.py                       # every case, tiny and large shapes (4-5 minutes on 2 cores)
    python tools/bench.py --quick --cases 1,7   # tiny shapes only, 3 rounds (the smoke test uses this)
    python tools/bench.py --out docs            # also writes docs/bench.json and docs/bench.png
    python tools/bench.py --malloc default      # glibc as is (by default the tool re-runs itself with glibc
                                                # keeping freed memory, see TUNED_MALLOC)

Cases:
 1 mixed micro-batch of N tenants vs one tenant, same tokens (one linear fwd+bwd, whole model fwd+bwd)
 2 full LoRA training step (fwd+bwd+optimizer) vs the frozen-base step (fwd+bwd with the embedding output
   requiring grad); goal 1 + 2 x FLOP ratio + 0.05, the FLOP ratio 1.5 r (1/d_in + 1/d_out) averaged over the
   target linears weighted by their base FLOPs
 3 mixed ranks vs every tenant padded to max_rank; LoRA time (minus the base) vs the sum of tokens x rank
 4 mixed training step vs the same tenants trained one after another on the same model
 5 resident idle slots: max_slots 64 vs 4 with the same 4 active tenants (full training step)
 6 memory: parameters + gradients + optimizer state; the base is never copied (bookkeeping, not timing)
 7 SlotOptimizer.step vs torch.optim.AdamW(foreach=True) over the same parameters (context: fused=True, the
   kernel the SlotOptimizer runs on each slot's row)
 8 expert LoRA vs dense LoRA over the same routed tokens x rank: the time expert LoRA adds to a MoE layer over
   the time dense LoRA adds to a dense MLP of one expert's shape fed as many tokens as were routed (both
   one-layer models, so the per-step gradient zeroing each side times covers the same one layer; each call a
   new micro-batch, so the router's new (expert, slot) groups are paid for every time, as in training)
 9 Hugging Face transformers + peft training the same architecture (LlamaForCausalLM, random init, SDPA) on the
   same tokens: N adapters one after another (set_adapter, own AdamW, clipping) vs our mixed step, and one
   adapter vs one adapter

Shapes: "tiny" (the tiny-dense / tiny-moe presets) and "large" (d=1024, 4 layers by default, GQA 16/4, SwiGLU
2816, vocab 4096; MoE: 1 layer of 8 experts top-2, expert FFN 1024). The device is
megatron_multilora.platform.device() (CUDA when present); timings synchronise the device.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

ALL_CASES = (1, 2, 3, 4, 5, 6, 7, 8, 9)
# glibc malloc returns large freed blocks to the OS (mmap/munmap), so a large CPU tensor allocated in a step is
# page-faulted in again, more or less often depending on the allocator's history: LoRA keeps each target
# linear's input alive until backward, which pushes more allocations down that path, and the ratios moved by
# +-10% from run to run. These settings keep freed memory in the heap for reuse, as the caching allocator does
# on GPU (the default; --malloc default measures glibc as is).
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(8 << 30),
                "MALLOC_TOP_PAD_": str(512 << 20)}
CASE_TITLES = {
    1: "mixed N tenants vs 1 tenant, same tokens",
    2: "LoRA training step vs frozen-base step",
    3: "mixed ranks vs padding to max_rank",
    4: "mixed training vs tenants one after another",
    5: "resident idle slots: 64 vs 4 (4 active)",
    6: "memory: N tenants vs base (bytes)",
    7: "SlotOptimizer.step vs AdamW(foreach)",
    8: "expert LoRA vs dense LoRA, same tokens x rank",
    9: "HF transformers + peft vs ours (tokens/s)",
}
DENSE = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
EXPERT = ("expert_fc1", "expert_fc2")
RANK = 16  # the rank of every tenant unless a case says otherwise

# The larger CPU-feasible shape: Llama-like, d=1024, GQA 16/4 heads, SwiGLU 2816, small vocabulary so the
# output layer does not dominate. 4 layers by default (--large-layers 8 doubles every model-level time).
LARGE = dict(hidden_size=1024, num_attention_heads=16, num_query_groups=4, ffn_hidden_size=2816,
             vocab_size=4096, max_position_embeddings=256, rotary_base=10000, norm_epsilon=1e-5,
             untie_embeddings_and_output_weights=True, init_method_std=0.02)
LARGE_MOE = dict(LARGE, num_layers=1, num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=1024)


class Shape:
    """Everything a case needs to know about one shape."""

    def __init__(self, name: str, large_layers: int = 4):
        self.name = name
        if name == "tiny":
            self.dense, self.moe = "tiny-dense", "tiny-moe"
            self.layer_dim, self.layer_tokens = 64, 2048  # one linear d -> d, T tokens
            self.seq = 16  # model level: micro-batches of 32 samples x 16 tokens
            self.n_list = (1, 2, 4, 8, 16, 32)
            self.seq_configs = ((2, 1), (8, 1), (32, 1), (8, 4))  # case 4: (tenants, samples per tenant)
            self.moe_samples, self.moe_seq = 8, 16
            self.peer = dict(tenants=8, samples=2, seq=16)
            self.budget = 1.5  # seconds of timed work per measurement (more for the larger shape)
        elif name == "large":
            self.dense = dict(LARGE, num_layers=large_layers)
            self.moe = LARGE_MOE
            self.layer_dim, self.layer_tokens = 1024, 4096
            self.seq = 16
            self.n_list = (1, 8, 32)
            self.seq_configs = ((8, 1), (32, 1))
            self.moe_samples, self.moe_seq = 8, 64
            self.peer = dict(tenants=8, samples=2, seq=32)
            self.budget = 9.0
        else:
            raise SystemExit(f"unknown shape {name!r}: tiny or large")


# ------------------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------------------
class Timer:
    """clock "cpu": this process's CPU time (user + system, page faults included). With one torch thread on a CPU
    all the work runs on the calling thread (autograd too), so it equals wall time on an idle machine but is
    hardly moved by other processes competing for the cores. "wall": time.perf_counter (always on GPU)."""

    def __init__(self, device, quick: bool, clock: str):
        self.device = device
        self.quick = quick
        self.clock_name = clock
        self.clock = time.process_time if clock == "cpu" else time.perf_counter

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def once(self, fn, inner: int = 1, clock=None) -> float:
        clock = clock or self.clock
        self.sync()
        t0 = clock()
        for _ in range(inner):
            fn()
        self.sync()
        return (clock() - t0) / inner

    def measure(self, variants: dict, budget: float, min_rounds: int = 5, max_rounds: int = 15) -> dict:
        """{name: [seconds per call, one per round]}: warm-up calls of each, then rounds in which every variant
        runs once (the order rotates each round); each timed sample lasts >= ~20 ms (inner repeats)."""
        names = list(variants)
        # warm-up, and the plan (repeats, rounds) from wall time, so a loaded machine gets fewer rounds
        warm = {n: max(self.once(variants[n], clock=time.perf_counter), 1e-6) for n in names}
        warm = {n: min(warm[n], self.once(variants[n], clock=time.perf_counter)) if warm[n] < 0.3 else warm[n]
                for n in names}
        inner = {n: max(1, math.ceil(0.02 / warm[n])) for n in names}
        per_round = sum(warm[n] * inner[n] for n in names)
        if self.quick:
            rounds = 3
        else:
            rounds = int(max(min_rounds, min(max_rounds, budget / per_round)))
        times = {n: [] for n in names}
        gc.collect()
        gc.disable()
        try:
            for r in range(rounds):
                k = r % len(names)
                for n in names[k:] + names[:k]:
                    times[n].append(self.once(variants[n], inner[n]))
        finally:
            gc.enable()
        return times


def med(xs) -> float:
    return float(statistics.median(xs))


def ratio(times: dict, num: str, den: str) -> float:
    """Median over rounds of the per-round ratio (both sides were measured in the same round)."""
    return med([a / b for a, b in zip(times[num], times[den])])


def extra(times: dict, variant: str, base: str) -> float:
    """Seconds `variant` takes beyond `base`: the median of per-round differences (drift cancels). Ratios of two
    such differences divide these medians: a median of per-round ratios of noisy differences is biased upward (a
    small denominator explodes the ratio; case 8 measured 1.42 where the medians said 1.13, same run)."""
    return med([a - b for a, b in zip(times[variant], times[base])])


def ms(times: dict) -> dict:
    return {n: round(med(v) * 1e3, 3) for n, v in times.items()}


def row(shape, measure, value, goal=None, lower_is_better=True, **extra):
    met = None
    if goal is not None and value is not None and math.isfinite(value):
        met = bool(value <= goal) if lower_is_better else bool(value >= goal)
    return dict(shape=shape, measure=measure, ratio=value, goal=goal,
                goal_kind=None if goal is None else ("<=" if lower_is_better else ">="), met=met, **extra)


# ------------------------------------------------------------------------------------------------------------
# Building models and layers
# ------------------------------------------------------------------------------------------------------------
class World:
    """A GPT model with slot-indexed LoRA, its slot table, LoRA parameters, their GradBuffer and
    SlotOptimizer, wired as MultiLoRATrainer wires them."""

    def __init__(self, bench, spec, max_slots, max_rank, targets, tenants):
        from megatron_multilora import model as M
        from megatron_multilora import platform
        from megatron_multilora.config import model_config_from
        from megatron_multilora.lora.grads import GradBuffer
        from megatron_multilora.lora.inject import inject_lora, lora_parameters
        from megatron_multilora.lora.slots import LoRASpec, SlotTable
        from megatron_multilora.optim import LRSchedule, SlotHyperParams, SlotOptimizer

        platform.seed_everything(1234)  # the same base for every World of one shape
        self.mc = model_config_from(dict(spec) if isinstance(spec, dict) else spec)
        self.gpt = M.build_gpt_model(self.mc, M.transformer_config(self.mc))
        self.gpt.train()
        self.base = [(n, p) for n, p in self.gpt.named_parameters()]
        self.base_ptrs = {n: p.data_ptr() for n, p in self.base}
        self.table = SlotTable(max_slots, max_rank, tuple(targets), seed=1)
        inject_lora(self.gpt, self.table)
        self.named = lora_parameters(self.gpt)
        self.params = [p for _, p in self.named]
        self.grads = GradBuffer(self.params)
        self.opt = SlotOptimizer(self.named, max_slots, grad_sq_norms=self.grads.sq_norms)
        self.max_slots = max_slots
        self.device = bench.device
        for k in range(tenants):
            self.table.acquire(f"t{k}", LoRASpec(rank=max_rank, alpha=2.0 * max_rank))
            self.opt.configure_slot(k, SlotHyperParams(LRSchedule(lr=1e-4 * (1 + k % 7)), weight_decay=0.01,
                                                       clip_grad=1.0))
        with torch.no_grad():  # a nonzero B, so that every gradient is a real number
            g = torch.Generator().manual_seed(3)
            for layer in self.table.layers:
                b = layer.lora_B
                b[:tenants].copy_(torch.randn(b[:tenants].shape, generator=g) * 0.01)

    def batch(self, samples: int, seq: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, self.mc.vocab_size, (samples, seq), generator=g).to(self.device)
        return tokens, torch.roll(tokens, -1, 1)

    def routing(self, slots):
        from megatron_multilora.lora.routing import AdapterRouting

        return AdapterRouting(slots, self.table)

    def forward_backward(self, tokens, labels, routing):
        from megatron_multilora import model as M

        with routing.active():
            loss = M.forward_micro_batch(self.gpt, tokens, labels)
            loss.sum().backward()
        return loss

    def step_fn(self, slots, tokens, labels, zero_rows=None):
        """A full training step like MultiLoRATrainer.train_step: zero grads, forward/backward, grad sync,
        per-slot AdamW over the slots of `slots` with 1 / (their token count) as grad scale. zero_rows: zero
        only these slots' gradient rows (a tenant trained alone on a shared model)."""
        routing = self.routing(slots)
        seq = tokens.shape[1]
        count = torch.zeros(self.max_slots, dtype=torch.float64)
        for s in slots:
            if s >= 0:
                count[s] += seq
        active = count > 0
        scale = torch.where(active, 1.0 / count.clamp_min(1.0), torch.zeros_like(count)).float()

        # As the trainer does: only the rows of the slots that stepped last time (the same slots here) are
        # zeroed; zero_rows overrides them.
        rows = [s for s in range(self.max_slots) if active[s]] if zero_rows is None else list(zero_rows)

        stepping = [s for s in range(self.max_slots) if active[s]]

        def fn():
            self.grads.zero(rows)
            self.forward_backward(tokens, labels, routing)
            self.grads.sync(stepping)
            self.opt.step(scale, active)

        return fn

    def fwd_bwd_fn(self, slots, tokens, labels):
        """Forward/backward with the gradient rows of the batch's slots zeroed first (as the trainer does)."""
        routing = self.routing(slots)
        rows = sorted({s for s in slots if s >= 0})

        def fn():
            self.grads.zero(rows)
            self.forward_backward(tokens, labels, routing)

        return fn

    def flop_ratio(self, rank: int) -> tuple[float, float]:
        """LoRA FLOPs over frozen-base FLOPs of the target linears (fwd + bwd, no base weight gradient):
        1.5 r (1/d_in + 1/d_out) per linear; (mean over linears, mean weighted by each linear's base FLOPs)."""
        per, weights = [], []
        for layer in self.table.layers:
            d_in, d_out = layer.lora_A.shape[-1], layer.lora_B.shape[-2]
            per.append(1.5 * rank * (1.0 / d_in + 1.0 / d_out))
            weights.append(d_in * d_out)
        return sum(per) / len(per), sum(p * w for p, w in zip(per, weights)) / sum(weights)


def slots_for(n_tenants: int, samples: int, first: int = 0) -> list[int]:
    """`samples` samples split into n contiguous groups of (nearly) equal size, slots first..first+n-1."""
    return [first + i * n_tenants // samples for i in range(samples)]


class LayerWorld:
    """One megatron ColumnParallelLinear d_in -> d_out (frozen) with slot-indexed LoRA, exactly as inject
    wraps linear_qkv, driven by AdapterRouting like the model."""

    def __init__(self, bench, d_in, d_out, max_slots, max_rank):
        from megatron.core.tensor_parallel import ColumnParallelLinear

        from megatron_multilora import model as M
        from megatron_multilora.config import model_config_from
        from megatron_multilora.lora.grads import GradBuffer
        from megatron_multilora.lora.linear import lora_class
        from megatron_multilora.lora.slots import SlotTable

        cfg = M.transformer_config(model_config_from("tiny-dense"))
        torch.manual_seed(0)
        lin = ColumnParallelLinear(d_in, d_out, config=cfg, init_method=torch.nn.init.normal_, bias=False,
                                   gather_output=False, skip_bias_add=True).to(bench.device)
        lin.weight.requires_grad_(False)
        lin.__class__ = lora_class(type(lin))
        self.table = SlotTable(max_slots, max_rank, ("linear_qkv",), seed=1)
        lin.attach_lora(self.table, "linear_qkv", "bench.linear", column=True, tp_group=lin.tp_group,
                        sequence_parallel=False)
        self.table.layers.append(lin)
        with torch.no_grad():
            lin.lora_A.normal_(0, d_in ** -0.5)
            lin.lora_B.normal_(0, 0.01)
        self.lin, self.max_slots, self.max_rank, self.device = lin, max_slots, max_rank, bench.device
        self.grads = GradBuffer([lin.lora_A, lin.lora_B])

    def routing(self, ranks: list[int], samples: int):
        """A routing of `samples` samples over len(ranks) tenants (slots 0..), tenant k of rank ranks[k];
        ranks == []: base only."""
        from megatron_multilora.lora.routing import AdapterRouting
        from megatron_multilora.lora.slots import LoRASpec, SlotTable

        table = SlotTable(self.max_slots, self.max_rank, ("linear_qkv",), seed=1)
        for k, r in enumerate(ranks):
            table.acquire(f"t{k}", LoRASpec(rank=r, alpha=2.0 * r))
        slots = slots_for(len(ranks), samples) if ranks else [-1] * samples
        return AdapterRouting(slots, table)

    def fn(self, routing, x, grad):
        lin, rows = self.lin, sorted(set(routing.sample_slots.tolist()) - {-1})

        def run():
            self.grads.zero(rows)
            xi = x.detach().requires_grad_(True)
            with routing.active():
                y, _ = lin(xi)
            y.backward(grad)

        return run


# ------------------------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args):
        from megatron_multilora import platform

        self.args = args
        self.device = platform.device()
        self.timer = Timer(self.device, args.quick, args.clock)
        self.worlds: dict = {}
        self.results: dict = {str(c): dict(title=CASE_TITLES[c], rows=[], notes=[]) for c in args.cases}

    def world(self, shape: Shape, max_slots: int, *, moe: bool = False, tenants: int | None = None,
              max_rank: int = RANK) -> World:
        key = (shape.name, moe, max_slots, max_rank)
        if key not in self.worlds:
            spec = shape.moe if moe else shape.dense
            targets = EXPERT if moe else DENSE
            self.worlds[key] = World(self, spec, max_slots, max_rank, targets,
                                     max_slots if tenants is None else tenants)
        return self.worlds[key]

    def add(self, case: int, r: dict):
        self.results[str(case)]["rows"].append(r)
        goal = "" if r["goal"] is None else f"{r['goal_kind']} {r['goal']:.4g}"
        met = "" if r["met"] is None else ("ok" if r["met"] else "MISSED")
        print(f"  [{case}] {r['shape']:5s} {r['measure']:<52s} {r['ratio']:8.3f}  {goal:>9s} {met}", flush=True)

    def note(self, case: int, text: str):
        self.results[str(case)]["notes"].append(text)
        print(f"  [{case}] note: {text}", flush=True)

    # ---- case 1 ---------------------------------------------------------------------------------------
    def case1(self, shape: Shape):
        n_list = shape.n_list if not self.args.quick else (1, 4, 32)
        samples = max(n_list)
        d, T = shape.layer_dim, shape.layer_tokens
        lw = LayerWorld(self, d, d, samples, RANK)
        g = torch.Generator().manual_seed(1)
        # token-major [samples * s, 1, d], as the model feeds its linears (model.token_major); megatron's
        # [s, samples, d] (sequence parallelism) as context: there a tenant's rows are strided
        x = torch.randn(T, 1, d, generator=g).to(self.device)
        dy = torch.randn(T, 1, d, generator=g).to(self.device)
        layouts = {"": (x, dy), "sb:": (x.view(samples, -1, d).transpose(0, 1).contiguous(),
                                       dy.view(samples, -1, d).transpose(0, 1).contiguous())}
        sb_list = [n for n in n_list if n in (1, 8, samples)]
        variants = {"base": lw.fn(lw.routing([], samples), x, dy)}
        for n in n_list:
            for tag, (xl, dyl) in layouts.items():
                if not tag or n in sb_list:
                    variants[f"{tag}N={n}"] = lw.fn(lw.routing([RANK] * n, samples), xl, dyl)
        t = self.timer.measure(variants, shape.budget)
        for n in n_list[1:]:
            self.add(1, row(shape.name, f"layer {d}x{d} T={T} r={RANK}: N={n} / N=1", ratio(t, f"N={n}", "N=1"),
                            1.10 if n <= 8 else 1.20, n=n, level="layer", ms=ms(t)))
        for n in sb_list[1:]:
            self.add(1, row(shape.name, f"  (context) the same in the [s, b] layout (sequence parallel): N={n} / N=1",
                            ratio(t, f"sb:N={n}", "sb:N=1"), n=n, level="layer-context"))
        self.add(1, row(shape.name, f"  (context) layer: one LoRA tenant / base linear", ratio(t, "N=1", "base"),
                        level="layer-context"))

        w = self.world(shape, 32)
        tokens, labels = w.batch(samples, shape.seq)
        variants = {f"N={n}": w.fwd_bwd_fn(slots_for(n, samples), tokens, labels) for n in n_list}
        t = self.timer.measure(variants, shape.budget)
        for n in n_list[1:]:
            self.add(1, row(shape.name, f"model fwd+bwd {samples}x{shape.seq} tok: N={n} / N=1",
                            ratio(t, f"N={n}", "N=1"), 1.10 if n <= 8 else 1.20, n=n, level="model", ms=ms(t)))

    # ---- case 2 ---------------------------------------------------------------------------------------
    def case2(self, shape: Shape):
        w = self.world(shape, 32)
        samples, n = 32, 4
        tokens, labels = w.batch(samples, shape.seq)
        slots = slots_for(n, samples)
        variants = {
            "base": w.fwd_bwd_fn([-1] * samples, tokens, labels),
            "lora_fwd_bwd": w.fwd_bwd_fn(slots, tokens, labels),
            "lora_step": w.step_fn(slots, tokens, labels),
        }
        t = self.timer.measure(variants, shape.budget)
        mean, weighted = w.flop_ratio(RANK)
        goal = 1 + 2 * weighted + 0.05
        self.add(2, row(shape.name,
                        f"step (fwd+bwd+opt, {n} tenants r={RANK}) / base fwd+bwd; FLOP ratio {weighted:.3f}",
                        ratio(t, "lora_step", "base"), goal, flop_ratio=weighted, flop_ratio_mean=mean, ms=ms(t)))
        self.add(2, row(shape.name, "LoRA fwd+bwd (no optimizer) / base fwd+bwd", ratio(t, "lora_fwd_bwd", "base"),
                        goal, flop_ratio=weighted))

    # ---- case 3 ---------------------------------------------------------------------------------------
    def case3(self, shape: Shape):
        mixed = [2, 4, 8, 8, 16, 16, 32, 64]
        max_rank, samples = max(mixed), 32
        d, T = shape.layer_dim, shape.layer_tokens
        lw = LayerWorld(self, d, d, len(mixed), max_rank)
        g = torch.Generator().manual_seed(2)
        x = torch.randn(T, 1, d, generator=g).to(self.device)  # token-major, as the model feeds its linears
        dy = torch.randn(T, 1, d, generator=g).to(self.device)
        configs = {"base": [], "mixed": mixed, "padded": [max_rank] * len(mixed)}
        if not self.args.quick:
            configs.update({f"uniform{r}": [r] * len(mixed) for r in (8, 16, 32)})
        variants = {k: lw.fn(lw.routing(v, samples), x, dy) for k, v in configs.items()}
        t = self.timer.measure(variants, shape.budget)
        per = T / len(mixed)
        token_rank = {k: per * sum(v) for k, v in configs.items()}
        lora_ms = {k: 1e3 * extra(t, k, "base") for k in configs if k != "base"}
        self.add(3, row(shape.name, f"layer {d}x{d}: mixed ranks {mixed} / all padded to {max_rank}",
                        ratio(t, "mixed", "padded"), 1.0, ms=ms(t), token_rank=token_rank, lora_ms=lora_ms))
        self.add(3, row(shape.name, "  LoRA time (minus base) mixed / padded",
                        lora_ms["mixed"] / max(lora_ms["padded"], 1e-9),
                        note="compare: tokens x rank ratio %.3f" % (token_rank["mixed"] / token_rank["padded"])))
        self.add(3, row(shape.name, "  sum tokens x rank: mixed / padded", token_rank["mixed"] / token_rank["padded"]))
        uniform = [k for k in configs if k.startswith("uniform")] + ["padded"]
        if len(uniform) >= 3:  # least-squares line through the uniform-rank points: is mixed on it?
            xs = [token_rank[k] for k in uniform]
            ys = [lora_ms[k] for k in uniform]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
            predicted = my + slope * (token_rank["mixed"] - mx)
            self.add(3, row(shape.name, "  mixed LoRA time / line fitted on uniform ranks",
                            lora_ms["mixed"] / max(predicted, 1e-9), slope_ms_per_token_rank=slope))

    # ---- case 4 ---------------------------------------------------------------------------------------
    def case4(self, shape: Shape):
        configs = shape.seq_configs if not self.args.quick else ((8, 1), (32, 1))
        w = self.world(shape, 32)
        for n, b in configs:
            tokens, labels = w.batch(n * b, shape.seq, seed=n)
            mixed = w.step_fn(slots_for(n, n * b), tokens, labels)
            alone = [w.step_fn([k] * b, tokens[k * b:(k + 1) * b], labels[k * b:(k + 1) * b], zero_rows=[k])
                     for k in range(n)]

            def sequential(alone=alone):
                for fn in alone:
                    fn()

            t = self.timer.measure({"mixed": mixed, "sequential": sequential}, shape.budget)
            r = ratio(t, "mixed", "sequential")
            self.add(4, row(shape.name, f"step {n} tenants x {b}x{shape.seq} tok: mixed / one after another", r, 1.0,
                            tenants=n, samples_per_tenant=b, speedup=1 / r, ms=ms(t)))

    # ---- case 5 ---------------------------------------------------------------------------------------
    def case5(self, shape: Shape):
        few, many = self.world(shape, 4, tenants=4), self.world(shape, 64, tenants=4)
        samples = 8
        tokens, labels = few.batch(samples, shape.seq)
        slots = slots_for(4, samples)
        t = self.timer.measure({
            "4": few.step_fn(slots, tokens, labels), "64": many.step_fn(slots, tokens, labels),
            "4_fb": few.fwd_bwd_fn(slots, tokens, labels), "64_fb": many.fwd_bwd_fn(slots, tokens, labels),
        }, shape.budget)
        self.add(5, row(shape.name, f"train step, 4 active, {samples}x{shape.seq} tok: 64 slots / 4 slots",
                        ratio(t, "64", "4"), 1.03, ms=ms(t)))
        self.add(5, row(shape.name, "  fwd+bwd only (active slots' grad rows zeroed): 64 slots / 4 slots",
                        ratio(t, "64_fb", "4_fb"), 1.03))

    # ---- case 6 ---------------------------------------------------------------------------------------
    def case6(self, shape: Shape):
        slot_counts = (4, 32, 64) if not self.args.quick else (4, 64)
        for slots in slot_counts:
            w = self.world(shape, slots, tenants=min(slots, 32 if slots == 32 else 4))
            active = min(slots, 4)
            tokens, labels = w.batch(active, shape.seq)
            w.step_fn(list(range(active)), tokens, labels)()  # grads and optimizer scratch exist now
            ptr_ok = all(p.data_ptr() == w.base_ptrs[n] for n, p in w.base)
            no_base_grad = all(p.grad is None and not p.requires_grad for _, p in w.base)
            storages = {}

            def count(t):
                if t is not None:
                    s = t.untyped_storage()
                    storages[s.data_ptr()] = s.nbytes()

            base_bytes = sum(p.numel() * p.element_size() for _, p in w.base)
            for p in w.gpt.parameters():
                count(p)
                count(p.grad)
            opt = w.opt
            for tensors in (opt._exp_avg, opt._exp_avg_sq, opt._master, opt._work):
                for t in tensors:
                    count(t)
            total = sum(storages.values())
            per_slot = {"weights": 0, "grads": 0, "optimizer": 0}
            for i, p in enumerate(w.params):
                one = p[0].numel()
                per_slot["weights"] += one * p.element_size()
                per_slot["grads"] += one * p.grad.element_size()
                per_slot["optimizer"] += one * 4 * (3 + (opt._master[i] is not None))  # m, v, scratch (+master)
            adapter = sum(per_slot.values())
            expected = base_bytes + slots * adapter
            self.add(6, row(shape.name, f"{slots} slots: (base + grads + optimizer) / base bytes; = base + N x slot "
                                        f"exactly: {total == expected}, base never copied: {ptr_ok and no_base_grad}",
                            total / base_bytes,
                            base_bytes=base_bytes, adapter_bytes_per_slot=per_slot, total_bytes=total,
                            expected_bytes=expected, exact=total == expected, base_ptrs_unchanged=ptr_ok,
                            base_has_no_grad=no_base_grad))
            if not (total == expected and ptr_ok and no_base_grad):
                self.note(6, f"{shape.name} {slots} slots: total {total} != base + N x adapter {expected}, "
                             f"ptrs unchanged {ptr_ok}, base without grad {no_base_grad}")
        self.note(6, f"{shape.name}: one slot (rank {RANK}, {len(w.params) // 2} target linears) = "
                     f"{adapter / 2**20:.2f} MiB (weights {per_slot['weights'] / 2**20:.2f}, grads "
                     f"{per_slot['grads'] / 2**20:.2f}, AdamW m+v+scratch {per_slot['optimizer'] / 2**20:.2f}); "
                     f"base {base_bytes / 2**20:.1f} MiB; base data_ptrs unchanged and no base gradient: "
                     f"{ptr_ok and no_base_grad}")

    # ---- case 7 ---------------------------------------------------------------------------------------
    def case7(self, shape: Shape):
        from megatron_multilora.lora.grads import GradBuffer
        from megatron_multilora.optim import LRSchedule, SlotHyperParams, SlotOptimizer

        w = self.world(shape, 32)  # real LoRA parameter shapes of the shape's dense model
        for slots in ((8, 32) if not self.args.quick else (8,)):
            g = torch.Generator().manual_seed(4)
            params = [torch.nn.Parameter(torch.randn((slots,) + tuple(p.shape[1:]), generator=g).to(self.device))
                      for p in w.params]
            # AdamW gets its own contiguous copies (the SlotOptimizer moves its parameters into one flat buffer,
            # and the trainer's grads are rows of a GradBuffer: strided tensors would slow AdamW's foreach down)
            plain = [torch.nn.Parameter(p.detach().clone()) for p in params]
            grads = GradBuffer(params)
            for p, q in zip(params, plain):
                q.grad = torch.randn(p.shape, generator=g).to(self.device) * 1e-3
                p.grad.copy_(q.grad)
            slot_opt = SlotOptimizer([(f"p{i}", p) for i, p in enumerate(params)], slots,
                                     grad_sq_norms=grads.sq_norms)
            for k in range(slots):
                slot_opt.configure_slot(k, SlotHyperParams(LRSchedule(lr=1e-4 * (1 + k % 7)), weight_decay=0.01,
                                                           clip_grad=1.0))
            adamw = torch.optim.AdamW(plain, lr=1e-4, weight_decay=0.01, foreach=True)
            # context: torch's fused kernel, which the SlotOptimizer runs per slot row (own copies and grads)
            fused_params = [torch.nn.Parameter(q.detach().clone()) for q in plain]
            for q, f in zip(plain, fused_params):
                f.grad = q.grad.clone()
            adamw_fused = torch.optim.AdamW(fused_params, lr=1e-4, weight_decay=0.01, fused=True)
            scale = torch.full((slots,), 1e-2)
            active = torch.ones(slots, dtype=torch.bool)

            def clip_adamw():
                torch.nn.utils.clip_grad_norm_(plain, 1.0, foreach=True)
                adamw.step()

            t = self.timer.measure({"slot": lambda: slot_opt.step(scale, active), "adamw": adamw.step,
                                    "clip_adamw": clip_adamw, "adamw_fused": adamw_fused.step}, shape.budget)
            numel = sum(p.numel() for p in params)
            self.add(7, row(shape.name, f"{slots} slots all stepping ({numel / 1e6:.2f}M params): Slot / AdamW",
                            ratio(t, "slot", "adamw"), 1.2, ms=ms(t), slots=slots))
            self.add(7, row(shape.name, "  Slot / (clip_grad_norm_ + AdamW)", ratio(t, "slot", "clip_adamw")))
            self.add(7, row(shape.name, "  Slot / AdamW(fused=True), one tensor per parameter, no clipping",
                            ratio(t, "slot", "adamw_fused")))

    # ---- case 8 ---------------------------------------------------------------------------------------
    def case8(self, shape: Shape):
        # One-layer models on both sides: each timed call zeroes its model's LoRA gradient rows, which with the
        # 4-layer tiny MoE preset were 16x the dense side's (~0.03 ms of the MoE "LoRA time", not the layer's).
        from megatron_multilora.config import model_config_from

        moe_spec = dict(model_config_from(shape.moe).to_dict() if isinstance(shape.moe, str) else shape.moe,
                        num_layers=1)
        dense_spec = {k: v for k, v in moe_spec.items() if not k.startswith("moe_") and k != "num_experts"}
        dense_spec.update(ffn_hidden_size=moe_spec["moe_ffn_hidden_size"])
        for key, spec, targets in (("moe-one-layer", moe_spec, EXPERT),
                                   ("dense-expert-shape", dense_spec, ("linear_fc1", "linear_fc2"))):
            if (shape.name, key) not in self.worlds:
                self.worlds[(shape.name, key)] = World(self, spec, 4, RANK, targets, 4)
        moe, dense = self.worlds[(shape.name, "moe-one-layer")], self.worlds[(shape.name, "dense-expert-shape")]
        mc = moe.mc
        samples, seq, k = shape.moe_samples, shape.moe_seq, mc.moe_router_topk
        g = torch.Generator().manual_seed(5)
        # Token-major [samples * s, 1, h], as the model feeds its layers (model.token_major). Each call takes the
        # next of several micro-batches, as training does: the experts' per-micro-batch bookkeeping (the router
        # sends other tokens to each (expert, slot) every time) is paid every call, never found in a cache.
        h_moe = [torch.randn(samples * seq, 1, mc.hidden_size, generator=g).to(self.device) for _ in range(16)]
        h_dense = [torch.randn(samples * seq * k, 1, mc.hidden_size, generator=g).to(self.device) for _ in range(16)]
        slots = slots_for(4, samples)

        def layer_fn(w, mlp, hs, slots):
            routing = w.routing(slots)
            rows = sorted({s for s in slots if s >= 0})
            inputs = itertools.cycle(hs)

            def fn():
                w.grads.zero(rows)
                hi = next(inputs).detach().requires_grad_(True)
                with routing.active():
                    out, _ = mlp(hi)
                out.sum().backward()

            return fn

        moe_mlp, dense_mlp = moe.gpt.decoder.layers[0].mlp, dense.gpt.decoder.layers[0].mlp
        t = self.timer.measure({
            "moe_base": layer_fn(moe, moe_mlp, h_moe, [-1] * samples),
            "moe_lora": layer_fn(moe, moe_mlp, h_moe, slots),
            "dense_base": layer_fn(dense, dense_mlp, h_dense, [-1] * samples),
            "dense_lora": layer_fn(dense, dense_mlp, h_dense, slots),
        }, 2 * shape.budget, min_rounds=15, max_rounds=30)  # differences of timings: more rounds
        moe_lora, dense_lora = extra(t, "moe_lora", "moe_base"), extra(t, "dense_lora", "dense_base")
        routed = seq * samples * k
        self.add(8, row(shape.name,
                        f"LoRA time: expert ({mc.num_experts}E top{k}) / dense, {routed} routed tok x r{RANK}",
                        moe_lora / max(dense_lora, 1e-9), 1.3, ms=ms(t), moe_lora_ms=moe_lora * 1e3,
                        dense_lora_ms=dense_lora * 1e3))
        self.add(8, row(shape.name, "  MoE layer with expert LoRA / MoE layer base", ratio(t, "moe_lora", "moe_base")))
        self.add(8, row(shape.name, "  dense MLP with LoRA / dense MLP base", ratio(t, "dense_lora", "dense_base")))

    # ---- case 9 ---------------------------------------------------------------------------------------
    def case9(self, shape: Shape):
        import transformers
        from peft import LoraConfig, get_peft_model

        transformers.logging.set_verbosity_error()
        n, b, seq = shape.peer["tenants"], shape.peer["samples"], shape.peer["seq"]
        w = self.world(shape, n)  # n resident slots, as PEFT holds n adapters
        mc = w.mc
        cfg = transformers.LlamaConfig(
            vocab_size=mc.vocab_size, hidden_size=mc.hidden_size, intermediate_size=mc.ffn_hidden_size,
            num_hidden_layers=mc.num_layers, num_attention_heads=mc.num_attention_heads,
            num_key_value_heads=mc.num_query_groups, max_position_embeddings=mc.max_position_embeddings,
            rms_norm_eps=mc.norm_epsilon, rope_theta=mc.rotary_base, tie_word_embeddings=False,
            attention_bias=False, mlp_bias=False,
        )
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        hf = transformers.LlamaForCausalLM(cfg).to(self.device)
        plain = transformers.LlamaForCausalLM(cfg).to(self.device).requires_grad_(False)  # the frozen base alone
        plain.load_state_dict(hf.state_dict())
        plain.train()
        lcfg = dict(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0,
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        peft = get_peft_model(hf, LoraConfig(**lcfg), adapter_name="a0")
        for k in range(1, n):
            peft.add_adapter(f"a{k}", LoraConfig(**lcfg))
        peft.train()
        opts = {}
        for k in range(n):
            names = [f".{'a%d' % k}." ]
            params = [p for name, p in peft.named_parameters() if "lora_" in name and any(s in name for s in names)]
            opts[k] = (torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, foreach=True), params)
        tokens, labels = w.batch(n * b, seq, seed=9)

        def peft_step(k, tok, lab):
            peft.set_adapter(f"a{k}")
            opt, params = opts[k]
            logits = peft(input_ids=tok).logits
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), lab.reshape(-1),
                                                     reduction="sum")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=False)

        def peft_sequential():
            for k in range(n):
                peft_step(k, tokens[k * b:(k + 1) * b], labels[k * b:(k + 1) * b])

        def input_grads(model, fn):
            """fn with the embedding output requiring grad (so backward also computes the first layer's input
            gradient), as our model does only where it must: base-only micro-batches (ours_base here), EP / PP
            collectives and activation recompute (lora/inject.py)."""
            def run():
                hook = model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
                try:
                    fn()
                finally:
                    hook.remove()
            return run

        def hf_base():  # the frozen base alone (backward runs because the embedding output requires grad)
            logits = plain(input_ids=tokens).logits
            torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                              reduction="sum").backward()

        t = self.timer.measure({
            "peft_seq": peft_sequential,
            "ours_mixed": w.step_fn(slots_for(n, n * b), tokens, labels),
            "peft_one": lambda: peft_step(0, tokens, labels),
            "ours_one": w.step_fn([0] * (n * b), tokens, labels),
            "peft_one_input_grads": input_grads(hf, lambda: peft_step(0, tokens, labels)),
            "hf_base": input_grads(plain, hf_base),
            "ours_base": w.fwd_bwd_fn([-1] * (n * b), tokens, labels),
        }, shape.budget)
        tok = n * b * seq
        tps = {k: tok / med(v) for k, v in t.items()}
        self.add(9, row(shape.name, f"tokens/s ours mixed / PEFT {n} adapters one after another ({b}x{seq} tok each)",
                        ratio(t, "peft_seq", "ours_mixed"), 1.0, lower_is_better=False, tokens_per_s=tps, ms=ms(t)))
        self.add(9, row(shape.name, f"tokens/s ours / PEFT, one adapter, {n * b}x{seq} tok",
                        ratio(t, "peft_one", "ours_one"), 1.0, lower_is_better=False))
        self.add(9, row(shape.name,
                        "  (context) one adapter, PEFT also computing the input gradient: tokens/s ours / PEFT",
                        ratio(t, "peft_one_input_grads", "ours_one")))
        self.add(9, row(shape.name, "  (context) frozen-base fwd+bwd: tokens/s megatron-core / HF Llama",
                        ratio(t, "hf_base", "ours_base")))
        self.add(9, row(shape.name, "  (context) one adapter step / its own frozen base: ours",
                        ratio(t, "ours_one", "ours_base")))
        self.add(9, row(shape.name, "  (context) one adapter step / its own frozen base: PEFT (with input grads)",
                        ratio(t, "peft_one_input_grads", "hf_base")))
        del peft, hf, plain, opts

    def run(self):
        for shape_name in self.args.shapes:
            shape = Shape(shape_name, self.args.large_layers)
            print(f"== shape {shape_name}", flush=True)
            for c in self.args.cases:
                t0 = time.perf_counter()
                getattr(self, f"case{c}")(shape)
                print(f"  [{c}] {CASE_TITLES[c]}: {time.perf_counter() - t0:.1f} s", flush=True)
            # free this shape's models before the next one
            self.worlds = {k: v for k, v in self.worlds.items() if k[0] != shape_name}
            gc.collect()


# ------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------
def machine(threads: int) -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from megatron.core.package_info import __version__ as mcore

    info = dict(nproc=os.cpu_count(), cpu=cpu, torch=torch.__version__, megatron_core=mcore,
                torch_threads=threads, device=str(Bench_device()))
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def Bench_device():
    from megatron_multilora import platform

    return platform.device()


def markdown(results: dict, info: dict) -> str:
    lines = [
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), torch {info['torch']} with {info['torch_threads']} "
        f"thread(s), megatron-core {info['megatron_core']}, device {info['device']}, clock: "
        f"{'process CPU time' if info.get('clock') == 'cpu' else 'wall time'}; each ratio is the median of "
        "per-round ratios of variants run interleaved in one process (ratios of differences, as case 8's LoRA times: "
        "the ratio of the medians of per-round differences); malloc: " + info.get("malloc", "default") + ".",
        "",
        "Shapes: tiny = the tiny-dense / tiny-moe presets (d=64); large = d=1024, "
        f"{info.get('large_layers', 4)} layers, "
        "16 heads / 4 KV groups, SwiGLU 2816, vocab 4096, micro-batches of 32 x 16 tokens (MoE: one layer of 8 experts "
        "top-2, expert FFN 1024). LoRA rank 16 on linear_qkv, linear_proj, linear_fc1, linear_fc2 unless stated.",
        "",
        "| case | shape | measure | ratio | goal | met |",
        "| --- | --- | --- | ---: | --- | --- |",
    ]
    for c, res in results.items():
        for r in res["rows"]:
            goal = "" if r["goal"] is None else f"{r['goal_kind']} {r['goal']:.4g}"
            met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
            value = r["ratio"]
            lines.append(f"| {c} {res['title'] if r is res['rows'][0] else ''} | {r['shape']} | "
                         f"{r['measure'].strip()} | {value:.3f} | {goal} | {met} |")
    notes = [f"- case {c}: {n}" for c, res in results.items() for n in res["notes"]]
    return "\n".join(lines + ([""] + notes if notes else []))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    ax = axes[0][0]
    rows = results.get("1", {}).get("rows", [])
    for shape in sorted({r["shape"] for r in rows}):
        for level, style in (("layer", "o-"), ("model", "s--")):
            pts = [(r["n"], r["ratio"]) for r in rows if r["shape"] == shape and r.get("level") == level]
            if pts:
                ax.plot(*zip(*([(1, 1.0)] + pts)), style, label=f"{shape} {level}")
    if rows:
        ax.plot([1, 8], [1.10, 1.10], "k:", lw=1)
        ax.plot([8, 32], [1.20, 1.20], "k:", lw=1, label="goal")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
    ax.set_title("1: N tenants / one tenant (same tokens)")
    ax.set_xlabel("tenants in the micro-batch")
    ax.set_ylabel("time ratio")

    ax = axes[0][1]
    rows = [r for r in results.get("3", {}).get("rows", []) if "token_rank" in r]
    for r in rows:
        tr, lm = r["token_rank"], r["lora_ms"]
        keys = sorted(lm, key=lambda k: tr[k])
        ax.plot([tr[k] for k in keys if k != "mixed"], [lm[k] for k in keys if k != "mixed"], "o-",
                label=f"{r['shape']} uniform / padded")
        ax.plot([tr["mixed"]], [lm["mixed"]], "r*", ms=12)
    ax.set_title("3: LoRA time (minus base) vs sum of tokens x rank (red: mixed ranks)")
    ax.set_xlabel("tokens x rank")
    ax.set_ylabel("ms")
    if rows:
        ax.legend(fontsize=8)

    ax = axes[1][0]
    rows = results.get("4", {}).get("rows", [])
    if rows:
        labels = [f"{r['shape']}\n{r['tenants']}x{r['samples_per_tenant']}" for r in rows]
        ax.bar(range(len(rows)), [r["speedup"] for r in rows], color="tab:green")
        ax.axhline(1.0, color="k", ls=":")
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_title("4: speed-up of mixed over one-after-another (tenants x samples)")

    ax = axes[1][1]
    summary = [(f"{c} {r['shape']}: {r['measure'].strip()[:38]}", r) for c, res in results.items()
               for r in res["rows"] if r["goal"] is not None and c != "1"]
    if summary:
        vals = [r["ratio"] / r["goal"] if r["goal_kind"] == "<=" else r["goal"] / r["ratio"] for _, r in summary]
        colors = ["tab:green" if r["met"] else "tab:red" for _, r in summary]
        ax.barh(range(len(summary)), vals, color=colors)
        ax.axvline(1.0, color="k", ls=":")
        ax.set_yticks(range(len(summary)), [s for s, _ in summary], fontsize=6)
        ax.invert_yaxis()
    ax.set_title("cases 2-9: measured / goal (< 1 meets it)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes only, 3 rounds (else 5-15), fewer variants")
    ap.add_argument("--cases", default=",".join(map(str, ALL_CASES)), help="comma-separated case numbers")
    ap.add_argument("--shapes", default=None, help="tiny,large (default: both; --quick: tiny)")
    ap.add_argument("--large-layers", type=int, default=4, help="layers of the large shape (default 4)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                    help="auto: process CPU time on a CPU with --threads 1 (robust on a shared machine), else wall")
    ap.add_argument("--out", default=None,
                    help="directory for bench.json and bench.png (the plot needs matplotlib: requirements-test.txt)")
    ap.add_argument("--markdown", default=None, help="also write the markdown table to this file")
    ap.add_argument("--malloc", choices=("default", "tuned"), default="tuned",
                    help="tuned (default): re-run under glibc settings that keep freed memory for reuse ("
                         + " ".join(f"{k}={v}" for k, v in TUNED_MALLOC.items())
                         + "), like the caching allocator on GPU; default: glibc as is, which page-faults large CPU "
                         "tensors in afresh every step depending on its history (ratios then move by +-10%% between "
                         "runs)")
    args = ap.parse_args(argv)
    if args.malloc == "tuned" and any(os.environ.get(k) != v for k, v in TUNED_MALLOC.items()):
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:],
                  {**os.environ, **TUNED_MALLOC})
    try:
        args.cases = sorted({int(c) for c in args.cases.split(",") if c.strip()})
    except ValueError:
        ap.error(f"--cases: comma-separated case numbers, got {args.cases!r}")
    bad = [c for c in args.cases if c not in ALL_CASES]
    if bad:
        ap.error(f"unknown cases {bad}; known: {ALL_CASES}")
    args.shapes = (args.shapes or ("tiny" if args.quick else "tiny,large")).split(",")

    if args.clock == "auto":
        args.clock = "cpu" if args.threads == 1 and not torch.cuda.is_available() else "wall"
    if args.clock == "cpu" and torch.cuda.is_available():
        ap.error("--clock cpu cannot time CUDA work")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from megatron_multilora import platform

    platform.initialize_model_parallel(platform.ParallelLayout(), seed=1234)
    start = time.perf_counter()
    bench = Bench(args)
    try:
        bench.run()
    finally:
        platform.destroy()
    info = machine(args.threads)
    info["clock"] = args.clock
    info["large_layers"] = args.large_layers
    info["malloc"] = "tuned: " + " ".join(f"{k}={os.environ.get(k)}" for k in TUNED_MALLOC) \
        if args.malloc == "tuned" else "default"
    info["seconds"] = round(time.perf_counter() - start, 1)
    table = markdown(bench.results, info)
    print()
    print(table)
    print(f"\n{info['seconds']} s")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table + "\n")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        doc = dict(machine=info, args=dict(quick=args.quick, cases=args.cases, shapes=args.shapes,
                                           large_layers=args.large_layers, threads=args.threads, clock=args.clock,
                                           malloc=args.malloc),
                   cases=bench.results)
        (out / "bench.json").write_text(json.dumps(doc, indent=1, default=float))
        plot(bench.results, out / "bench.png")
        print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
