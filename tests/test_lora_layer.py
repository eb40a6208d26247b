"""Layer-level batch invariance of slot-indexed LoRA against an independent plain-PyTorch reference.

One megatron ColumnParallelLinear (linear_qkv) and one RowParallelLinear (linear_proj) are wrapped the way
inject does it, in a 4-slot pool of max rank 16 holding tenants of ranks 4 / 8 (rsLoRA) / 16 with different
alphas, one idle slot and one base-only sample. Each sample's output and every gradient must equal what the
tenant would get alone from y = x W^T + s (x A^T) B^T with A, B sliced to the tenant's rank. A single spawned
process (megatron needs its parallel state) computes everything; the tests below only compare. The ops-level
tests at the end run in process: runs of segments batched into one bmm (ops.py) against a per-segment reference.
"""

import pytest
import torch

from megatron_multilora.lora.routing import AdapterRouting
from megatron_multilora.lora.slots import LoRASpec, SlotTable
from tests.distributed import run_world

SEQ, IN, MID = 5, 64, 96  # qkv: 64 -> 96 (column-parallel), proj: 96 -> 64 (row-parallel)
MAX_SLOTS, MAX_RANK = 4, 16
TENANTS = [  # name, rank, alpha, rslora
    ("t4", 4, 8.0, False),
    ("t8", 8, 4.0, True),
    ("t16", 16, 32.0, False),
]
SLOTS = [1, 1, 0, 0, -1, 2, 2, 2]  # grouped by slot, a base-only sample in the middle; slot 3 idle
DROP_SLOTS = [0, 0, 3, 3, 3, -1, 1, 2]  # slot 3 then holds a tenant with dropout 0.5
LAYERS = ("qkv", "proj")
TOL = 1e-5


def _scale(rank, alpha, rslora):
    return alpha / (rank**0.5 if rslora else rank)


def _reference(x, w, slots, adapters, g):
    """Plain PyTorch, sample by sample: y_n = x_n W^T (+ s (x_n A^T) B^T if the sample has a slot).
    adapters: slot -> (A [r, in], B [out, r], s). Returns y, dx, {slot: (dA, dB)}."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone()
    leaves = {s: (a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True), sc)
              for s, (a, b, sc) in adapters.items()}
    cols = []
    for n, s in enumerate(slots):
        xn = x[:, n]
        yn = xn @ w.t()
        if s >= 0:
            a, b, sc = leaves[s]
            yn = yn + sc * ((xn @ a.t()) @ b.t())
        cols.append(yn)
    y = torch.stack(cols, dim=1)
    (y * g).sum().backward()
    return y.detach(), x.grad, {s: (a.grad, b.grad) for s, (a, b, _) in leaves.items()}


def _layers(table, config, weights=None):
    """A LoRA-wrapped column-parallel qkv and row-parallel proj registered in `table` (frozen base)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_multilora.lora.linear import lora_class

    col = ColumnParallelLinear(IN, MID, config=config, init_method=torch.nn.init.normal_, bias=False,
                               gather_output=False, skip_bias_add=True)
    row = RowParallelLinear(MID, IN, config=config, init_method=torch.nn.init.normal_, bias=False,
                            input_is_parallel=True, skip_bias_add=True)
    out = {}
    for key, module, kind, column in (("qkv", col, "linear_qkv", True), ("proj", row, "linear_proj", False)):
        if weights is not None:
            with torch.no_grad():
                module.weight.copy_(weights[key])
        module.weight.requires_grad_(False)
        module.__class__ = lora_class(type(module))
        module.attach_lora(table, kind, f"layer.{key}", column=column, tp_group=module.tp_group,
                           sequence_parallel=False)
        table.layers.append(module)
        out[key] = module
    return out


def _to(t, layout):
    """[s, n, d] as the layer sees it: as is, or token-major [n * s, 1, d] (model.token_major)."""
    return t if layout == "sb" else t.transpose(0, 1).reshape(-1, 1, t.shape[-1])


def _back(t, n, layout):
    """The inverse of _to: back to [s, n, d]."""
    return t if layout == "sb" else t.view(n, -1, t.shape[-1]).transpose(0, 1)


