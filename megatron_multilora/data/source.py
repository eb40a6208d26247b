"""Plans each iteration: which tenants step, with which samples, on which data-parallel rank.

Every rank builds the same global plan from the same state and keeps only its share, so planning needs no
communication. A tenant's sample order depends only on (seed, tenant name, epoch) -- never on which other
tenants share the run -- so a tenant sees the same data in a mixed run as it would training alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from .datasets import DataError

PAD_SLOT = -1  # slot id of padding samples: no adapter, no loss


@dataclass
class IterationPlan:
    """What one iteration trains; identical on every DP rank except ``micro_batches`` (this rank's share)."""

    iteration: int  # 1-based: the plan for the first iteration has iteration == 1
    tenants: list[str]  # stepping tenants, in slot order
    samples_per_tenant: dict[str, int]  # global counts (all DP ranks)
    micro_batches: list[dict[str, torch.Tensor]]  # this DP rank's share: tokens, labels, loss mask / weights, slots
    num_micro_batches: int  # the same on every DP rank
    exhausted: list[str] = field(default_factory=list)  # tenants whose last epoch ended in this iteration


def _epoch_order(seed: int, name: str, epoch: int, size: int) -> np.ndarray:
    """Sample order of one epoch, from a stable hash (Python's hash() changes between processes)."""
    digest = hashlib.sha256(f"{seed}/{name}/{epoch}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little")).permutation(size)


