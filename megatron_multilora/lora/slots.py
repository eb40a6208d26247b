"""SlotTable: the pool of adapter slots, which tenant holds which, and each slot's rank / scale / targets.

Slots are allocated at max_rank before any wrapping; a tenant of rank r uses the first r rows of A and columns
of B of its slot; the rest stays exactly zero. (Re)initialising a slot is deterministic from (seed, tenant,
layer) and computed on the full unsharded shape before taking this rank's shard, so every data-parallel
replica and every parallel layout starts a tenant from the same weights, and no other slot is touched.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass, field

import torch

DENSE_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
EXPERT_TARGETS = ("expert_fc1", "expert_fc2")
ALL_TARGETS = DENSE_TARGETS + EXPERT_TARGETS
INITS = ("kaiming", "gaussian")

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class SlotError(RuntimeError):
    """A slot-table request that cannot be honoured (full, too large, unknown, duplicate...)."""


def check_tenant_name(name: str) -> str:
    """Tenant names become directory names: refuse anything that could escape or confuse a path."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or name in (".", ".."):
        raise SlotError(
            f"tenant name {name!r} is not safe as a directory name: use 1-64 characters from "
            "[A-Za-z0-9_.-], starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class LoRASpec:
    rank: int
    alpha: float | None = None  # None: alpha = rank (scale 1)
    target_modules: tuple[str, ...] | None = None  # None: every module the pool wraps
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"

    @property
    def scale(self) -> float:
        alpha = self.rank if self.alpha is None else self.alpha
        return alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclass(frozen=True)
class TenantRecord:
    name: str
    slot: int
    spec: LoRASpec
    targets: frozenset

    @property
    def internal_name(self) -> str:
        return f"slot{self.slot}.{self.name}"


def stable_seed(*parts) -> int:
    """A seed from names and numbers that is the same in every process and Python run (unlike hash())."""
    return zlib.crc32("\x1f".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


@dataclass
class SlotTable:
    max_slots: int
    max_rank: int
    target_modules: tuple[str, ...] = DENSE_TARGETS
    seed: int = 0
    layers: list = field(default_factory=list)  # the LoRA layers of this rank (registered by inject)

    def __post_init__(self):
        if self.max_slots < 1 or self.max_rank < 1:
            raise SlotError(f"max_slots ({self.max_slots}) and max_rank ({self.max_rank}) must be >= 1")
        unknown = sorted(set(self.target_modules) - set(ALL_TARGETS))
        if unknown:
            raise SlotError(f"unknown target module(s) {unknown}; known: {list(ALL_TARGETS)}")
        self.target_modules = tuple(self.target_modules)
        self._records: dict[str, TenantRecord] = {}
        self._by_slot: list[TenantRecord | None] = [None] * self.max_slots

    # ---- tenants ---------------------------------------------------------------------------------------
    def acquire(self, tenant: str, spec: LoRASpec, slot: int | None = None) -> int:
        """Give `tenant` a free slot (the lowest, or `slot`) and initialise its weights there."""
        targets = self._validate(tenant, spec)
        if slot is None:
            free = self.free_slots
            if not free:
                raise SlotError(f"no free slot for tenant {tenant!r}: all {self.max_slots} slots are taken")
            slot = free[0]
        elif not 0 <= slot < self.max_slots:
            raise SlotError(f"slot {slot} is out of range: this table has slots 0..{self.max_slots - 1}")
        elif self._by_slot[slot] is not None:
            raise SlotError(f"slot {slot} is held by tenant {self._by_slot[slot].name!r}")
        record = TenantRecord(tenant, slot, spec, targets)
        self._records[tenant] = record
        self._by_slot[slot] = record
        self.reset_slot(slot)
        return slot

    def release(self, tenant: str) -> int:
        """Free the tenant's slot and zero its weights; no other slot is touched."""
        record = self.record(tenant)
        del self._records[tenant]
        self._by_slot[record.slot] = None
        self.reset_slot(record.slot)
        return record.slot

    def record(self, tenant: str) -> TenantRecord:
        try:
            return self._records[tenant]
        except KeyError:
            known = ", ".join(sorted(self._records)) or "none"
            raise SlotError(f"unknown tenant {tenant!r} (known: {known})") from None

    def slot_of(self, tenant: str) -> int:
        return self.record(tenant).slot

    def at(self, slot: int) -> TenantRecord | None:
        return self._by_slot[slot]

    @property
    def tenants(self) -> dict[str, TenantRecord]:
        return dict(self._records)

    @property
    def free_slots(self) -> list[int]:
        return [i for i, r in enumerate(self._by_slot) if r is None]

    def _validate(self, tenant: str, spec: LoRASpec) -> frozenset:
        check_tenant_name(tenant)
        if tenant in self._records:
            raise SlotError(f"tenant {tenant!r} already holds slot {self._records[tenant].slot}")
        if not isinstance(spec.rank, int) or not 1 <= spec.rank <= self.max_rank:
            raise SlotError(f"tenant {tenant!r}: rank {spec.rank} must be between 1 and max_rank {self.max_rank}")
        if not 0.0 <= spec.dropout < 1.0:
            raise SlotError(f"tenant {tenant!r}: dropout {spec.dropout} must be in [0, 1)")
        if spec.init not in INITS:
            raise SlotError(f"tenant {tenant!r}: unknown init {spec.init!r}; known: {list(INITS)}")
        targets = self.target_modules if spec.target_modules is None else tuple(spec.target_modules)
        unknown = sorted(set(targets) - set(self.target_modules))
        if unknown:
            raise SlotError(
                f"tenant {tenant!r}: unknown target module(s) {unknown}; this pool wraps {list(self.target_modules)}"
            )
        return frozenset(targets)

    # ---- weights ---------------------------------------------------------------------------------------
    def reset_slot(self, slot: int) -> None:
        """Zero the slot in every layer, then (if held) draw the tenant's initial A from (seed, tenant, layer)."""
        record = self._by_slot[slot]
        with torch.no_grad():
            for layer in self.layers:
                layer.zero_slot(slot)
                if record is not None and layer.lora_kind in record.targets:
                    layer.set_slot(slot, a=self._initial_a(record, layer), b=None)

    def _initial_a(self, record: TenantRecord, layer) -> torch.Tensor:
        """The tenant's full (unsharded) initial A of one layer, [(experts,) rank, in]; B starts at zero."""
        shape = layer.global_shape("a", record.spec.rank)
        g = torch.Generator().manual_seed(stable_seed(self.seed, record.name, layer.global_name))
        fan_in = shape[-1]
        if record.spec.init == "kaiming":  # PEFT's default: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in))
            bound = 1.0 / math.sqrt(fan_in)
            return torch.empty(shape).uniform_(-bound, bound, generator=g)
        return torch.empty(shape).normal_(0.0, 1.0 / record.spec.rank, generator=g)