def _run(layers, x, slots, table, g, layout):
    """Forward + backward of each layer on its own input (in `layout`) under the routing; returns outputs and
    input gradients as [s, n, d], and the weight gradients."""
    routing = AdapterRouting(slots, table)
    res = {}
    for key, layer in layers.items():
        xi = _to(x[key], layout).detach().clone().requires_grad_(True)
        assert routing.tokens_per_sample(xi.shape) == (1 if layout == "sb" else x[key].shape[0])
        for p in (layer.lora_A, layer.lora_B):
            p.grad = None
        with routing.active():
            y, bias = layer(xi)
        assert bias is None
        (y * _to(g[key], layout)).sum().backward()
        n = len(slots)
        res[key] = dict(
            y=_back(y.detach(), n, layout).clone(), dx=_back(xi.grad, n, layout).clone(),
            dA=layer.lora_A.grad.clone(), dB=layer.lora_B.grad.clone(), weight_grad_none=layer.weight.grad is None,
        )
    return res


def _worker(layout):
    from megatron_multilora import platform
    from megatron_multilora.config import model_config_from
    from megatron_multilora.model import transformer_config

    platform.initialize_model_parallel(platform.ParallelLayout(), seed=11)
    config = transformer_config(model_config_from("tiny-dense"))
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    table = SlotTable(MAX_SLOTS, MAX_RANK, seed=7)
    layers = _layers(table, config)
    init_a, adapters = {}, {k: {} for k in LAYERS}
    for name, rank, alpha, rslora in TENANTS:
        slot = table.acquire(name, LoRASpec(rank=rank, alpha=alpha, rslora=rslora))
        for key, layer in layers.items():
            init_a[(name, key)] = layer.lora_A[slot].detach().clone()
            a = rnd(*layer.global_shape("a", rank))
            b = rnd(*layer.global_shape("b", rank))
            layer.set_slot(slot, a=a, b=b)
            adapters[key][slot] = (a, b, _scale(rank, alpha, rslora))
    n = len(SLOTS)
    x = {"qkv": rnd(SEQ, n, IN), "proj": rnd(SEQ, n, MID)}
    g = {"qkv": rnd(SEQ, n, MID), "proj": rnd(SEQ, n, IN)}
    weights = {k: layer.weight.detach().clone() for k, layer in layers.items()}

    out = dict(weights=weights, adapters=adapters, x=x, g=g)
    out["multi"] = _run(layers, x, SLOTS, table, g, layout)
    out["ref"] = {
        key: _reference(x[key], weights[key], SLOTS, adapters[key], g[key]) for key in LAYERS
    }
    # one token per sample ([1, n, d], or token-major [n, 1, d])
    first = {k: v[:1] for k, v in x.items()}
    out["one_token"] = _run(layers, first, SLOTS, table, {k: v[:1] for k, v in g.items()}, layout)
    out["one_token_ref"] = {
        key: _reference(first[key], weights[key], SLOTS, adapters[key], g[key][:1]) for key in LAYERS
    }

    # The rank-4 tenant alone in a max-rank-4 pool (same seed, same layer names, same weights).
    small = SlotTable(1, 4, seed=7)
    small_layers = _layers(small, config, weights)
    name, rank, alpha, rslora = TENANTS[0]
    small.acquire(name, LoRASpec(rank=rank, alpha=alpha, rslora=rslora))
    out["small_init_a"] = {k: small_layers[k].lora_A[0].detach().clone() for k in LAYERS}
    out["big_init_a"] = {k: init_a[(name, k)] for k in LAYERS}
    for key, layer in small_layers.items():
        a, b, _ = adapters[key][0]
        layer.set_slot(0, a=a, b=b)
    idx = [i for i, s in enumerate(SLOTS) if s == 0]
    out["small_idx"] = idx
    out["small"] = _run(small_layers, {k: v[:, idx] for k, v in x.items()}, [0] * len(idx), small,
                        {k: v[:, idx] for k, v in g.items()}, layout)

    # LoRA dropout: a tenant with dropout 0.5 in the idle slot 3; training vs eval mode.
    slot = table.acquire("drop", LoRASpec(rank=8, alpha=16.0, dropout=0.5))
    assert slot == 3
    drop = {}
    for key, layer in layers.items():
        a, b = rnd(*layer.global_shape("a", 8)), rnd(*layer.global_shape("b", 8))
        layer.set_slot(slot, a=a, b=b)
        xd = rnd(SEQ, len(DROP_SLOTS), x[key].shape[-1])
        routing = AdapterRouting(DROP_SLOTS, table)
        res = {}
        def apply(_layer=layer, _xd=xd):
            return _back(_layer(_to(_xd, layout))[0], len(DROP_SLOTS), layout)

        with torch.no_grad(), routing.active():
            for mode in ("train", "eval"):
                layer.train(mode == "train")
                res[mode] = apply()
            layer.set_slot(slot, a=a, b=torch.zeros_like(b))  # no LoRA delta: dropout must change nothing
            layer.train(True)
            res["train_b0"] = apply()
            layer.train(False)
            res["eval_b0"] = apply()
        ads = dict(adapters[key])
        ads[3] = (a, b, 16.0 / 8)
        res["ref_eval"] = _reference(xd, weights[key], DROP_SLOTS, ads, torch.zeros_like(res["eval"]))[0]
        drop[key] = res
    out["drop"] = drop
    return out