class _Stream:
    """One tenant's walk through its dataset, epoch after epoch."""

    def __init__(self, name, dataset, global_batch_size, max_epochs, seed):
        self.name, self.dataset = name, dataset
        self.global_batch_size, self.max_epochs, self.seed = global_batch_size, max_epochs, seed
        self.epoch = self.position = self.steps = 0
        self.last_step = 0  # iteration this tenant last stepped in; 0 = never (it goes first)
        self._order = (-1, None)  # (epoch, permutation) cache

    @property
    def active(self) -> bool:
        return self.max_epochs is None or self.epoch < self.max_epochs

    def _samples_left(self) -> int | None:
        """Samples still to take before max_epochs ends (None without max_epochs: the stream never ends)."""
        if self.max_epochs is None:
            return None
        return (self.max_epochs - self.epoch) * len(self.dataset) - self.position

    def batch_size(self) -> int:
        """Samples the next step takes: the global batch size, or what is left of the last epoch."""
        left = self._samples_left()
        return self.global_batch_size if left is None else min(self.global_batch_size, left)

    def steps_left(self) -> int | None:
        """Optimizer steps its data still gives (the last one maybe a partial batch); None: no end."""
        left = self._samples_left()
        return None if left is None else -(-left // self.global_batch_size)

    def take(self, count: int) -> list[int]:
        indices: list[int] = []
        while len(indices) < count:
            if self._order[0] != self.epoch:
                self._order = (self.epoch, _epoch_order(self.seed, self.name, self.epoch, len(self.dataset)))
            chunk = self._order[1][self.position : self.position + count - len(indices)]
            indices += chunk.tolist()
            self.position += len(chunk)
            if self.position == len(self.dataset):
                self.epoch, self.position = self.epoch + 1, 0
        return indices

    def state(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "steps": self.steps,
                "num_samples": len(self.dataset)}

    def load(self, state: dict) -> None:
        if state["num_samples"] != len(self.dataset):
            where = getattr(self.dataset, "path", "its dataset")
            raise DataError(
                f"tenant {self.name!r}: its checkpoint's data position is for {state['num_samples']} samples but "
                f"{where} now gives {len(self.dataset)}; the data changed (or seq_length / packing), so the saved "
                "position is meaningless: restore the data, or train the new data as a new tenant"
            )
        self.seed, self.epoch = state["seed"], state["epoch"]
        self.position, self.steps = state["position"], state["steps"]


class MultiAdapterDataSource:
    """Per-tenant deterministic streams, mixed into one plan per iteration.

    ``tenants`` maps name -> ``(dataset, global_batch_size)`` (or with a third item, ``max_epochs``). A
    dataset needs ``__len__``, ``__getitem__`` returning tokens / labels / loss_mask / loss_weights, and the
    attributes ``seq_length`` and ``pad_id``.

    With ``max_samples_per_iteration`` only tenants whose batches fit step; the others wait. Tenants go in
    order of the iteration they last stepped in (longest wait first), then fewest steps, then name, and
    each that still fits is taken: with a fixed set of n tenants none waits more than n - 1 iterations.
    """

    def __init__(self, tenants=None, *, seed: int = 0, micro_batch_size: int = 1, data_parallel_size: int = 1,
                 data_parallel_rank: int = 0, max_samples_per_iteration: int | None = None):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})")
        if max_samples_per_iteration is not None and max_samples_per_iteration < 1:
            raise ValueError(f"max_samples_per_iteration must be >= 1, got {max_samples_per_iteration}")
        self.seed = seed
        self.micro_batch_size = micro_batch_size
        self.data_parallel_size = data_parallel_size
        self.data_parallel_rank = data_parallel_rank
        self.max_samples_per_iteration = max_samples_per_iteration
        self.iteration = 0  # iterations planned so far
        self._streams: dict[str, _Stream] = {}
        for name, spec in (tenants or {}).items():
            self.add_tenant(name, *spec)

    @property
    def tenants(self) -> list[str]:
        return sorted(self._streams)

    def add_tenant(self, name: str, dataset, global_batch_size: int, max_epochs: int | None = None, *,
                   state: dict | None = None, seed: int | None = None) -> None:
        """Register a tenant; ``state`` (:meth:`tenant_state`, maybe of another run) resumes its stream;
        ``seed`` overrides the source's seed for this tenant's stream."""
        if name in self._streams:
            raise ValueError(f"tenant {name!r} is already in the data source")
        if len(dataset) == 0:
            raise ValueError(f"tenant {name!r}: the dataset is empty")
        if global_batch_size < 1:
            raise ValueError(f"tenant {name!r}: global_batch_size must be >= 1, got {global_batch_size}")
        capacity = self.max_samples_per_iteration
        if capacity is not None and global_batch_size > capacity:
            raise ValueError(f"tenant {name!r}: global_batch_size {global_batch_size} can never fit in "
                             f"max_samples_per_iteration {capacity}")
        if max_epochs is not None and max_epochs < 1:
            raise ValueError(f"tenant {name!r}: max_epochs must be >= 1, got {max_epochs}")
        for other in self._streams.values():
            if (other.dataset.seq_length, other.dataset.pad_id) != (dataset.seq_length, dataset.pad_id):
                raise ValueError(
                    f"tenant {name!r}: seq_length {dataset.seq_length} / pad_id {dataset.pad_id} differ from "
                    f"tenant {other.name!r} ({other.dataset.seq_length} / {other.dataset.pad_id})"
                )
        stream = _Stream(name, dataset, global_batch_size, max_epochs, self.seed if seed is None else seed)
        if state is not None:
            stream.load(state)
        self._streams[name] = stream

    def remove_tenant(self, name: str) -> dict:
        """Drop a tenant; returns its :meth:`tenant_state` so it can be saved or added again later."""
        state = self.tenant_state(name)
        del self._streams[name]
        return state

    def is_active(self, name: str) -> bool:
        """False once a tenant with ``max_epochs`` has used up its data."""
        return self._stream(name).active

    def steps_left(self, name: str) -> int | None:
        """Steps a tenant with ``max_epochs`` can still take before its data is used up (None: no limit)."""
        return self._stream(name).steps_left()

    def tenant_state(self, name: str) -> dict:
        return self._stream(name).state()

    def state_dict(self) -> dict:
        return {
            "iteration": self.iteration,
            "tenants": {name: s.state() for name, s in self._streams.items()},
            "last_step": {name: s.last_step for name, s in self._streams.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume exactly. Every tenant in ``state`` must already be added (with its dataset); tenants added
        but absent from ``state`` keep their fresh streams."""
        missing = sorted(set(state["tenants"]) - set(self._streams))
        if missing:
            raise ValueError(f"data state has tenants that were not added to the data source: {missing}")
        self.iteration = state["iteration"]
        for name, tenant_state in state["tenants"].items():
            self._streams[name].load(tenant_state)
            self._streams[name].last_step = state["last_step"][name]

    def next_iteration(self, slot_of: dict[str, int], tenants=None) -> IterationPlan:
        """Plan the next iteration; ``tenants`` restricts which tenants may step (default: all active)."""
        candidates = [self._stream(n) for n in dict.fromkeys(self._streams if tenants is None else tenants)]
        stepping = self._choose([s for s in candidates if s.active])
        for s in stepping:
            if s.name not in slot_of:
                raise ValueError(f"tenant {s.name!r} steps this iteration but has no slot in slot_of")
            if slot_of[s.name] < 0:
                raise ValueError(f"tenant {s.name!r}: slot {slot_of[s.name]} is negative (padding only)")
        stepping.sort(key=lambda s: slot_of[s.name])
        slots = {s.name: slot_of[s.name] for s in stepping}
        if len(set(slots.values())) != len(slots):
            raise ValueError(f"tenants stepping together share a slot: {slots}")

        self.iteration += 1
        samples = []  # (slot, dataset, index), sorted by slot: each tenant's samples are contiguous
        counts = {}
        for s in stepping:
            indices = s.take(s.batch_size())
            s.steps, s.last_step = s.steps + 1, self.iteration
            counts[s.name] = len(indices)
            samples += [(slot_of[s.name], s.dataset, i) for i in indices]

        micro_batches = self.micro_batches(samples)
        return IterationPlan(
            iteration=self.iteration,
            tenants=[s.name for s in stepping],
            samples_per_tenant=counts,
            micro_batches=micro_batches,
            num_micro_batches=len(micro_batches),
            exhausted=[s.name for s in stepping if not s.active],
        )

    def micro_batches(self, samples: list) -> list[dict]:
        """This rank's micro-batches of ``samples`` [(slot, dataset, index), ...] sorted by slot (also used
        for evaluation): a contiguous share per data-parallel rank, padded so every rank has as many."""
        if not samples:
            return []
        share, count = self._rank_share(samples)
        mbs = self.micro_batch_size
        return [self._collate(share[k : k + mbs], samples[0][1]) for k in range(0, count, mbs)]

    def _stream(self, name: str) -> _Stream:
        if name not in self._streams:
            raise KeyError(f"unknown tenant {name!r}; known: {self.tenants}")
        return self._streams[name]

    def _choose(self, candidates: list[_Stream]) -> list[_Stream]:
        order = sorted(candidates, key=lambda s: (s.last_step, s.steps, s.name))
        if self.max_samples_per_iteration is None:
            return order
        chosen, room = [], self.max_samples_per_iteration
        for s in order:
            if s.batch_size() <= room:
                chosen.append(s)
                room -= s.batch_size()
        return chosen

    def _rank_share(self, samples: list) -> tuple[list, int]:
        """This rank's contiguous chunk of ``samples`` (sizes differ by at most one across ranks), padded with
        ``None`` to the micro-batch count every rank uses; returns (share, padded length)."""
        dp, rank, mbs = self.data_parallel_size, self.data_parallel_rank, self.micro_batch_size
        base, extra = divmod(len(samples), dp)
        start = rank * base + min(rank, extra)
        mine = samples[start : start + base + (rank < extra)]
        padded = -(-(base + (extra > 0)) // mbs) * mbs
        return mine + [None] * (padded - len(mine)), padded

    @staticmethod
    def _collate(entries: list, reference) -> dict[str, torch.Tensor]:
        """Stack samples into a micro-batch; ``None`` entries become padding samples (slot -1, no loss)."""
        seq, pad = reference.seq_length, reference.pad_id
        padding = {
            "tokens": torch.full((seq,), pad, dtype=torch.long),
            "labels": torch.full((seq,), pad, dtype=torch.long),
            "loss_mask": torch.zeros(seq, dtype=torch.float32),
            "loss_weights": torch.zeros(seq, dtype=torch.float32),
        }
        rows, slots = [], []
        for entry in entries:
            if entry is None:
                rows.append(padding)
                slots.append(PAD_SLOT)
            else:
                slot, dataset, index = entry
                rows.append(dataset[index])
                slots.append(slot)
        batch = {key: torch.stack([row[key] for row in rows]) for key in padding}
        batch["slots"] = torch.tensor(slots, dtype=torch.long)
        return batch
