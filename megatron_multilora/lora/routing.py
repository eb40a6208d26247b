"""AdapterRouting: which slot each sample of one micro-batch belongs to, and the segments each layer runs.

A routing is built once per micro-batch from the slot table as it is then (ranks, scales, targets are copied
into its segments), so nothing it says can change under it. The layers read the routing that is *active*:
`forward_step` activates it right before the model sees the micro-batch, and `bind_to_backward` re-activates it
when that micro-batch's backward starts, so activation recompute (which re-runs forward inside backward,
possibly after other micro-batches' forwards under 1F1B) sees the right one.
"""

from __future__ import annotations

import contextlib

import torch

from .ops import Segment

NO_ADAPTER = -1  # a sample that uses the base model only (padding, reference log-probs)

_active: "AdapterRouting | None" = None


class AdapterRouting:
    def __init__(self, sample_slots, table):
        slots = [int(s) for s in (sample_slots.tolist() if torch.is_tensor(sample_slots) else sample_slots)]
        self.sample_slots = torch.tensor(slots, dtype=torch.long)
        runs = _contiguous_runs(slots)
        # Every held slot (MoE experts also see tokens of other data-parallel ranks' micro-batches).
        self._slot_specs = {r.slot: (r.spec, r.targets) for r in table.tenants.values()}
        self._segments: dict[str, list[Segment]] = {}
        self._token_segments: dict[tuple[str, int], list[Segment]] = {}
        for kind in table.target_modules:
            segs = []
            for slot, start, end in runs:
                record = table.at(slot) if 0 <= slot < table.max_slots else None  # no wrap-around for -2
                if slot != NO_ADAPTER and record is None:
                    raise ValueError(f"samples {start}..{end - 1} are routed to slot {slot}, which no tenant holds")
                if record is not None and kind in record.targets:
                    spec = record.spec
                    segs.append(Segment(slot, start, end, spec.rank, spec.scale, spec.dropout))
            self._segments[kind] = segs

    @property
    def trains_any_layer(self) -> bool:
        """Some sample of this micro-batch trains some LoRA layer (its loss then has a graph to them)."""
        return any(self._segments.values())

    def token_major(self, shape) -> bool:
        """How the rows of an activation of this micro-batch are laid out: megatron's [s, b, h] (False: segments run
        along the samples, dimension 1) or token-major [b * s, 1, h] (True: model.token_major, segments run along
        the tokens of dimension 0, s of them per sample -- one, for one-token samples). A one-sample [s, 1, h] is
        taken as [s, b, h]: the same rows either way."""
        samples = self.sample_slots.numel()
        if shape[1] == samples:
            return False
        if shape[1] == 1 and shape[0] % samples == 0:
            return True
        raise ValueError(f"an activation of shape {tuple(shape)} is neither [s, {samples}, h] nor token-major "
                         f"[{samples} * s, 1, h] for this micro-batch of {samples} samples")

    def tokens_per_sample(self, shape) -> int:
        """Rows of one sample along the segments' dimension: s token-major, else 1."""
        return shape[0] // self.sample_slots.numel() if self.token_major(shape) else 1

    def segments(self, kind: str, tokens_per_sample: int = 1) -> list[Segment]:
        """The kind's segments along the samples, or along the tokens when `tokens_per_sample` > 1."""
        segments = self._segments.get(kind, [])
        if tokens_per_sample == 1 or not segments:
            return segments
        key = (kind, tokens_per_sample)
        if key not in self._token_segments:
            self._token_segments[key] = [
                s._replace(start=s.start * tokens_per_sample, end=s.end * tokens_per_sample) for s in segments]
        return self._token_segments[key]

    def expert_segments(self, kind: str, runs) -> list[Segment]:
        """Segments of the dispatched tokens of a MoE layer's local experts, given as (local expert, slot, count)
        runs in token order (segment.weight = the local expert)."""
        segments, start = [], 0
        for expert, slot, count in runs:
            entry = self._slot_specs.get(slot)
            if entry is not None and kind in entry[1]:
                spec = entry[0]
                segments.append(Segment(slot, start, start + count, spec.rank, spec.scale, spec.dropout, expert))
            elif slot != NO_ADAPTER and entry is None:
                raise ValueError(f"tokens are routed to slot {slot}, which no tenant holds")
            start += count
        return segments

    def tokens_grouped_by_slot(self, shape) -> bool:
        """Are each adapter slot's tokens one block in an activation's flattened order (the MoE dispatcher's)? A
        slot's samples are one block of the micro-batch (base-only samples may be split, but carry no LoRA), so
        they are unless each position interleaves the samples (megatron's [s, b, h] with s > 1 and b > 1)."""
        return self.sample_slots.numel() == 1 or self.token_major(shape) or shape[0] == 1

    def token_slots(self, shape) -> torch.Tensor:
        """The slot of every token of an activation of this micro-batch ([s, b, h] or token-major [b * s, 1, h])
        in its flattened order (the MoE dispatcher's)."""
        if self.token_major(shape):
            return self.sample_slots.repeat_interleave(self.tokens_per_sample(shape))
        return self.sample_slots.repeat(shape[0])

    @contextlib.contextmanager
    def active(self):
        global _active
        previous, _active = _active, self
        try:
            yield self
        finally:
            _active = previous

    def activate(self) -> None:
        global _active
        _active = self

    def bind_to_backward(self, output: torch.Tensor) -> torch.Tensor:
        """Make this routing active while `output`'s backward runs (for activation recompute)."""
        if output.requires_grad:
            def hook(grad):
                self.activate()
                return grad

            output.register_hook(hook)
        return output


def current() -> AdapterRouting | None:
    return _active


def _contiguous_runs(slots: list[int]) -> list[tuple[int, int, int]]:
    runs, seen = [], set()
    for i, s in enumerate(slots):
        if runs and runs[-1][0] == s:
            runs[-1][2] = i + 1
            continue
        if s in seen and s != NO_ADAPTER:
            raise ValueError(f"samples of slot {s} are not contiguous in the micro-batch {slots}: group them by slot")
        seen.add(s)
        runs.append([s, i, i + 1])
    return [tuple(r) for r in runs]