@pytest.fixture(scope="module", params=["sb", "token_major"])
def world(request):
    """Every layer test in megatron's [s, b, h] layout (under sequence parallelism) and token-major."""
    return run_world(_worker, 1, request.param)[0]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("key", LAYERS)
def test_outputs_match_reference(world, key):
    y, ref_y = world["multi"][key]["y"], world["ref"][key][0]
    assert _rel(y, ref_y) <= TOL
    # The adapters change every adapted sample noticeably, so the comparison above is not vacuous.
    base = torch.einsum("lni,oi->lno", world["x"][key], world["weights"][key])
    for n, s in enumerate(SLOTS):
        if s >= 0:
            assert _rel(base[:, n], ref_y[:, n]) > 1e-2, f"sample {n}: LoRA delta is negligible"
        else:
            assert _rel(y[:, n], base[:, n]) <= TOL, "the base-only sample is not base-only"


@pytest.mark.parametrize("key", LAYERS)
def test_input_gradient_matches_reference(world, key):
    dx, ref_dx = world["multi"][key]["dx"], world["ref"][key][1]
    assert _rel(dx, ref_dx) <= TOL
    base_dx = torch.einsum("lno,oi->lni", world["g"][key], world["weights"][key])
    n = SLOTS.index(-1)
    assert _rel(dx[:, n], base_dx[:, n]) <= TOL, "the base-only sample's input gradient has a LoRA term"


@pytest.mark.parametrize("key", LAYERS)
def test_per_slot_weight_gradients_match_reference(world, key):
    res, ref = world["multi"][key], world["ref"][key][2]
    for slot, (_name, rank, _alpha, _rs) in enumerate(TENANTS):
        da, db = ref[slot]
        assert _rel(res["dA"][slot, :rank], da) <= TOL, (slot, "A")
        assert _rel(res["dB"][slot, :, :rank], db) <= TOL, (slot, "B")
        assert da.abs().max() > 0 and db.abs().max() > 0
        assert not res["dA"][slot, rank:].any(), f"slot {slot}: A gradient beyond rank {rank}"
        assert not res["dB"][slot, :, rank:].any(), f"slot {slot}: B gradient beyond rank {rank}"
    assert not res["dA"][3].any() and not res["dB"][3].any(), "the idle slot got a gradient"


@pytest.mark.parametrize("key", LAYERS)
def test_one_token_samples_match_reference(world, key):
    """Samples of one token each: token-major that is [n, 1, d], the samples along dimension 0 (it was read as
    megatron's [s=n, b=1] layout, one sample of n tokens)."""
    res, (ref_y, ref_dx, ref_grads) = world["one_token"][key], world["one_token_ref"][key]
    assert _rel(res["y"], ref_y) <= TOL and _rel(res["dx"], ref_dx) <= TOL
    for slot, (_name, rank, _alpha, _rs) in enumerate(TENANTS):
        da, db = ref_grads[slot]
        assert _rel(res["dA"][slot, :rank], da) <= TOL and _rel(res["dB"][slot, :, :rank], db) <= TOL, slot


@pytest.mark.parametrize("key", LAYERS)
def test_frozen_base_gets_no_gradient(world, key):
    assert world["multi"][key]["weight_grad_none"]
    assert world["small"][key]["weight_grad_none"]


@pytest.mark.parametrize("key", LAYERS)
def test_rank4_tenant_in_max16_pool_equals_max4_pool(world, key):
    # Deterministic initialisation does not depend on the pool's max rank.
    big_a, small_a = world["big_init_a"][key], world["small_init_a"][key]
    assert small_a.shape[0] == 4 and big_a.shape[0] == MAX_RANK
    assert torch.equal(big_a[:4], small_a) and not big_a[4:].any()
    assert small_a.abs().max() > 0

    big, small, idx = world["multi"][key], world["small"][key], world["small_idx"]
    assert _rel(small["y"], big["y"][:, idx]) <= TOL
    assert _rel(small["dx"], big["dx"][:, idx]) <= TOL
    assert _rel(small["dA"][0], big["dA"][0, :4]) <= TOL
    assert _rel(small["dB"][0], big["dB"][0, :, :4]) <= TOL


