"""Everything that differs between CPU (gloo) and GPU (NCCL): process groups, the device, seeding, and the
few places where megatron-core assumes CUDA.

megatron-core has no CPU path. Its TP/SP/PP/EP code runs on CPU with gloo once a handful of CUDA assumptions
are answered for the CPU. Those answers live here and only here: each is named after the upstream place it
replaces, is checked against the installed megatron-core version, is applied only when CUDA is absent, and
can be undone (the tests remove each one and show that its probe then fails).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

SUPPORTED_MEGATRON_CORE = ("0.16.1",)


def has_cuda() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    """The device this rank computes on."""
    return torch.device("cuda", torch.cuda.current_device()) if has_cuda() else torch.device("cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------------
# Process groups
# --------------------------------------------------------------------------------------------------------


def init_distributed(timeout_seconds: float = 600.0, backend: str | None = None) -> tuple[int, int]:
    """Start the default process group from torchrun's environment, or as a single process.

    NCCL with CUDA, gloo without. The timeout makes the survivors of a dead rank fail with an error instead
    of waiting forever. Returns (rank, world_size).
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if has_cuda():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = backend or ("nccl" if has_cuda() else "gloo")
    dist.init_process_group(
        backend=backend,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_seconds),
    )
    return rank, world_size


@dataclass(frozen=True)
class ParallelLayout:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    sequence_parallel: bool = False

    def data_parallel_size(self, world_size: int) -> int:
        model = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        if world_size % model:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor x pipeline parallel size {model}"
            )
        dp = world_size // model
        if dp % self.expert_model_parallel_size:
            raise ValueError(
                f"data parallel size {dp} is not divisible by expert parallel size "
                f"{self.expert_model_parallel_size}"
            )
        return dp


