"""Every megatron-core CPU workaround in megatron_multilora/platform.py is needed, and works.

For each entry of CPU_PATCHES a probe runs the upstream code it answers for: with the patch removed the probe
must fail because of CUDA (or, for te_general_gemm, because the symbol is missing), and with the patch applied
the same probe must pass and compute the right thing. All probes run in one 2-process gloo world (some paths
short-circuit at world size 1): TP=2 for most, PP=2 for the p2p probe. A patch added to CPU_PATCHES without
a probe here fails test_every_patch_has_a_probe.
"""

import os

import pytest
import torch

from megatron_multilora import platform
from tests.distributed import run_world

SEED = 1234


def _tp2():
    return platform.ParallelLayout(tensor_model_parallel_size=2)


def _pp2():
    return platform.ParallelLayout(pipeline_model_parallel_size=2)


def _ep2():
    return platform.ParallelLayout(expert_model_parallel_size=2)


def _config(preset="tiny-dense", **layout):
    from megatron_multilora.config import model_config_from
    from megatron_multilora.model import transformer_config

    return transformer_config(model_config_from(preset), **layout)


# ---- probes: each returns True when the upstream code computed the right thing --------------------------


def probe_rng(_ctx):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(77, force_reset_rng=True)
    outer = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        first = torch.rand(4)
    untouched = torch.equal(torch.get_rng_state(), outer)
    with get_cuda_rng_tracker().fork():
        second = torch.rand(4)  # the tracked stream advanced
    return untouched and not torch.equal(first, second) and not torch.equal(first, torch.rand(4))


def probe_mappings(_ctx):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    from megatron.core.tensor_parallel import reduce_scatter_to_sequence_parallel_region

    rank, group = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_group()
    y = gather_from_sequence_parallel_region(torch.full((2, 3), float(rank)), group=group)
    # variable sizes (the alltoall dispatcher at TP > 1): rank 0 holds 2 rows, rank 1 holds 1
    sizes = [2, 1]
    uneven = gather_from_sequence_parallel_region(torch.full((sizes[rank], 3), float(rank)), group=group,
                                                  output_split_sizes=sizes)
    full = torch.arange(9.0).reshape(3, 3) * (rank + 1)
    scattered = reduce_scatter_to_sequence_parallel_region(full, group=group, input_split_sizes=sizes)
    return (torch.equal(y, torch.cat([torch.zeros(2, 3), torch.ones(2, 3)]))
            and torch.equal(uneven, torch.cat([torch.zeros(2, 3), torch.ones(1, 3)]))
            and torch.equal(scattered, (torch.arange(9.0).reshape(3, 3) * 3)[[0, 1] if rank == 0 else [2]]))