@pytest.mark.parametrize("key", LAYERS)
def test_dropout_changes_only_its_own_tenant(world, key):
    d = world["drop"][key]
    mine = [n for n, s in enumerate(DROP_SLOTS) if s == 3]
    others = [n for n, s in enumerate(DROP_SLOTS) if s != 3]
    assert torch.equal(d["train"][:, others], d["eval"][:, others]), "dropout leaked into other samples"
    assert not torch.equal(d["train"][:, mine], d["eval"][:, mine]), "dropout had no effect in training"
    assert _rel(d["eval"], d["ref_eval"]) <= TOL, "eval mode must not apply dropout"
    # With B = 0 the delta vanishes: the base path never sees the tenant's dropout.
    assert torch.equal(d["train_b0"], d["eval_b0"])


def _table():
    table = SlotTable(MAX_SLOTS, MAX_RANK)
    for name, rank, alpha, rslora in TENANTS:
        table.acquire(name, LoRASpec(rank=rank, alpha=alpha, rslora=rslora))
    return table


def test_routing_segments_follow_the_table():
    table = _table()
    segs = AdapterRouting(SLOTS, table).segments("linear_qkv")
    assert [(s.slot, s.start, s.end, s.rank) for s in segs] == [(1, 0, 2, 8), (0, 2, 4, 4), (2, 5, 8, 16)]
    assert segs[0].scale == pytest.approx(4.0 / 8**0.5) and segs[1].scale == pytest.approx(2.0)


def test_routing_rejects_non_contiguous_slots():
    with pytest.raises(ValueError, match="slot 0 are not contiguous"):
        AdapterRouting([0, 0, 1, 0], _table())
    with pytest.raises(ValueError, match="not contiguous"):
        AdapterRouting([0, -1, 1, 2, 1], _table())


def test_routing_allows_split_base_only_samples():
    segs = AdapterRouting([-1, 0, -1, 1, -1], _table()).segments("linear_proj")
    assert [(s.slot, s.start, s.end) for s in segs] == [(0, 1, 2), (1, 3, 4)]


def test_routing_follows_the_activation_layout():
    """[s, b, h] activations take segments along the samples; token-major [b * s, 1, h] ones (model.token_major)
    along the tokens, and the MoE dispatcher's flattened token order follows the layout."""
    routing = AdapterRouting(SLOTS, _table())
    n = len(SLOTS)
    assert routing.tokens_per_sample((3, n, 64)) == 1
    assert routing.tokens_per_sample((3 * n, 1, 64)) == 3
    samples = [(s.slot, s.start, s.end) for s in routing.segments("linear_qkv")]
    tokens = [(s.slot, s.start, s.end, s.rank, s.scale) for s in routing.segments("linear_qkv", 3)]
    assert tokens == [(slot, 3 * a, 3 * b, s.rank, s.scale)
                      for (slot, a, b), s in zip(samples, routing.segments("linear_qkv"))]
    slots = torch.tensor(SLOTS)
    assert torch.equal(routing.token_slots((3, n, 64)), slots.repeat(3))  # sequence-major: s0 of every sample...
    assert torch.equal(routing.token_slots((3 * n, 1, 64)), slots.repeat_interleave(3))  # sample after sample
    for shape in ((3, n + 1, 64), (3 * n + 1, 1, 64), (3, 2, 64)):
        with pytest.raises(ValueError, match=f"neither .* for this micro-batch of {n} samples"):
            routing.tokens_per_sample(shape)
    # one token per sample, token-major [n, 1, h]: the samples along dimension 0 (not [s=n, b=1])
    assert routing.token_major((n, 1, 64)) and routing.tokens_per_sample((n, 1, 64)) == 1
    assert torch.equal(routing.token_slots((n, 1, 64)), slots)
    assert not routing.token_major((3, n, 64)) and routing.token_major((3 * n, 1, 64))

    def adapter_blocks(flat):  # is every adapter slot's run of tokens one block? (base-only ones may be split)
        return all(bool(((flat == s).nonzero().flatten().diff() == 1).all()) for s in set(flat.tolist()) - {-1})

    # each adapter slot's tokens are one block of the flattened order (as the MoE dispatcher's own permutation
    # needs) exactly when the samples are not interleaved position by position
    split = AdapterRouting([-1, 0, -1, 1, 1], _table())
    for r, shapes in ((routing, ((3, n, 64), (3 * n, 1, 64), (1, n, 64), (n, 1, 64))),
                      (split, ((2, 5, 64), (10, 1, 64), (5, 1, 64)))):
        for shape in shapes:
            assert r.tokens_grouped_by_slot(shape) == adapter_blocks(r.token_slots(shape)), shape
    assert not routing.tokens_grouped_by_slot((3, n, 64)) and routing.tokens_grouped_by_slot((3 * n, 1, 64))
    assert split.tokens_grouped_by_slot((10, 1, 64)) and not split.tokens_grouped_by_slot((2, 5, 64))
    assert AdapterRouting([1], _table()).tokens_grouped_by_slot((5, 1, 64))