def initialize_model_parallel(
    layout: ParallelLayout, seed: int = 1234, timeout_seconds: float = 600.0, backend: str | None = None
):
    """Process groups (default + megatron's model-parallel groups), CPU patches, and the RNG tracker."""
    apply_cpu_patches()
    _, world_size = init_distributed(timeout_seconds, backend)
    layout.data_parallel_size(world_size)  # validates before megatron asserts
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        expert_model_parallel_size=layout.expert_model_parallel_size,
        distributed_timeout_minutes=max(1, int(timeout_seconds // 60)),
    )
    seed_everything(seed)


def seed_everything(seed: int) -> None:
    """The default generator and megatron's tracked (model-parallel, expert-parallel) states."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------
# megatron-core on CPU
# --------------------------------------------------------------------------------------------------------


class _CpuCuda:
    """`torch.cuda` as a CUDA-assuming megatron module should see it on a CPU-only machine."""

    @staticmethod
    def current_device():
        return torch.device("cpu")

    @staticmethod
    def synchronize(*_args, **_kwargs):
        return None

    @staticmethod
    def Stream(*_args, **_kwargs):  # noqa: N802 - torch's name
        return _CPU_STREAM

    @staticmethod
    def current_stream(*_args, **_kwargs):
        return _CPU_STREAM

    @staticmethod
    def stream(_stream):
        return contextlib.nullcontext()

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _CpuStream:
    """The one CPU "stream" (and its events): CPU work is synchronous, so waiting and recording are no-ops."""

    def wait_stream(self, _other):
        return None

    def record_event(self, *_args):
        return self

    def synchronize(self):
        return None


_CPU_STREAM = _CpuStream()


def _on_cpu(device):
    if device is None:
        return None
    return torch.device("cpu") if torch.device(device).type == "cuda" else device


class _GlooDistributed(types.ModuleType):
    """`torch.distributed` for megatron's variable-size sequence-parallel all-gather and reduce-scatter (the
    alltoall dispatcher at TP > 1): gloo needs equal sizes, so every piece is padded to the largest."""

    def __init__(self):
        super().__init__("torch.distributed")

    def __getattr__(self, name):
        return getattr(dist, name)

    @staticmethod
    def all_gather(tensor_list, tensor, group=None, async_op=False):
        assert not async_op, "megatron's variable-size gather is synchronous"
        longest = max(t.shape[0] for t in tensor_list)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = tensor.new_empty((len(tensor_list) * longest, *tensor.shape[1:]))
        dist.all_gather_into_tensor(gathered, padded, group=group)
        for i, out in enumerate(tensor_list):
            out.copy_(gathered[i * longest : i * longest + out.shape[0]])

    @staticmethod
    def reduce_scatter(output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
        assert not async_op, "megatron's variable-size reduce-scatter is synchronous"
        longest = max(t.shape[0] for t in input_list)
        padded = output.new_zeros((len(input_list) * longest, *output.shape[1:]))
        for i, piece in enumerate(input_list):
            padded[i * longest : i * longest + piece.shape[0]] = piece
        reduced = output.new_empty((longest, *output.shape[1:]))
        dist.reduce_scatter_tensor(reduced, padded, op=op, group=group)
        output.copy_(reduced[: output.shape[0]])


class _CpuTorch(types.ModuleType):
    """The `torch` module as a CUDA-assuming megatron module should see it: `device="cuda"` is the CPU."""

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "empty_like", "zeros_like")

    def __init__(self, distributed=None):
        super().__init__("torch")
        self.cuda = _CpuCuda()
        if distributed is not None:
            self.distributed = distributed

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in self._FACTORIES:

            def factory(*args, device=None, **kwargs):
                return attr(*args, device=_on_cpu(device), **kwargs)

            return factory
        return attr


@dataclass
class CpuPatch:
    """One upstream CUDA assumption and its CPU answer."""

    name: str  # the upstream place, e.g. "megatron.core.tensor_parallel.mappings"
    why: str
    apply: Callable[[], Callable[[], None]]  # applies the patch, returns its undo


def _replace_attr(module_name: str, attr: str, value) -> Callable[[], Callable[[], None]]:
    def apply():
        import importlib

        module = importlib.import_module(module_name)
        original = getattr(module, attr, _MISSING)
        setattr(module, attr, value)

        def undo():
            if original is _MISSING:
                delattr(module, attr)
            else:
                setattr(module, attr, original)

        return undo

    return apply


_MISSING = object()


def _cpu_torch_for(module_name: str, why: str, distributed=None) -> CpuPatch:
    return CpuPatch(module_name, why, _replace_attr(module_name, "torch", _CpuTorch(distributed)))


def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    class CpuRNGStatesTracker(CudaRNGStatesTracker):
        """megatron's RNG tracker (model-parallel / expert-parallel / data-parallel streams) on the CPU
        generator: each tracked stream is a saved CPU generator state."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            outer = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    return CpuRNGStatesTracker


def _patch_rng_tracker():
    import megatron.core.tensor_parallel.random as random

    undos = [
        _replace_attr(random.__name__, "CudaRNGStatesTracker", _cpu_rng_tracker_class())(),
        # Activation recompute saves/restores "the CUDA generator": on CPU the CPU one is saved already.
        _replace_attr(random.__name__, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())(),
        _replace_attr(random.__name__, "_set_cuda_rng_state", lambda *a, **k: None)(),
    ]
    random.initialize_rng_tracker(force_reset=True)

    def undo():
        for u in reversed(undos):
            u()
        random.initialize_rng_tracker(force_reset=True)

    return undo


def _splits_to_host(tensor, as_numpy=False, record_stream=False):
    """megatron's maybe_move_tensor_to_cpu turns only CUDA tensors into host numpy split sizes; CPU tensors
    stay tensors, which all_to_all_single refuses as split sizes."""
    if as_numpy and torch.is_tensor(tensor):
        return tensor.numpy()
    return tensor


def _patch_token_dispatcher():
    from megatron.core.transformer.moe import token_dispatcher

    undos = [
        _replace_attr(token_dispatcher.__name__, "torch", _CpuTorch())(),
        _replace_attr(token_dispatcher.__name__, "maybe_move_tensor_to_cpu", _splits_to_host)(),
    ]

    def undo():
        for u in reversed(undos):
            u()
        token_dispatcher.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = None  # it may hold the CPU stream

    return undo