def probe_token_dispatcher(_ctx):
    """megatron's alltoall dispatcher round trip at EP=2 with identity experts: every token comes back
    scaled by the sum of its routing probabilities."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    cfg = _config("tiny-moe", expert_model_parallel_size=2, moe_token_dispatcher_type="alltoall")
    rank = torch.distributed.get_rank()
    local = cfg.num_moe_experts // 2
    dispatcher = MoEAlltoAllTokenDispatcher(local, list(range(rank * local, (rank + 1) * local)), cfg,
                                            pg_collection=get_default_pg_collection())
    g = torch.Generator().manual_seed(rank)
    hidden = torch.randn(3, 2, cfg.hidden_size, generator=g)
    top = torch.rand(6, cfg.num_moe_experts, generator=g).topk(cfg.moe_router_topk, dim=-1).indices
    routing_map = torch.zeros(6, cfg.num_moe_experts, dtype=torch.bool).scatter_(1, top, True)
    probs = torch.rand(6, cfg.num_moe_experts, generator=g) * routing_map
    tokens, p = dispatcher.dispatch_preprocess(hidden, routing_map, probs)
    tokens, p = dispatcher.token_dispatch(tokens, p)
    tokens, tokens_per_expert, p = dispatcher.dispatch_postprocess(tokens, p)
    out = dispatcher.combine_postprocess(dispatcher.token_combine(dispatcher.combine_preprocess(tokens * p[:, None])))
    expected = hidden * probs.sum(-1).reshape(3, 2, 1)
    return int(tokens_per_expert.sum()) == tokens.shape[0] and torch.allclose(out, expected, atol=1e-6)


def probe_layers(_ctx):
    """The sequence-parallel weight-gradient path of a ColumnParallelLinear with a trainable weight."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import ColumnParallelLinear

    cfg = _config(tensor_model_parallel_size=2, sequence_parallel=True)
    lin = ColumnParallelLinear(8, 6, config=cfg, init_method=torch.nn.init.normal_, bias=False)
    rank, group = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_group()
    shards = [torch.randn(3, 2, 8, generator=torch.Generator().manual_seed(r)) for r in range(2)]
    x = shards[rank].clone().requires_grad_(True)
    y, _ = lin(x)
    y.sum().backward()
    # dW = sum over every token of the full (gathered) sequence; dx = this shard of sum_o W_full[o].
    expected_dw = torch.cat(shards).sum((0, 1)).expand(3, 8)
    pieces = [torch.empty_like(lin.weight) for _ in range(2)]
    dist.all_gather(pieces, lin.weight.detach(), group=group)
    expected_dx = torch.cat(pieces).sum(0).expand(3, 2, 8)
    return (y.shape == (6, 2, 3) and torch.allclose(lin.weight.grad, expected_dw, rtol=1e-5, atol=1e-5)
            and torch.allclose(x.grad, expected_dx, rtol=1e-5, atol=1e-5))


def probe_utils(ctx):
    from megatron.core import parallel_state as ps

    ctx["buffers"] = ctx.get("buffers", 0) + 1  # a fresh name: a cached buffer would skip the allocation
    t = ps.get_global_memory_buffer().get_tensor((3, 5), torch.float32, f"probe{ctx['buffers']}")
    return t.shape == (3, 5) and t.device.type == "cpu"


def probe_router(_ctx):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter

    cfg = _config("tiny-moe", tensor_model_parallel_size=2, sequence_parallel=True)
    router = TopKRouter(config=cfg, pg_collection=get_default_pg_collection())
    x = torch.randn(5, 2, cfg.hidden_size)
    probs, routing_map = router(x)
    logits = x.reshape(10, -1) @ router.weight.detach().t()
    top = logits.topk(cfg.moe_router_topk, dim=-1).indices
    expected = torch.zeros(10, cfg.num_moe_experts, dtype=torch.bool).scatter_(1, top, True)
    return torch.equal(routing_map, expected) and probs.shape == (10, cfg.num_moe_experts)


def probe_schedules(_ctx):
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config, self.model_type = _config(), ModelType.encoder_or_decoder
            self.lin = torch.nn.Linear(4, 1, bias=False)

        def set_input_tensor(self, _t):
            pass

        def forward(self, x):
            return self.lin(x)

    model = Tiny()
    data = [torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(2)]

    def step(it, m):
        x = next(it)
        out = m(x)

        def loss(o):
            s = o.sum()
            return s, torch.tensor(x.shape[0], dtype=torch.int), {"loss": s.detach()}

        return out, loss

    forward_backward_no_pipelining(forward_step_func=step, data_iterator=iter(data), model=[model],
                                   num_microbatches=2, seq_length=3, micro_batch_size=1)
    return torch.allclose(model.lin.weight.grad[0], sum(d.sum(0) for d in data))