@pytest.mark.parametrize("slot", [3, 4, 99, -2, -5])
def test_routing_rejects_a_slot_no_tenant_holds(slot):
    # 3 is an idle slot; 4 and 99 are past the table; -2 / -5 must not wrap around to slots 2 / 3.
    with pytest.raises(ValueError, match=f"slot {slot}, which no tenant holds"):
        AdapterRouting([0, slot, slot], _table())


# ---- batched runs of segments (ops level, in process) ----------------------------------------------------------
# (L, N, in, out, segments as (slot, start, end, rank, scale), expected segments per run). 8 slots of max rank 8;
# slots 5 and 7 are idle in every case.
RUN_CASES = {
    # a run of 3 (evenly spaced slots) copied to [G, L * n, in]; a base-only row; a run of 2 whose slots are not
    # evenly spaced (gathered weights, index_add_ gradients); a longer segment; base-only rows at the end
    "sequence": (3, 16, 12, 10, [(0, 0, 2, 4, 2.0), (1, 2, 4, 4, 2.0), (2, 4, 6, 4, 2.0),
                                 (6, 7, 9, 8, 0.5), (3, 9, 11, 8, 0.5), (4, 11, 14, 8, 0.5)], [3, 2, 1]),
    # one-token sequences (L == 1): runs are views of x; unequal sizes and a scale change split runs
    "tokens": (1, 23, 12, 10, [(1, 0, 3, 8, 1.0), (2, 3, 6, 8, 1.0), (3, 6, 9, 8, 1.0), (0, 9, 13, 2, 3.0),
                               (4, 13, 17, 2, 3.0), (6, 17, 21, 2, 0.25)], [3, 2, 1]),
    # one sample per segment, mixed ranks (one run per rank)
    "samples": (4, 7, 12, 10, [(0, 0, 1, 8, 1.5), (2, 1, 2, 8, 1.5), (4, 2, 3, 8, 1.5), (1, 3, 4, 4, 1.5),
                               (3, 4, 5, 4, 1.5)], [3, 2]),
    # one tenant spanning the micro-batch
    "spanning": (5, 6, 12, 10, [(3, 0, 6, 8, 2.0)], [1]),
}


def _ops_reference(x, segments, a_w, b_w, gy):
    """Plain PyTorch, segment by segment on fresh leaves: delta, dx, dA, dB and h packed per segment."""
    x = x.detach().clone().requires_grad_(True)
    a_w = a_w.detach().clone().requires_grad_(True)
    b_w = b_w.detach().clone().requires_grad_(True)
    delta = torch.zeros(*x.shape[:2], b_w.shape[1])
    blocks = []
    for slot, start, end, rank, scale in segments:
        h = x[:, start:end] @ a_w[slot, :rank].t()
        blocks.append(h.detach().reshape(x.shape[0], -1))
        delta[:, start:end] = scale * (h @ b_w[slot, :, :rank].t())
    (delta * gy).sum().backward()
    return delta.detach(), x.grad, a_w.grad, b_w.grad, torch.cat(blocks, dim=1)


