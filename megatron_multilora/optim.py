"""Per-slot AdamW for multi-LoRA training.

Every LoRA parameter is a tensor whose dim 0 is the slot (``[max_slots, ...]``); slot ``k`` of a
parameter is ``param[k]``.  :class:`SlotOptimizer` gives every slot (tenant) the update it would get
from its own ``torch.optim.AdamW`` preceded by Megatron-style gradient clipping:

* its gradient is multiplied by ``grad_scale[k]`` (e.g. 1 / the tenant's token count, since the
  losses are token sums);
* its own L2 grad norm over all parameters (distributed: see ``grad_sq_norm_reduce``); a non-finite
  norm skips that slot only;
* clipping to its own ``clip_grad`` (Megatron: ``coef = clip / (norm + 1e-6)`` if ``< 1``);
* AdamW (decoupled weight decay) with its own betas / eps / weight decay, bias correction from its own
  step count and the learning rate from its own schedule at its own step.

Isolation: rows of slots that do not step (inactive or skipped) are never written -- weights, fp32
master weights, moments and step counts stay bitwise unchanged.  Rows are touched only through
views of a contiguous run of active / stepping slots or ``index_select`` / ``index_copy_``; no
arithmetic ever runs on a row that is not stepping, and idle slots cost nothing (not even their grad
norm).

The math runs over whole slot rows: the fp32 weights (fp32 parameters are moved into this buffer, their
``.data`` a view of it; bf16 / fp16 ones keep an fp32 master there) and both moments are flat ``[slots,
width]`` buffers (row k = slot k's weights and state of every parameter).  The stepping rows' gradients are
scaled into a scratch buffer (one multiply per ``[k, columns]`` piece), then torch's fused AdamW kernel (what
``torch.optim.AdamW(fused=True)`` runs) updates each row in one pass, rows with equal hyper-parameters in one
call, each with its own step count.  On CPU the rows are processed in cache-sized groups (see
``_CPU_BLOCK_NUMEL``).  A slot's row is always one tensor of the kernel, so a slot's result never depends on
which other slots step, on the grouping, or on views vs gather.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "DECAY_STYLES",
    "LRSchedule",
    "SlotHyperParams",
    "StepReport",
    "SlotOptimizer",
    "default_grad_sq_norm_reduce",
]

DECAY_STYLES = ("constant", "linear", "cosine")
# Megatron's clip_grad_by_total_norm_fp32 (and torch.nn.utils.clip_grad_norm_) add this to the norm.
_CLIP_NORM_EPS = 1.0e-6
_STEP_KEY = "step"
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
_MASTER_KEY = "master"
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Off CPU, up to this many contiguous runs of stepping slots are updated in place through views
# (one gradient multiply per run and piece); more runs are gathered / scattered with index ops instead.
# On CPU views always win (gathering allocates, and fresh CPU memory costs page faults).
_MAX_VIEW_RUNS_ACCEL = 4
# On CPU the rows are scaled into the scratch and updated in groups of whole rows of at most this many elements
# (a row if larger), so the kernel reads the scaled gradient from cache (d=1024, 32 slots: 27 vs 32 ms for all
# rows at once, tools/bench.py case 7).  Accelerators update every stepping row at once.
_CPU_BLOCK_NUMEL = 1 << 19


def _check_real(name: str, value, *, minimum: Optional[float] = None, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None:
        if strict and not value > minimum:
            raise ValueError(f"{name} must be > {minimum}, got {value}")
        if not strict and value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_int(name: str, value, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


# --------------------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------------------
@dataclass
class LRSchedule:
    """A tenant's learning-rate schedule, with the semantics of megatron-core's
    ``OptimizerParamScheduler.get_lr`` (``init_lr = warmup_init_lr``, ``max_lr = lr``).

    ``lr_at(step)`` takes the number of optimizer steps this tenant has COMPLETED (as Megatron's
    ``num_steps``, which is advanced after each successful ``optimizer.step()``): the tenant's first
    update uses ``lr_at(0)``, its n-th update ``lr_at(n - 1)``.  Consequence inherited from Megatron:
    with ``warmup_iters > 0`` and ``warmup_init_lr == 0`` the first update has lr 0 (moments still
    move).

    * warm-up: linear from ``warmup_init_lr`` to ``lr`` for ``step <= warmup_iters``;
    * ``decay_style == "constant"`` or ``decay_iters is None``: ``lr`` after warm-up;
    * otherwise linear / cosine from ``lr`` to ``min_lr`` over ``decay_iters - warmup_iters`` steps,
      and ``min_lr`` for ``step > decay_iters``.
    """

    lr: float
    min_lr: float = 0.0
    warmup_iters: int = 0
    decay_iters: Optional[int] = None
    decay_style: str = "linear"
    warmup_init_lr: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self.lr = _check_real("LRSchedule.lr", self.lr, minimum=0.0)
        self.min_lr = _check_real("LRSchedule.min_lr", self.min_lr, minimum=0.0)
        self.warmup_init_lr = _check_real("LRSchedule.warmup_init_lr", self.warmup_init_lr, minimum=0.0)
        if self.min_lr > self.lr:
            raise ValueError(f"LRSchedule.min_lr ({self.min_lr}) must be <= lr ({self.lr})")
        if self.warmup_init_lr > self.lr:
            raise ValueError(
                f"LRSchedule.warmup_init_lr ({self.warmup_init_lr}) must be <= lr ({self.lr})"
            )
        _check_int("LRSchedule.warmup_iters", self.warmup_iters, minimum=0)
        if self.decay_iters is not None:
            _check_int("LRSchedule.decay_iters", self.decay_iters, minimum=1)
            if self.decay_iters <= self.warmup_iters:
                raise ValueError(
                    f"LRSchedule.decay_iters ({self.decay_iters}) must be > warmup_iters "
                    f"({self.warmup_iters}), or None for no decay"
                )
        if self.decay_style not in DECAY_STYLES:
            raise ValueError(
                f"LRSchedule.decay_style must be one of {DECAY_STYLES}, got {self.decay_style!r}"
            )

    def lr_at(self, step: int) -> float:
        """Learning rate after ``step`` completed steps of this tenant (see class doc)."""
        if isinstance(step, torch.Tensor):
            step = int(step.item())
        _check_int("step", step, minimum=0)
        max_lr, min_lr, init_lr = self.lr, self.min_lr, self.warmup_init_lr
        warmup = self.warmup_iters
        # Same expressions, same order as megatron.core.optimizer_param_scheduler.get_lr.
        if warmup > 0 and step <= warmup:
            return init_lr + ((max_lr - init_lr) * float(step) / float(warmup))
        if self.decay_style == "constant" or self.decay_iters is None:
            return max_lr
        if step > self.decay_iters:
            return min_lr
        decay_ratio = float(step - warmup) / float(self.decay_iters - warmup)
        delta_lr = max_lr - min_lr
        if self.decay_style == "linear":
            coeff = 1.0 - decay_ratio
        else:  # cosine
            coeff = 0.5 * (math.cos(math.pi * decay_ratio) + 1.0)
        return min_lr + coeff * delta_lr


# --------------------------------------------------------------------------------------------------
# Per-slot hyper-parameters
# --------------------------------------------------------------------------------------------------
@dataclass
class SlotHyperParams:
    """One tenant's optimizer settings.  ``clip_grad`` of 0 or None disables clipping."""

    schedule: LRSchedule
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: Optional[float] = 1.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.schedule, LRSchedule):
            raise TypeError(
                f"SlotHyperParams.schedule must be an LRSchedule, got {type(self.schedule).__name__}"
            )
        self.schedule.validate()
        self.weight_decay = _check_real("SlotHyperParams.weight_decay", self.weight_decay, minimum=0.0)
        betas = self.betas
        if isinstance(betas, torch.Tensor) or not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"SlotHyperParams.betas must be a pair (beta1, beta2), got {betas!r}")
        b1 = _check_real("SlotHyperParams.betas[0]", betas[0], minimum=0.0)
        b2 = _check_real("SlotHyperParams.betas[1]", betas[1], minimum=0.0)
        for i, b in enumerate((b1, b2)):
            if not b < 1.0:
                raise ValueError(f"SlotHyperParams.betas[{i}] must be in [0, 1), got {b}")
        self.betas = (b1, b2)
        # eps must be > 0: zero-padded rank rows have zero moments, and 0 / (0 + 0) would be NaN.
        self.eps = _check_real("SlotHyperParams.eps", self.eps, minimum=0.0, strict=True)
        if self.clip_grad is not None:
            self.clip_grad = _check_real("SlotHyperParams.clip_grad", self.clip_grad, minimum=0.0)

    @property
    def clipping(self) -> bool:
        return bool(self.clip_grad)


