"""GradBuffer: flat per-slot gradient rows (views, zeroing, per-slot norms, all-reduce of the step's rows only)."""

import pytest
import torch

from megatron_multilora.lora.grads import GradBuffer
from megatron_multilora.optim import LRSchedule, SlotHyperParams, SlotOptimizer

from .distributed import run_world

torch.set_num_threads(1)

S = 5
SHAPES = {"qkv.lora_A": (4, 6), "qkv.lora_B": (9, 4), "fc1.lora_A": (4, 6), "expert.lora_A": (4, 6),
          "expert.lora_B": (3, 4)}


def make_params(dtype=torch.float32, duplicate=("qkv.lora_B",)):
    g = torch.Generator().manual_seed(0)
    params = {}
    for name, shape in SHAPES.items():
        p = torch.nn.Parameter(torch.randn((S,) + shape, generator=g).to(dtype))
        p.norm_group = "expert" if name.startswith("expert") else "dense"
        p.norm_duplicate = name in duplicate
        params[name] = p
    return params


def fill(params, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.values():
            p.grad.copy_(torch.randn(p.shape, generator=g))


def test_every_grad_is_a_view_of_one_row_per_slot():
    params = make_params()
    buffer = GradBuffer(params.values())
    dense = next(f for f in buffer.flats if f.norm_group == "dense")
    for name, p in params.items():
        assert p.grad._base is not None, name
        flat = next(f for f in buffer.flats if any(p is q for q in f.params))
        assert p.grad.untyped_storage().data_ptr() == flat.buffer.untyped_storage().data_ptr()
    # slot k of every dense parameter lives in row k of one buffer
    with torch.no_grad():
        for p in dense.params:
            p.grad[2].fill_(1.0)
    assert (dense.buffer[2] == 1).all() and not dense.buffer[[0, 1, 3, 4]].any()


def test_zero_touches_only_the_given_rows():
    params = make_params()
    buffer = GradBuffer(params.values())
    fill(params, 1)
    before = {n: p.grad.clone() for n, p in params.items()}
    buffer.zero([3, 0, 1])
    for n, p in params.items():
        assert not p.grad[[0, 1, 3]].any(), n
        assert torch.equal(p.grad[[2, 4]], before[n][[2, 4]]), n
    buffer.zero()
    assert all(not p.grad.any() for p in params.values())


def test_sq_norms_are_per_slot_per_group_and_skip_duplicates():
    params = make_params()
    buffer = GradBuffer(params.values())
    fill(params, 2)
    slots = [0, 2, 3]
    got = buffer.sq_norms(slots)
    for group in ("dense", "expert"):
        want = sum(p.grad[slots].double().flatten(1).square().sum(1) for p in params.values()
                   if p.norm_group == group and not p.norm_duplicate)
        torch.testing.assert_close(got[group].double(), want, rtol=1e-6, atol=0)
    # a slot's norm does not depend on which other slots are asked for (bitwise)
    for i, k in enumerate(slots):
        for group in ("dense", "expert"):
            assert torch.equal(buffer.sq_norms([k])[group], got[group][i:i + 1])


def test_dtypes_get_their_own_buffers():
    params = make_params()
    params["qkv.lora_A"].data = params["qkv.lora_A"].data.to(torch.bfloat16)
    buffer = GradBuffer(params.values())
    assert params["qkv.lora_A"].grad.dtype == torch.bfloat16
    assert len(buffer.flats) == 3
    fill(params, 3)
    want = sum(params[n].grad[[1]].float().square().sum() for n in ("qkv.lora_A", "fc1.lora_A"))
    torch.testing.assert_close(buffer.sq_norms([1])["dense"], want.reshape(1), rtol=1e-5, atol=0)


def test_a_replaced_grad_is_refused():
    params = make_params()
    buffer = GradBuffer(params.values())
    params["fc1.lora_A"].grad = torch.zeros_like(params["fc1.lora_A"])
    with pytest.raises(RuntimeError, match="replaced"):
        buffer.sq_norms([0])
    with pytest.raises(RuntimeError, match="replaced"):
        buffer.zero([0])


def test_optimizer_with_buffer_norms_steps_like_without():
    """SlotOptimizer reading the norms from the buffer takes the same step as computing them per parameter."""
    results = []
    for use_buffer in (False, True):
        params = make_params(duplicate=())
        buffer = GradBuffer(params.values())
        fill(params, 4)
        opt = SlotOptimizer(params, S, grad_sq_norms=buffer.sq_norms if use_buffer else None)
        for k in range(S):
            opt.configure_slot(k, SlotHyperParams(LRSchedule(lr=1e-2 * (k + 1)), clip_grad=0.5 + k))
        active = torch.tensor([True, False, True, True, False])
        report = opt.step(torch.full((S,), 0.3), active)
        results.append((report.grad_norm, {n: p.detach().clone() for n, p in params.items()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=0)
    for n in params:
        torch.testing.assert_close(results[0][1][n], results[1][1][n], rtol=1e-6, atol=1e-7)


def _sync_world(layout_kwargs, slots):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_multilora import platform

    platform.initialize_model_parallel(platform.ParallelLayout(**layout_kwargs))
    params = make_params(duplicate=())
    params["qkv.lora_A"].partial_grad_group = ps.get_tensor_model_parallel_group()
    buffer = GradBuffer(params.values())
    rank = dist.get_rank()
    with torch.no_grad():
        for i, p in enumerate(params.values()):
            p.grad.copy_(torch.arange(p.numel(), dtype=torch.float32).view(p.shape) * (rank + 1) + i)
    buffer.sync(slots)
    return {n: p.grad.clone() for n, p in params.items()}


@pytest.mark.parametrize("slots", [[0, 2, 3], [1, 2]], ids=["scattered-rows", "one-run"])
def test_data_parallel_sync_sums_only_the_steps_rows(slots):
    outs = run_world(_sync_world, 2, {}, slots)
    idle = [k for k in range(S) if k not in slots]
    for i, name in enumerate(SHAPES):
        base = torch.arange(torch.Size((S,) + SHAPES[name]).numel(), dtype=torch.float32).view((S,) + SHAPES[name])
        local = [base * (r + 1) + i for r in range(2)]
        for r in range(2):
            assert torch.equal(outs[r][name][slots], (local[0] + local[1])[slots]), (name, r)
            assert torch.equal(outs[r][name][idle], local[r][idle]), (name, r, "idle rows were communicated")


def test_tensor_parallel_partial_grads_are_summed_in_their_columns_only():
    """A replicated factor whose gradient is a partial sum over TP is all-reduced there; nothing else is (DP=1)."""
    slots = [0, 3]
    outs = run_world(_sync_world, 2, dict(tensor_model_parallel_size=2), slots)
    for i, name in enumerate(SHAPES):
        base = torch.arange(torch.Size((S,) + SHAPES[name]).numel(), dtype=torch.float32).view((S,) + SHAPES[name])
        local = [base * (r + 1) + i for r in range(2)]
        for r in range(2):
            if name == "qkv.lora_A":
                assert torch.equal(outs[r][name][slots], (local[0] + local[1])[slots])
                assert torch.equal(outs[r][name][[1, 2, 4]], local[r][[1, 2, 4]])
            else:
                assert torch.equal(outs[r][name], local[r]), name


@pytest.mark.parametrize("max_runs,block_numel", [(None, None), (None, 37), (0, None)],
                         ids=["views", "row-groups", "gather"])
def test_optimizer_reads_side_by_side_grads_in_one_op_with_bitwise_equal_results(monkeypatch, max_runs, block_numel):
    """Grads in a GradBuffer laid out in the optimizer's column order are read as whole [rows, columns] segments
    (one multiply each, no per-parameter copy); separate grads, or a buffer in another column order, take the
    per-parameter copy. Every way gives bitwise the same weights and optimizer state."""
    from megatron_multilora import optim

    fused = []
    real = optim._pieces
    def spy(*args):
        pieces = real(*args)
        fused.extend(pieces)
        return pieces

    monkeypatch.setattr(optim, "_pieces", spy)
    results = {}
    for layout in ("separate", "buffer", "buffer-reversed"):
        params = make_params(duplicate=())
        if layout != "separate":
            GradBuffer(list(params.values())[::-1] if layout == "buffer-reversed" else params.values())
        opt = SlotOptimizer(params, S)
        opt.max_view_runs, opt.block_numel = max_runs, block_numel
        for k in range(S):
            opt.configure_slot(k, SlotHyperParams(LRSchedule(lr=1e-2 * (k + 1)), clip_grad=0.5 + k, weight_decay=0.1))
        fused.clear()
        for it, pattern in enumerate([[1, 0, 1, 1, 0], [1, 1, 1, 1, 1], [0, 1, 0, 0, 1]]):
            with torch.no_grad():
                for i, p in enumerate(params.values()):
                    g = torch.Generator().manual_seed(10 * it + i)
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad.copy_(torch.randn(p.shape, generator=g))
            opt.step(torch.full((S,), 0.3), torch.tensor(pattern, dtype=torch.bool))
        # segments of several parameters read in one op: only from the buffer in the optimizer's order
        several = sum(b1 - b0 > 1 and src is not None for b0, b1, src in fused)
        if layout == "buffer" and max_runs is None:  # (gathered grads are copies: read per parameter)
            assert several > 0, "side-by-side grads were still copied per parameter"
        else:
            assert several == 0, layout
        results[layout] = [{**{n: p.detach()[k].clone() for n, p in params.items()}, **opt.slot_state(k)}
                           for k in range(S)]
    for layout in ("buffer", "buffer-reversed"):
        for a, b in zip(results["separate"], results[layout]):
            for key in a:
                assert torch.equal(a[key], b[key]), (layout, key)