@pytest.mark.parametrize("case", RUN_CASES)
def test_batched_runs_match_per_tenant_reference(case):
    from megatron_multilora.lora import ops

    seq, n, d_in, d_out, segs, counts = RUN_CASES[case]
    gen = torch.Generator().manual_seed(5)
    a_w = torch.nn.Parameter(torch.randn(8, 8, d_in, generator=gen))
    b_w = torch.nn.Parameter(torch.randn(8, d_out, 8, generator=gen))
    x, gy = torch.randn(seq, n, d_in, generator=gen), torch.randn(seq, n, d_out, generator=gen)
    segments = [ops.Segment(*s) for s in segs]
    assert [r.count for r in ops._runs(segments)] == counts  # the batched paths are the ones exercised

    sentinel = 7.0  # gradients accumulate: a row nobody writes keeps it exactly
    a_w.grad, b_w.grad = torch.full_like(a_w, sentinel), torch.full_like(b_w, sentinel)
    seen = []
    xi = x.clone().requires_grad_(True)
    base = torch.randn(seq, n, d_out, generator=gen, requires_grad=True)  # the base linear's output
    y = ops.lora_add(base * 1.0, xi, a_w, b_w, segments, middle=lambda h: seen.append(h.detach().clone()) or h)
    (y * gy).sum().backward()
    delta = (y - base).detach()
    assert torch.equal(base.grad, gy), "the base output's gradient must pass through untouched"

    ref_delta, ref_dx, ref_da, ref_db, ref_h = _ops_reference(x, segs, a_w, b_w, gy)
    assert _rel(seen[0], ref_h) <= TOL, "the packed h layout (what tensor parallelism communicates) changed"
    assert _rel(delta, ref_delta) <= TOL and delta.is_contiguous()
    assert _rel(xi.grad, ref_dx) <= TOL and xi.grad.is_contiguous()
    covered = torch.zeros(n, dtype=torch.bool)
    for _slot, start, end, _rank, _scale in segs:
        covered[start:end] = True
    assert not delta[:, ~covered].any() and not xi.grad[:, ~covered].any(), "base-only rows got a LoRA term"
    touched = {slot: rank for slot, _s, _e, rank, _sc in segs}
    for slot in range(8):
        rank = touched.get(slot, 0)  # 0: an idle slot, never written
        if rank:
            assert _rel(a_w.grad[slot, :rank] - sentinel, ref_da[slot, :rank]) <= TOL, (slot, "A")
            assert _rel(b_w.grad[slot, :, :rank] - sentinel, ref_db[slot, :, :rank]) <= TOL, (slot, "B")
        assert (a_w.grad[slot, rank:] == sentinel).all(), f"slot {slot}: A rows beyond rank {rank} written"
        assert (b_w.grad[slot, :, rank:] == sentinel).all(), f"slot {slot}: B columns beyond rank {rank} written"


def test_permute_rows_gathers_both_ways():
    from megatron_multilora.lora import ops

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 4, generator=gen, requires_grad=True)
    g = torch.randn(9, 4, generator=gen)
    order = torch.randperm(9, generator=gen)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(9)
    y = ops.permute_rows(x, order, inverse)
    y.backward(g)
    assert torch.equal(y, x[order])
    assert torch.equal(x.grad, torch.zeros_like(g).index_put_((order,), g))


# One linear of several local experts in one call (ops.expert_linear): (segments as (expert, slot, start, end, rank,
# scale), rows per expert, in, out). 3 experts x 6 slots of max rank 8; runs break at uncovered rows and rank
# changes. Rank 2 (8-byte rows) takes the padded bmm even in grouped-mm mode: grouped_mm wants row strides of
# 16-byte multiples.
EXPERT_CASES = {
    # every expert's slots evenly spaced (weight views), uniform rank and scale, base-only tokens between runs
    "uniform": ([(0, 0, 0, 3, 8, 2.0), (0, 1, 3, 7, 8, 2.0), (1, 0, 7, 8, 8, 2.0), (1, 2, 10, 15, 8, 2.0),
                 (1, 4, 15, 17, 8, 2.0), (2, 1, 17, 20, 8, 2.0)], [7, 10, 5], 12, 20),
    # mixed ranks (a run per rank), per-segment scales, slots not evenly spaced (gathered, index_add_)
    "mixed": ([(0, 3, 0, 2, 4, 0.5), (0, 0, 2, 6, 4, 2.0), (0, 1, 6, 7, 4, 1.0), (1, 5, 7, 11, 8, 3.0),
               (2, 0, 11, 12, 8, 0.25), (2, 2, 12, 15, 2, 1.0), (2, 3, 15, 19, 2, 1.0)], [7, 4, 8], 12, 20),
    # one run over every token; an expert without tokens
    "spanning": ([(0, 2, 0, 5, 8, 2.0), (2, 2, 5, 6, 8, 2.0), (3, 5, 6, 11, 8, 2.0)], [5, 0, 1, 5], 12, 20),
}