def probe_p2p(_ctx):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    comm = P2PCommunicator(ps.get_pipeline_model_parallel_group(), _config(pipeline_model_parallel_size=2))
    shape = (3, 2, 4)
    # Both stages receive, so without the patch both fail before any message is sent (no hang).
    if ps.get_pipeline_model_parallel_rank() == 0:
        grad = comm.send_forward_recv_backward(torch.full(shape, 1.0), shape, is_last_stage=False)
        return torch.equal(grad, torch.full(shape, 2.0))
    act = comm.send_backward_recv_forward(torch.full(shape, 2.0), shape, is_first_stage=False)
    return torch.equal(act, torch.full(shape, 1.0))


def probe_checkpoint(ctx):
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    ctx["ckpt"] = ctx.get("ckpt", 0) + 1
    directory = os.path.join(ctx["tmp"], f"ckpt{ctx['ckpt']}")
    os.makedirs(directory, exist_ok=True)
    dist.barrier()
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.arange(6.0) + 10 * rank
    dist_checkpointing.save({"w": ShardedTensor.from_rank_offsets("probe.w", t, (0, rank, world))}, directory)
    loaded = dist_checkpointing.load(
        {"w": ShardedTensor.from_rank_offsets("probe.w", torch.zeros(6), (0, rank, world))}, directory)
    return torch.equal(loaded["w"], t)


PROBES = {  # patch name -> (layout, probe)
    "megatron.core.tensor_parallel.random.CudaRNGStatesTracker": (_tp2, probe_rng),
    "megatron.core.tensor_parallel.mappings": (_tp2, probe_mappings),
    "megatron.core.tensor_parallel.layers": (_tp2, probe_layers),
    "megatron.core.utils": (_tp2, probe_utils),
    "megatron.core.transformer.moe.router": (_tp2, probe_router),
    "megatron.core.transformer.moe.token_dispatcher": (_ep2, probe_token_dispatcher),
    "megatron.core.transformer.moe.moe_utils.te_general_gemm": (_tp2, probe_router),
    "megatron.core.pipeline_parallel.schedules": (_tp2, probe_schedules),
    "megatron.core.dist_checkpointing.strategies.filesystem_async": (_tp2, probe_checkpoint),
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": (_tp2, probe_checkpoint),
    "megatron.core.pipeline_parallel.p2p_communication": (_pp2, probe_p2p),
}


def _attempt(probe, ctx):
    """(error or None, files of the failing traceback, probe value)."""
    import traceback

    try:
        return None, [], probe(ctx)
    except Exception as e:  # noqa: BLE001 - the test inspects it
        files = [os.path.realpath(f.filename) for f in traceback.extract_tb(e.__traceback__)]
        return f"{type(e).__name__}: {e}"[:2000], files, None


def _upstream_file(name: str) -> str:
    """The source file of the upstream module a patch is named after ("module" or "module.attribute")."""
    import importlib

    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        try:
            return os.path.realpath(importlib.import_module(".".join(parts[:n])).__file__)
        except ImportError:
            continue
    raise ImportError(name)


def _worker(tmp):
    import importlib

    import torch.distributed as dist

    layout = _tp2()
    platform.initialize_model_parallel(layout, seed=SEED, timeout_seconds=120)
    out = {"version": platform.check_megatron_core_version()}

    # Idempotent: applying again changes nothing, and one removal restores the original upstream object.
    mappings = importlib.import_module("megatron.core.tensor_parallel.mappings")
    patched_torch = mappings.torch
    out["applied_again"] = platform.apply_cpu_patches()
    out["same_patch_object"] = mappings.torch is patched_torch and patched_torch is not torch
    with platform.without_cpu_patch("megatron.core.tensor_parallel.mappings"):
        out["original_restored"] = mappings.torch is torch
    out["reapplied"] = mappings.torch is not torch

    ctx, results = {"tmp": tmp}, {}
    for name, (make_layout, probe) in PROBES.items():
        if make_layout() != layout:
            layout = make_layout()
            platform.initialize_model_parallel(layout, seed=SEED, timeout_seconds=120)
        with platform.without_cpu_patch(name):
            without = _attempt(probe, ctx)
        platform.seed_everything(SEED)  # the RNG patch's undo/redo resets megatron's tracker
        with_patch = _attempt(probe, ctx)
        platform.seed_everything(SEED)
        results[name] = dict(without=without, with_patch=with_patch, upstream=_upstream_file(name))
        dist.barrier()
    out["results"] = results
    out["applied_at_end"] = sorted(platform._applied)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return run_world(_worker, 2, str(tmp_path_factory.mktemp("ckpt")), timeout=300)