@dataclass
class StepReport:
    """Outcome of :meth:`SlotOptimizer.step`; every field is a CPU tensor of shape ``[num_slots]``.

    * ``grad_norm``: float64, L2 norm of the slot's SCALED gradient before clipping (after the
      distributed reduction); may be inf/nan for skipped slots; 0 for inactive slots.
    * ``lr``: float64, learning rate of this step for active slots (what a skipped slot would have
      used); 0 for inactive slots.
    * ``clip_coef``: float64, clipping factor applied (1.0 = not clipped); 1.0 where not stepped.
    * ``skipped``: bool, active but the grad norm was not finite (slot left untouched).
    * ``stepped``: bool, active and updated.
    """

    grad_norm: torch.Tensor
    lr: torch.Tensor
    clip_coef: torch.Tensor
    skipped: torch.Tensor
    stepped: torch.Tensor


def default_grad_sq_norm_reduce(sq_norms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Single-process reduction: total squared norm per slot = sum over norm groups."""
    values = list(sq_norms.values())
    if not values:
        raise ValueError("no norm groups to reduce")
    total = values[0].clone()
    for v in values[1:]:
        total += v
    return total


ParamsArg = Union[Mapping[str, torch.nn.Parameter], Sequence[Tuple[str, torch.nn.Parameter]]]


def _uniform(values: Sequence[float]) -> Optional[float]:
    first = values[0]
    return first if all(v == first for v in values) else None


def _bitwise_int_dtype(dtype: torch.dtype) -> torch.dtype:
    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.empty((), dtype=dtype).element_size()]


# --------------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------------
class SlotOptimizer:
    """AdamW over slot-major LoRA parameters, one independent optimizer per slot.

    Args:
        params: ``{name: Parameter}`` or ``[(name, Parameter), ...]``; every parameter has dim 0 of
            size ``num_slots``.  Names are the stable keys of :meth:`slot_state`.
            Attributes read at each step: ``norm_group`` (str, default ``"dense"``) and
            ``norm_duplicate`` (bool: this copy is also counted by another rank; excluded from the
            local norm).
        num_slots: number of slots ``S``.
        grad_sq_norm_reduce: ``f({group: Tensor[S] squared norms}) -> Tensor[S]`` total squared norm
            per slot after the caller's all-reduces (the dict is in sorted group order and always
            holds every group that appears among ``params``, zeros where nothing counts locally).
            Default: sum of the values (single process).
        grad_sq_norms: ``f(active slots, sorted) -> {group: fp32 Tensor[n_active]}`` squared norms of
            the raw gradient rows of those slots, e.g. :meth:`lora.grads.GradBuffer.sq_norms` (a few ops
            over flat gradient rows instead of a few per parameter).  Default: computed here from each
            parameter's ``.grad``.

    Gradients are read from ``param.grad`` (a missing grad counts as zeros for a stepping slot).
    fp32 parameters are moved into the optimizer's flat weights buffer at construction (``param.data``
    becomes a view of it; values unchanged); replacing their ``.data`` later is refused at the next step.
    Non-fp32 parameters (bf16 / fp16) get an fp32 master copy; after a step only the stepped rows are
    written back (cast) into the parameter.  If something else writes into such a parameter through
    an in-place op on the parameter itself (which bumps its version counter), the rows whose
    contents no longer equal the cast master are re-synchronised from the parameter at the next call;
    writes through ``param.data`` are invisible to that check: call :meth:`sync_slot_from_params`.
    """

    def __init__(
        self,
        params: ParamsArg,
        num_slots: int,
        *,
        grad_sq_norm_reduce: Optional[Callable[[Dict[str, torch.Tensor]], torch.Tensor]] = None,
        grad_sq_norms: Optional[Callable[[List[int]], Dict[str, torch.Tensor]]] = None,
    ) -> None:
        _check_int("num_slots", num_slots, minimum=1)
        if not hasattr(torch, "_fused_adamw_"):
            raise RuntimeError(f"SlotOptimizer runs torch's fused AdamW kernel (torch._fused_adamw_, CPU since torch "
                               f"2.4); torch {torch.__version__} lacks it: install the torch of tools/setup.sh")
        self._num_slots = num_slots
        named = self._normalise_params(params)
        self._names: List[str] = [n for n, _ in named]
        self._params: List[torch.Tensor] = [p for _, p in named]
        self._index: Dict[str, int] = {n: i for i, n in enumerate(self._names)}
        devices = {p.device for p in self._params}
        if len(devices) != 1:
            raise ValueError(f"all parameters must be on one device, got {sorted(map(str, devices))}")
        self.device: torch.device = devices.pop()
        for name, p in named:
            if p.dim() < 1 or p.shape[0] != num_slots:
                raise ValueError(
                    f"parameter {name!r} has shape {tuple(p.shape)}; dim 0 must be the slot "
                    f"dimension of size num_slots={num_slots}"
                )
            if p.dtype not in _SUPPORTED_DTYPES:
                raise TypeError(f"parameter {name!r} has dtype {p.dtype}; supported: {_SUPPORTED_DTYPES}")
            if p.numel() and not p[0].is_contiguous():
                raise ValueError(f"parameter {name!r}: each slot's row must be contiguous (updated as one row)")
        # The fp32 weights and both moments live in flat fp32 [S, width] buffers, parameter i in columns
        # cols[i] (row k = slot k's weights / state of every parameter), so the step's elementwise passes are a
        # few ops over whole rows, not a few per parameter.  fp32 parameters are moved into the weights buffer
        # (their .data becomes a view of it); bf16 / fp16 ones get their fp32 master there.  _exp_avg[i],
        # _exp_avg_sq[i] and _master[i] are parameter-shaped views.
        widths = [p[0].numel() for p in self._params]
        self._cols: List[Tuple[int, int]] = [(sum(widths[:i]), w) for i, w in enumerate(widths)]

        def views(flat):
            return [flat[:, c:c + w].view(p.shape) for p, (c, w) in zip(self._params, self._cols)]

        with torch.no_grad():
            self._weights = torch.empty(num_slots, sum(widths), dtype=torch.float32, device=self.device)
            self._moments = [torch.zeros_like(self._weights) for _ in range(2)]
            self._exp_avg, self._exp_avg_sq = (views(flat) for flat in self._moments)
            self._master: List[Optional[torch.Tensor]] = []
            for p, view in zip(self._params, views(self._weights)):
                view.copy_(p.detach())
                if p.dtype == torch.float32:
                    p.data = view
                self._master.append(None if p.dtype == torch.float32 else view)
        # where each fp32 parameter must still live at every step (checked: a replaced .data stops training)
        self._moved = [(name, p, p.data_ptr()) for name, p in zip(self._names, self._params)
                       if p.dtype == torch.float32]
        self._master_version: List[int] = [p._version for p in self._params]
        # fp32 scratch (the scaled gradient the AdamW kernel reads): one flat buffer as large as all
        # parameters, allocated at the first step and kept (re-allocating it every step costs more than
        # the math on CPU).  Every group of rows reuses it from its start, so on CPU it stays in cache.
        self._work: List[torch.Tensor] = []
        self._hparams: List[Optional[SlotHyperParams]] = [None] * num_slots
        self._steps: List[int] = [0] * num_slots
        self._reduce = grad_sq_norm_reduce or default_grad_sq_norm_reduce
        self._grad_sq_norms = grad_sq_norms
        #: how many contiguous runs of stepping slots may be updated through views before switching
        #: to gather / scatter; None = automatic (see _MAX_VIEW_RUNS_ACCEL).  Results are identical.
        self.max_view_runs: Optional[int] = None
        #: at most this many elements per group of rows updated together; None = automatic
        #: (_CPU_BLOCK_NUMEL on CPU, everything at once elsewhere).  Results are identical.
        self.block_numel: Optional[int] = None

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _normalise_params(params: ParamsArg) -> List[Tuple[str, torch.Tensor]]:
        if isinstance(params, Mapping):
            items = list(params.items())
        elif isinstance(params, torch.Tensor):
            raise TypeError("params must be a dict name -> Parameter or a list of (name, Parameter) pairs")
        else:
            items = list(params)
            for it in items:
                if not (isinstance(it, (tuple, list)) and len(it) == 2):
                    raise TypeError(
                        "params must be a dict name -> Parameter or a list of (name, Parameter) "
                        f"pairs; got an element of type {type(it).__name__}"
                    )
        if not items:
            raise ValueError("SlotOptimizer got no parameters")
        seen = set()
        out = []
        for name, p in items:
            if not isinstance(name, str) or not name:
                raise TypeError(f"parameter names must be non-empty strings, got {name!r}")
            if name in seen:
                raise ValueError(f"duplicate parameter name {name!r}")
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"parameter {name!r} is a {type(p).__name__}, not a tensor")
            seen.add(name)
            out.append((name, p))
        ids = [id(p) for _, p in out]
        if len(set(ids)) != len(ids):
            raise ValueError("the same parameter tensor is listed under two names")
        return out

    # ------------------------------------------------------------------ slot management
    @property
    def num_slots(self) -> int:
        return self._num_slots

    @property
    def param_names(self) -> List[str]:
        return list(self._names)

    def _check_slot(self, k) -> int:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"slot index must be an int, got {type(k).__name__}")
        if not 0 <= k < self._num_slots:
            raise IndexError(f"slot {k} out of range [0, {self._num_slots})")
        return k

    def configure_slot(self, k: int, hparams: SlotHyperParams) -> None:
        """Set slot ``k``'s hyper-parameters (a validated private copy is kept).  Does not reset its
        state: use :meth:`reset_slot` for a new tenant."""
        self._check_slot(k)
        if not isinstance(hparams, SlotHyperParams):
            raise TypeError(f"hparams must be a SlotHyperParams, got {type(hparams).__name__}")
        hp = copy.deepcopy(hparams)
        hp.validate()
        self._hparams[k] = hp

    def slot_hparams(self, k: int) -> Optional[SlotHyperParams]:
        self._check_slot(k)
        return copy.deepcopy(self._hparams[k])

    def slot_step_count(self, k: int) -> int:
        self._check_slot(k)
        return self._steps[k]

    def slot_lr(self, k: int) -> float:
        """The learning rate of slot ``k``'s next update (where its schedule stands)."""
        self._check_slot(k)
        return self._hparams[k].schedule.lr_at(self._steps[k])

    @torch.no_grad()
    def reset_slot(self, k: int, *, keep_hparams: bool = False) -> None:
        """Forget slot ``k``: zero its moments and step count, drop its hyper-parameters (unless
        ``keep_hparams``) and re-read its master row from the parameter.  Only row ``k`` is written.
        Weights are not touched (re-initialising them is the caller's job)."""
        self._check_slot(k)
        for m, v in zip(self._exp_avg, self._exp_avg_sq):
            m[k].zero_()
            v[k].zero_()
        self._steps[k] = 0
        if not keep_hparams:
            self._hparams[k] = None
        self.sync_slot_from_params(k)

    @torch.no_grad()
    def sync_slot_from_params(self, k: Optional[int] = None) -> None:
        """Re-read the fp32 master rows of slot ``k`` (all slots if None) from the (bf16/fp16)
        parameters, after the caller wrote weights into them (e.g. init or checkpoint load)."""
        if k is not None:
            self._check_slot(k)
        self._resync_masters()
        for i, (p, master) in enumerate(zip(self._params, self._master)):
            if master is None:
                continue
            if k is None:
                master.copy_(p.detach())
            else:
                master[k].copy_(p.detach()[k])
            self._master_version[i] = p._version

    @torch.no_grad()
    def _resync_masters(self) -> None:
        for i, (p, master) in enumerate(zip(self._params, self._master)):
            if master is None or p._version == self._master_version[i]:
                continue
            ity = _bitwise_int_dtype(p.dtype)
            pd = p.detach()
            differs = master.to(p.dtype).view(ity) != pd.view(ity)
            rows = differs.reshape(differs.shape[0], -1).any(dim=1).nonzero().flatten()
            if rows.numel():
                master.index_copy_(0, rows, pd.index_select(0, rows).to(torch.float32))
            self._master_version[i] = p._version

    # ------------------------------------------------------------------ per-tenant checkpoint
    @torch.no_grad()
    def slot_state(self, k: int) -> Dict[str, torch.Tensor]:
        """Optimizer state of slot ``k``: ``{name}.exp_avg``, ``{name}.exp_avg_sq`` (fp32, shape
        ``param.shape[1:]``), ``{name}.master`` for non-fp32 params, and ``step`` (int64 scalar).
        Tensors are copies on the parameters' device."""
        self._check_slot(k)
        self._resync_masters()
        state: Dict[str, torch.Tensor] = {}
        for i, name in enumerate(self._names):
            state[f"{name}.exp_avg"] = self._exp_avg[i][k].clone()
            state[f"{name}.exp_avg_sq"] = self._exp_avg_sq[i][k].clone()
            if self._master[i] is not None:
                state[f"{name}.{_MASTER_KEY}"] = self._master[i][k].clone()
        state[_STEP_KEY] = torch.tensor(self._steps[k], dtype=torch.int64)
        return state

    @torch.no_grad()
    def load_slot_state(self, k: int, state: Mapping[str, torch.Tensor]) -> None:
        """Load a :meth:`slot_state` dict into slot ``k`` (any slot index).  Everything is validated
        before anything is written; only row ``k`` is written.  ``{name}.master`` entries are optional:
        when present for a bf16/fp16 parameter they set both the master row and the parameter row
        (cast); when absent the master row is re-read from the parameter; for fp32 parameters they
        are ignored.  Hyper-parameters are not part of the state (use :meth:`configure_slot`)."""
        self._check_slot(k)
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping of tensors, got {type(state).__name__}")
        expected = {_STEP_KEY}
        for name in self._names:
            expected.update(f"{name}.{key}" for key in _MOMENT_KEYS)
        optional = {f"{name}.{_MASTER_KEY}" for name in self._names}
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected - optional)
        if missing or unexpected:
            raise KeyError(
                f"slot state does not match this optimizer: missing keys {missing[:8]}"
                f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                f"{' ...' if len(unexpected) > 8 else ''}"
            )
        step = state[_STEP_KEY]
        step_val = int(step.item()) if isinstance(step, torch.Tensor) and step.numel() == 1 else step
        if isinstance(step_val, bool) or not isinstance(step_val, int) or step_val < 0:
            raise ValueError(f"slot state 'step' must be a non-negative integer scalar, got {step!r}")
        for key, value in state.items():
            if key == _STEP_KEY:
                continue
            name = key.rsplit(".", 1)[0]
            p = self._params[self._index[name]]
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise TypeError(f"slot state {key!r} must be a floating-point tensor")
            if tuple(value.shape) != tuple(p.shape[1:]):
                raise ValueError(
                    f"slot state {key!r} has shape {tuple(value.shape)} but parameter {name!r} "
                    f"has per-slot shape {tuple(p.shape[1:])} (different max rank / layout?)"
                )
        self._resync_masters()
        for i, name in enumerate(self._names):
            self._exp_avg[i][k].copy_(state[f"{name}.exp_avg"])
            self._exp_avg_sq[i][k].copy_(state[f"{name}.exp_avg_sq"])
            master = self._master[i]
            if master is None:
                continue
            mkey = f"{name}.{_MASTER_KEY}"
            p = self._params[i]
            if mkey in state:
                master[k].copy_(state[mkey])
                p.detach()[k].copy_(master[k])
            else:
                master[k].copy_(p.detach()[k])
            self._master_version[i] = p._version
        self._steps[k] = step_val

    # ------------------------------------------------------------------ the step
    def _rows(self, idx: List[int]) -> "_Rows":
        """The rows of slots ``idx``: views per contiguous run, or gather / scatter (see _Rows)."""
        max_runs = self.max_view_runs
        if max_runs is None:
            max_runs = len(idx) if self.device.type == "cpu" else _MAX_VIEW_RUNS_ACCEL
        return _Rows(idx, self.device, max_runs)

    def _block_numel(self) -> Optional[int]:
        """Elements per group of rows updated together (None: all at once); see _row_groups."""
        if self.block_numel is not None:
            return _check_int("block_numel", self.block_numel, minimum=1)
        return _CPU_BLOCK_NUMEL if self.device.type == "cpu" else None

    def _per_slot(self, values: Sequence[float]) -> Union[float, torch.Tensor]:
        """A scalar if all values agree, else a ``[n]`` fp32 tensor (one value per stepping slot)."""
        u = _uniform(values)
        if u is not None:
            return u
        return torch.tensor(values, dtype=torch.float64).to(dtype=torch.float32, device=self.device)

    @torch.no_grad()
    def step(self, grad_scale, active) -> StepReport:
        """One optimizer step for every active slot (see module doc).  ``grad_scale``: float
        ``[S]``; ``active``: bool ``[S]``.  Raises if an active slot is not configured.  Only the rows
        of active slots are read (gradients included), so idle resident slots cost nothing."""
        S = self._num_slots
        scale = torch.as_tensor(grad_scale).detach().to("cpu", torch.float64)
        act = torch.as_tensor(active).detach().to("cpu")
        if tuple(scale.shape) != (S,):
            raise ValueError(f"grad_scale must have shape [{S}], got {tuple(scale.shape)}")
        if act.dtype != torch.bool or tuple(act.shape) != (S,):
            raise ValueError(f"active must be a bool tensor of shape [{S}], got {act.dtype} {tuple(act.shape)}")
        active_idx = act.nonzero().flatten().tolist()
        unconfigured = [k for k in active_idx if self._hparams[k] is None]
        if unconfigured:
            raise RuntimeError(f"slots {unconfigured} are active but not configured (configure_slot)")

        grad_norm = torch.zeros(S, dtype=torch.float64)
        lr_rep = torch.zeros(S, dtype=torch.float64)
        clip_rep = torch.ones(S, dtype=torch.float64)
        skipped = torch.zeros(S, dtype=torch.bool)
        stepped = torch.zeros(S, dtype=torch.bool)
        if not active_idx:
            return StepReport(grad_norm, lr_rep, clip_rep, skipped, stepped)
        self._resync_masters()

        grads, sq_by_group = self._active_sq_norms(active_idx)
        active_dev = torch.tensor(active_idx, dtype=torch.long, device=self.device)
        scale_act = scale[active_idx]
        scale_sq = (scale_act * scale_act).to(device=self.device, dtype=torch.float32)
        sq_dict: Dict[str, torch.Tensor] = {}
        for group in sorted(sq_by_group):
            full = torch.zeros(S, dtype=torch.float32, device=self.device)
            acc = sq_by_group[group]
            if acc is not None:
                full.index_copy_(0, active_dev, acc * scale_sq)  # zeros elsewhere
            sq_dict[group] = full
        total = self._reduce(sq_dict)
        if not isinstance(total, torch.Tensor) or total.numel() != S:
            raise ValueError(f"grad_sq_norm_reduce must return a tensor of {S} squared norms")
        total = total.detach().reshape(S).to("cpu", torch.float64)  # the one host sync
        norms = total.sqrt()
        finite = torch.isfinite(norms)
        grad_norm = torch.where(act, norms, grad_norm)
        skipped = act & ~finite
        stepped = act & finite

        # ---- per-slot scalars of the stepping slots (Python floats over slots, never over elements).
        idx = stepped.nonzero().flatten().tolist()
        lrs = {k: self.slot_lr(k) for k in active_idx}
        lr_rep[active_idx] = torch.tensor(list(lrs.values()), dtype=torch.float64)
        if not idx:
            return StepReport(grad_norm, lr_rep, clip_rep, skipped, stepped)
        norm_of, scale_of = norms.tolist(), scale.tolist()
        coef, clips, adamw = [], [], []
        for k in idx:
            hp = self._hparams[k]
            c = 1.0
            if hp.clipping:
                c_try = hp.clip_grad / (norm_of[k] + _CLIP_NORM_EPS)
                if c_try < 1.0:
                    c = c_try
            clips.append(c)
            coef.append(scale_of[k] * c)
            adamw.append((lrs[k], *hp.betas, hp.weight_decay, hp.eps, self._steps[k] + 1))
        clip_rep[idx] = torch.tensor(clips, dtype=torch.float64)
        self._update(grads, self._rows(idx), self._per_slot(coef), adamw)
        for k in idx:
            self._steps[k] += 1
        return StepReport(grad_norm, lr_rep, clip_rep, skipped, stepped)

    def _active_sq_norms(self, active_idx: List[int]):
        """The parameters' grads and ``{group: fp32 [n_active] or None}`` squared norms of the raw grads of
        the ACTIVE rows only (idle slots cost nothing; each row is reduced on its own, so a slot's norm
        never depends on which other slots are active), scaled later: ||s g||^2 = s^2 ||g||^2."""
        grads: List[Optional[torch.Tensor]] = []
        groups: List[str] = []
        for name, p in zip(self._names, self._params):
            g = p.grad
            if g is not None and g.shape != p.shape:
                raise ValueError(f"grad of {name!r} has shape {tuple(g.shape)}, expected {tuple(p.shape)}")
            grads.append(g)
            groups.append(norm_group(p))
            if not isinstance(groups[-1], str):
                raise TypeError(f"norm_group of {name!r} must be a string, got {groups[-1]!r}")
        sq_by_group: Dict[str, Optional[torch.Tensor]] = dict.fromkeys(groups)
        if self._grad_sq_norms is not None:
            sq_by_group.update(self._grad_sq_norms(active_idx))
            return grads, sq_by_group
        rows = self._rows(active_idx)
        for p, g, group in zip(self._params, grads, groups):
            if g is None or getattr(p, "norm_duplicate", False):
                continue
            sq = _row_sq_norms(rows.take(g))  # [n_active], active order
            acc = sq_by_group[group]
            sq_by_group[group] = sq if acc is None else acc.add_(sq)
        return grads, sq_by_group

    def _scratch(self) -> torch.Tensor:
        if not self._work:
            numel = sum(p.numel() for p in self._params)
            self._work.append(torch.empty(numel, dtype=torch.float32, device=self.device))
        return self._work[0]

    def _update(self, grads, rows: "_Rows", coef: Union[float, torch.Tensor], adamw: List[tuple]) -> None:
        """AdamW on the rows of the stepping slots: in place through views of each contiguous run, or
        on gathered copies that are scattered back (only stepping rows are ever written).  ``coef``: the
        gradient factor (grad scale x clip coefficient) per stepping slot; ``adamw``: its (lr, beta1, beta2,
        weight decay, eps, step)."""
        for name, p, ptr in self._moved:
            if p.data_ptr() != ptr:
                raise RuntimeError(f"parameter {name!r} no longer lives in the optimizer's weights buffer (its "
                                   f".data was replaced after the optimizer was built): build the optimizer again")
        # grads as [slots, elements per slot]; read only, so a copy would do
        gs = [None if g is None else g.reshape(g.shape[0], -1) for g in grads]
        low = [None if m is None else _slot_rows(p.detach()) for p, m in zip(self._params, self._master)]
        if rows.index is None:
            self._adamw_groups(self._weights, *self._moments, gs, low, rows.runs, coef, adamw)
        else:
            index = rows.index
            w, m, v = (t.index_select(0, index) for t in (self._weights, *self._moments))
            gs = [None if g is None else g.index_select(0, index) for g in gs]
            self._adamw_groups(w, m, v, gs, [None] * len(gs), [(0, len(rows.idx))], coef, adamw)
            for flat, rows_ in zip((self._weights, *self._moments), (w, m, v)):
                flat.index_copy_(0, index, rows_)
            for t, (c, width) in zip(low, self._cols):
                if t is not None:
                    t.index_copy_(0, index, w[:, c:c + width].to(t.dtype))
        for i, p in enumerate(self._params):
            self._master_version[i] = p._version

    def _adamw_groups(self, weights, m, v, gs, low, runs: List[Tuple[int, int]], coef, adamw) -> None:
        """AdamW on the rows ``runs`` of the flat fp32 ``weights`` / ``m`` / ``v`` ([rows, width], parameter i in
        columns ``self._cols[i]``) with the grads ``gs`` ([rows, elements per slot]); the j-th of all those rows
        belongs to the j-th stepping slot.  A group of whole rows at a time (see :func:`_row_groups`): their
        scaled gradients into the scratch, then torch's fused AdamW kernel on each row -- one pass over the
        weights and moments instead of ten elementwise ones (~2.5-3x faster, tools/bench.py case 7), the kernel
        ``torch.optim.AdamW(fused=True)`` runs.  A slot's row is always one tensor of the kernel's lists, so its
        result never depends on which other slots step or on the grouping (the kernel's vectorised body and its
        tail round v differently: a row split at other places would change bitwise).  Rows whose
        hyper-parameters agree share one call; each keeps its own step count.  ``low[i]``: the bf16 / fp16
        parameter of master columns i (or None), which gets the new rows while they are still in cache."""
        widths = [width for _, width in self._cols]
        width = sum(widths)
        pieces = _pieces(gs, widths)
        scratch = self._scratch()
        step_of = {t: torch.tensor(float(t), device=self.device) for t in {hp[-1] for hp in adamw}}  # read only
        for lo, k, first in _row_groups(width, runs, self._block_numel()):
            w = scratch.narrow(0, 0, k * width).view(k, width)
            c = coef if not isinstance(coef, torch.Tensor) else coef.narrow(0, first, k).view(k, 1)
            # w <- grad * (grad_scale * clip_coef), in fp32 (a missing grad counts as zeros). Parameters whose
            # grads are adjacent columns of one flat fp32 buffer (lora.grads.GradBuffer, same column order) are
            # read as one [k, columns] piece by one multiply; the others are copied per parameter, then scaled.
            present, col = [], 0
            for b0, b1, src in pieces:
                cols = sum(widths[b0:b1])
                dst = w.narrow(1, col, cols)
                if src is not None:
                    torch.mul(_rows_of(src, lo, k), c, out=dst)
                else:
                    for i, wb in zip(range(b0, b1), dst.split(widths[b0:b1], dim=1)):
                        if gs[i] is None:
                            wb.zero_()
                        else:
                            present.append((wb, _rows_of(gs[i], lo, k)))
                col += cols
            if present:
                torch._foreach_copy_([wb for wb, _ in present], [g for _, g in present])
                torch._foreach_mul_([wb for wb, _ in present], c if not isinstance(c, torch.Tensor) else
                                    [c] * len(present))
            calls: Dict[tuple, Tuple[list, ...]] = {}  # (lr, beta1, beta2, weight decay, eps) -> tensor lists
            for j in range(k):
                *hyper, step = adamw[first + j]
                ps, grads, ms, vs, steps = calls.setdefault(tuple(hyper), ([], [], [], [], []))
                ps.append(weights[lo + j])
                grads.append(w[j])
                ms.append(m[lo + j])
                vs.append(v[lo + j])
                steps.append(step_of[step])
            for (lr, beta1, beta2, decay, eps), (ps, grads, ms, vs, steps) in calls.items():
                torch._fused_adamw_(ps, grads, ms, vs, [], steps, lr=lr, beta1=beta1, beta2=beta2,
                                    weight_decay=decay, eps=eps, amsgrad=False, maximize=False)
            for i, (c0, cw) in enumerate(self._cols):
                if low[i] is not None:
                    _rows_of(low[i], lo, k).copy_(weights[lo:lo + k, c0:c0 + cw])