@pytest.mark.parametrize("padded", [True, False], ids=["padded-bmm", "grouped-mm"])
@pytest.mark.parametrize("case", EXPERT_CASES)
def test_expert_linear_matches_per_expert_reference(monkeypatch, case, padded):
    """Every local expert's frozen linear plus all their LoRA in one function (one grouped / padded GEMM per
    product) equals a plain per-expert, per-segment computation: the output, the input gradient, and each
    expert's per-slot A / B gradients (written only up to the slot's rank, idle slots and other experts' rows
    untouched); with a tenant's own LoRA input (dropout) the LoRA sees it and the base does not."""
    from megatron_multilora.lora import ops

    monkeypatch.setattr(ops, "_CPU_PADDED_GROUP", 10**9 if padded else 0)
    grouped_calls = []
    real_grouped_mm = torch.nn.functional.grouped_mm
    monkeypatch.setattr(torch.nn.functional, "grouped_mm",
                        lambda *a, **k: grouped_calls.append(1) or real_grouped_mm(*a, **k))
    segs, counts, d_in, d_out = EXPERT_CASES[case]
    n, experts = sum(counts), len(counts)
    gen = torch.Generator().manual_seed(9)
    weights = [torch.randn(d_out, d_in, generator=gen) for _ in range(experts)]
    a_ws = [torch.nn.Parameter(torch.randn(6, 8, d_in, generator=gen)) for _ in range(experts)]
    b_ws = [torch.nn.Parameter(torch.randn(6, d_out, 8, generator=gen)) for _ in range(experts)]
    x, gy = torch.randn(n, d_in, generator=gen), torch.randn(n, d_out, generator=gen)
    segments = [ops.Segment(slot, start, end, rank, scale, 0.5, e) for e, slot, start, end, rank, scale in segs]
    # a deterministic stand-in for dropout's mask (x * keep / (1 - p) = x * (1 - p)), so the LoRA's own input is
    # checked exactly
    monkeypatch.setattr(ops, "_keep_mask", lambda shape, p, like: torch.full(shape, (1 - p) ** 2))

    sentinel = 7.0
    for training in (False, True):
        lora_scale = 0.5 if training else 1.0
        # reference: expert by expert and segment by segment on fresh leaves
        xr = x.clone().requires_grad_(True)
        ar = [a.detach().clone().requires_grad_(True) for a in a_ws]
        br = [b.detach().clone().requires_grad_(True) for b in b_ws]
        ref = torch.cat([rows @ w.t() for rows, w in zip(xr.split(counts), weights)])
        for e, slot, start, end, rank, scale in segs:
            lora_x = xr[start:end] * lora_scale
            ref[start:end] += scale * (lora_x @ ar[e][slot, :rank].t()) @ br[e][slot, :, :rank].t()
        (ref * gy).sum().backward()

        for p in a_ws + b_ws:
            p.grad = torch.full_like(p, sentinel)
        xi = x.clone().requires_grad_(True)
        y = ops.expert_linear(xi, weights, counts, a_ws, b_ws, segments, training=training)
        (y * gy).sum().backward()
        assert _rel(y.detach(), ref.detach()) <= TOL, training
        assert _rel(xi.grad, xr.grad) <= TOL, training
        for e in range(experts):
            touched = {slot: rank for ee, slot, _s, _e, rank, _sc in segs if ee == e}
            for slot in range(6):
                rank = touched.get(slot, 0)
                a_g, b_g = a_ws[e].grad[slot], b_ws[e].grad[slot]
                if rank:
                    assert _rel(a_g[:rank] - sentinel, ar[e].grad[slot, :rank]) <= TOL, (e, slot, "A")
                    assert _rel(b_g[:, :rank] - sentinel, br[e].grad[slot, :, :rank]) <= TOL, (e, slot, "B")
                assert (a_g[rank:] == sentinel).all() and (b_g[:, rank:] == sentinel).all(), (e, slot, rank)
    # without segments: the experts' frozen linears alone (the LoRA lists given or not), backward included
    for lora in ((), (a_ws, b_ws)):
        xi = x.clone().requires_grad_(True)
        y = ops.expert_linear(xi, weights, counts, *lora)
        assert torch.equal(y, torch.cat([rows @ w.t() for rows, w in zip(x.split(counts), weights)]))
        (y * gy).sum().backward()
        assert torch.allclose(xi.grad, torch.cat([g @ w for g, w in zip(gy.split(counts), weights)]))
    assert bool(grouped_calls) != padded, "the GEMM path under test was not the one taken"