PATCH_NAMES = [p.name for p in platform.CPU_PATCHES]


def test_every_patch_has_a_probe():
    assert set(PROBES) == set(PATCH_NAMES)
    assert len(PATCH_NAMES) == len(set(PATCH_NAMES))


def _cuda_failure(name: str, error: str) -> bool:
    if name.endswith("te_general_gemm"):
        return error.startswith("NameError") and "te_general_gemm" in error
    return error.split(":", 1)[0] in ("AssertionError", "RuntimeError", "CheckpointException") and (
        "CUDA" in error or "cuda" in error
    )


@pytest.mark.parametrize("name", PATCH_NAMES)
def test_patch_is_needed_and_sufficient(world, name):
    assert name in PROBES, f"CPU patch {name} has no probe in tests/test_platform.py"
    for rank, out in enumerate(world):
        res = out["results"][name]
        error, files, value = res["without"]
        assert error is not None, f"rank {rank}: the probe of {name} passed without the patch (value {value})"
        assert _cuda_failure(name, error), f"rank {rank}: unexpected failure without {name}: {error}"
        # ... and it fails in the upstream module the patch answers for (the innermost megatron frame).
        innermost = [f for f in files if f"{os.sep}megatron{os.sep}core{os.sep}" in f][-1:]
        assert innermost == [res["upstream"]], f"rank {rank}: {name}: failure not raised in {res['upstream']}: {files}"
        assert res["with_patch"] == (None, [], True), f"rank {rank}: {name} applied: {res['with_patch']}"


def test_patches_are_idempotent_and_all_reapplied(world):
    for out in world:
        assert out["version"] == "0.16.1"
        assert sorted(out["applied_again"]) == sorted(PATCH_NAMES)
        assert out["same_patch_object"] and out["original_restored"] and out["reapplied"]
        assert out["applied_at_end"] == sorted(PATCH_NAMES)


@pytest.mark.parametrize("version", ["0.15.0", "0.17.0", "0.16.1rc1"])
def test_unsupported_megatron_core_version(monkeypatch, version):
    import megatron.core.package_info as info

    monkeypatch.setattr(info, "__version__", version)
    applied = dict(platform._applied)
    with pytest.raises(RuntimeError, match=rf"megatron-core {version} is not supported.*0\.16\.1"):
        platform.check_megatron_core_version()
    if not platform.has_cuda():
        with pytest.raises(RuntimeError, match="is not supported"):
            platform.apply_cpu_patches()
    assert platform._applied == applied  # nothing applied in this process


def test_supported_version():
    assert platform.check_megatron_core_version() == "0.16.1"



def _dead_peer(rank, port, timeout_seconds, results):
    """Rank 1 dies right after joining; rank 0's next collective must fail, not wait forever."""
    import time

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    import torch.distributed as dist

    platform.init_distributed(timeout_seconds=timeout_seconds)
    if rank == 1:
        os._exit(0)
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
        results.put((None, "", time.monotonic() - start))
    except Exception as e:  # noqa: BLE001 - raising is what is checked
        results.put((type(e).__name__, str(e)[:300], time.monotonic() - start))


def test_a_dead_rank_makes_the_survivor_fail_instead_of_hanging():
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = platform.free_port()
    procs = [ctx.Process(target=_dead_peer, args=(r, port, 20.0, results)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        raised, message, _seconds = results.get(timeout=180)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert raised is not None, "the all-reduce with a dead peer returned"
    assert message