def _buffer_cols(g: Optional[torch.Tensor]):
    """(buffer, first column) when the fp32 grad ``g`` [slots, n] is a column block of a 2-D buffer, else None."""
    base = None if g is None or g.dtype != torch.float32 else g._base
    if (base is None or base.dim() != 2 or base.stride(1) != 1 or g.shape[0] != base.shape[0]
            or g.stride() != (base.stride(0), 1)):
        return None
    return base, g.storage_offset() - base.storage_offset()


def _pieces(grads: List[Optional[torch.Tensor]], widths: List[int]):
    """A segment's parameter blocks as maximal pieces ``(first block, end block, grad columns or None)``: blocks
    whose grads are adjacent column blocks of one buffer form a piece with that buffer's [slots, columns] view;
    consecutive other blocks form a piece without one."""
    pieces: List[list] = []  # [first block, end block, buffer or None, first column, end column]
    for b, (g, width) in enumerate(zip(grads, widths)):
        at = _buffer_cols(g)
        last = pieces[-1] if pieces else None
        if last is not None and at is None and last[2] is None:
            last[1] = b + 1
        elif last is not None and at is not None and last[2] is at[0] and last[4] == at[1]:
            last[1], last[4] = b + 1, at[1] + width
        else:
            buffer, col = at if at is not None else (None, 0)
            pieces.append([b, b + 1, buffer, col, col + width])
    return [(b0, b1, None if buf is None else buf[:, c0:c1]) for b0, b1, buf, c0, c1 in pieces]