@pytest.mark.parametrize("poison", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("padded", [True, False], ids=["padded-bmm", "grouped-mm"])
def test_expert_linear_keeps_a_non_finite_gradient_to_its_own_segment(monkeypatch, padded, poison):
    """Segments of one rank share a GEMM (padded to the longest on CPU): a non-finite output gradient in one
    tenant's rows (the first row of the run, which padding gathers from) must leave every other segment's weight
    gradients finite and exactly as without it -- the optimizer skips only the tenant whose gradient is not finite."""
    from megatron_multilora.lora import ops

    monkeypatch.setattr(ops, "_CPU_PADDED_GROUP", 10**9 if padded else 0)
    segs, counts, d_in, d_out = EXPERT_CASES["uniform"]  # one rank: one run, segments of unequal length
    gen = torch.Generator().manual_seed(4)
    weights = [torch.randn(d_out, d_in, generator=gen) for _ in counts]
    a_ws = [torch.nn.Parameter(torch.randn(6, 8, d_in, generator=gen)) for _ in counts]
    b_ws = [torch.nn.Parameter(torch.randn(6, d_out, 8, generator=gen)) for _ in counts]
    segments = [ops.Segment(slot, start, end, rank, scale, 0.0, e) for e, slot, start, end, rank, scale in segs]
    x, gy = torch.randn(sum(counts), d_in, generator=gen), torch.randn(sum(counts), d_out, generator=gen)
    grads = []
    for g in (gy, gy.clone().index_fill_(0, torch.tensor([0]), poison)):
        for p in a_ws + b_ws:
            p.grad = None
        (ops.expert_linear(x, weights, counts, a_ws, b_ws, segments) * g).sum().backward()
        grads.append([(a_ws[e].grad[slot].clone(), b_ws[e].grad[slot].clone()) for e, slot, *_ in segs])
    (first_a, first_b), *others = grads[1]
    assert not torch.isfinite(first_a).all() and not torch.isfinite(first_b).all()  # the poisoned tenant's own
    for (a, b), (clean_a, clean_b) in zip(others, grads[0][1:]):
        assert torch.equal(a, clean_a) and torch.equal(b, clean_b)


def test_expert_linear_trains_the_lora_of_an_input_without_gradient():
    """The LoRA parameters are not inputs of the grouped experts' autograd node (one anchor is): its backward must
    still run, and fill every expert's gradient, when the experts' input needs no gradient (a frozen first layer)."""
    from megatron_multilora.lora import ops

    segs, counts, d_in, d_out = EXPERT_CASES["uniform"]
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randn(d_out, d_in, generator=gen) for _ in counts]
    a_ws = [torch.nn.Parameter(torch.randn(6, 8, d_in, generator=gen)) for _ in counts]
    b_ws = [torch.nn.Parameter(torch.randn(6, d_out, 8, generator=gen)) for _ in counts]
    segments = [ops.Segment(slot, start, end, rank, scale, 0.0, e) for e, slot, start, end, rank, scale in segs]
    x = torch.randn(sum(counts), d_in, generator=gen)
    ops.expert_linear(x, weights, counts, a_ws, b_ws, segments).sum().backward()
    for e, slot, start, end, rank, scale in segs:
        assert a_ws[e].grad[slot, :rank].abs().sum() > 0 and b_ws[e].grad[slot, :, :rank].abs().sum() > 0
    # the anchor is one that trains: with expert 0's A frozen, the others still learn
    a_ws[0].requires_grad_(False)
    for p in a_ws + b_ws:
        p.grad = None
    ops.expert_linear(x, weights, counts, a_ws, b_ws, segments).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in a_ws[1:] + b_ws)


def test_expert_linear_refuses_a_trainable_base():
    """The grouped experts compute no base weight gradient, so a base weight that requires one is refused by name
    rather than silently left without it."""
    from megatron_multilora.lora import ops

    weights = [torch.nn.Parameter(torch.randn(4, 3)), torch.randn(4, 3)]
    with pytest.raises(RuntimeError, match="frozen"):
        ops.expert_linear(torch.randn(5, 3), weights, [2, 3])