CPU_PATCHES: list[CpuPatch] = [
    CpuPatch(
        "megatron.core.tensor_parallel.random.CudaRNGStatesTracker",
        "the tracker seeds and forks the CUDA generator (torch.cuda.get_rng_state)",
        _patch_rng_tracker,
    ),
    _cpu_torch_for(
        "megatron.core.tensor_parallel.mappings",
        "all-gather / reduce-scatter buffers are allocated on torch.cuda.current_device(); their variable-size "
        "forms (alltoall dispatcher, TP > 1) use all_gather / reduce_scatter lists, which gloo needs equal",
        distributed=_GlooDistributed(),
    ),
    _cpu_torch_for(
        "megatron.core.tensor_parallel.layers",
        "the sequence-parallel weight-gradient all-gather allocates on torch.cuda.current_device()",
    ),
    _cpu_torch_for(
        "megatron.core.utils",
        "GlobalMemoryBuffer (sequence-parallel all-gather) allocates on torch.cuda.current_device()",
    ),
    _cpu_torch_for(
        "megatron.core.transformer.moe.router",
        "the router gating moves its weight to torch.cuda.current_device()",
    ),
    CpuPatch(
        "megatron.core.transformer.moe.token_dispatcher",
        "the alltoall dispatcher copies its split sizes to the host on a torch.cuda.Stream, and leaves CPU "
        "split sizes as tensors, which all_to_all_single refuses",
        _patch_token_dispatcher,
    ),
    CpuPatch(
        "megatron.core.transformer.moe.moe_utils.te_general_gemm",
        "referenced by the router gating but only defined when transformer-engine is installed (NameError)",
        _replace_attr("megatron.core.transformer.moe.moe_utils", "te_general_gemm", None),
    ),
    _cpu_torch_for(
        "megatron.core.pipeline_parallel.schedules",
        'total_num_tokens is created with device="cuda"',
    ),
    _cpu_torch_for(
        "megatron.core.pipeline_parallel.p2p_communication",
        "p2p buffers on torch.cuda.current_device() and torch.cuda.synchronize()",
    ),
    _cpu_torch_for(
        "megatron.core.dist_checkpointing.strategies.filesystem_async",
        "the torch_dist writer calls torch.cuda.synchronize() before copying tensors out",
    ),
    _cpu_torch_for(
        "megatron.core.dist_checkpointing.strategies.state_dict_saver",
        "the save-failure check all-reduces a flag on torch.cuda.current_device()",
    ),
]

_applied: dict[str, Callable[[], None]] = {}


def check_megatron_core_version() -> str:
    from megatron.core.package_info import __version__

    if __version__ not in SUPPORTED_MEGATRON_CORE:
        raise RuntimeError(
            f"megatron-core {__version__} is not supported: the CPU workarounds in "
            f"megatron_multilora/platform.py were checked against {', '.join(SUPPORTED_MEGATRON_CORE)}. "
            "Install megatron-core==0.16.1 (pip install -r requirements.txt)."
        )
    return __version__


def apply_cpu_patches(only: list[str] | None = None) -> list[str]:
    """Apply the CPU answers to megatron-core's CUDA assumptions (never with CUDA). Idempotent."""
    if has_cuda():
        return []
    check_megatron_core_version()
    for patch in CPU_PATCHES:
        if patch.name not in _applied and (only is None or patch.name in only):
            _applied[patch.name] = patch.apply()
    return list(_applied)


def remove_cpu_patch(name: str) -> None:
    """Undo one patch (tests use this to show each patch is needed)."""
    _applied.pop(name)()


@contextlib.contextmanager
def without_cpu_patch(name: str):
    remove_cpu_patch(name)
    try:
        yield
    finally:
        apply_cpu_patches(only=[name])