def _slot_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` [slots, ...] as [slots, elements per slot] (a view)."""
    return t.view(t.shape[0], -1)


def _rows_of(t: torch.Tensor, lo: int, k: int) -> torch.Tensor:
    """Rows ``lo:lo+k`` of ``t`` (``t`` itself when that is all of it: a view costs ~2 us on CPU)."""
    return t if lo == 0 and k == t.shape[0] else t.narrow(0, lo, k)


def _row_groups(width: int, runs: List[Tuple[int, int]], budget: Optional[int]):
    """``(first row, rows, first stepping slot)`` groups of whole rows covering ``runs``, each of at most
    ``budget`` elements (or one row, if larger): the scaled gradients written to the scratch are still in cache
    when the AdamW kernel reads them.  ``budget`` None: each run at once."""
    per = max(1, budget // max(width, 1)) if budget else None
    groups, pos = [], 0
    for lo, n in runs:
        for off in range(0, n, per or n):
            groups.append((lo + off, min(per or n, n - off), pos + off))
        pos += n
    return groups


class _Rows:
    """The rows of some slots (sorted indices ``idx``): ``runs`` of contiguous rows to use through views,
    or, with more than ``max_runs`` runs, an ``index`` for gather (``index_select``) / scatter
    (``index_copy_``).  Both give identical results; views avoid the copies, an index avoids
    launching one kernel per run on an accelerator."""

    def __init__(self, idx: List[int], device: torch.device, max_runs: int) -> None:
        self.idx = idx
        self.runs = slot_runs(idx)
        self.index = None
        if len(self.runs) > max_runs:
            self.index = torch.tensor(idx, dtype=torch.long, device=device)

    def take(self, t: torch.Tensor) -> List[torch.Tensor]:
        """The selected rows of ``t``, in slot order: one view per run, or one gathered copy."""
        if self.index is not None:
            return [t.index_select(0, self.index)]
        return [_rows_of(t, lo, n) for lo, n in self.runs]


def _row_sq_norms(blocks: List[torch.Tensor]) -> torch.Tensor:
    """fp32 squared L2 norm of each row (dim 0) of the row blocks, concatenated.  A row's value does not
    depend on which other rows share its block (bitwise; checked for fp32 / bf16 with 1 and 2 threads),
    so a slot's norm does not depend on which other slots are active."""
    out = []
    for b in blocks:
        n = torch.linalg.vector_norm(b.unsqueeze(1) if b.dim() == 1 else b.flatten(1), 2, dim=1,
                                     dtype=torch.float32)
        out.append(n * n)
    return out[0] if len(out) == 1 else torch.cat(out)


def norm_group(p: torch.Tensor) -> str:
    """The group whose per-slot grad norm ``p`` counts in (``"dense"`` unless the parameter says)."""
    return getattr(p, "norm_group", "dense")


def slot_runs(idx: List[int]) -> List[Tuple[int, int]]:
    """Sorted slot indices -> [(start, length)] of maximal contiguous runs."""
    runs: List[Tuple[int, int]] = []
    for k in idx:
        if runs and runs[-1][0] + runs[-1][1] == k:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((k, 1))
    return runs
