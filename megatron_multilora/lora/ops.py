"""The multi-slot LoRA math, in one place.

For the samples (or tokens) of slot k:  y = x W^T + s_k (x A_k^T) B_k^T, with A_k [r_k, in], B_k [out, r_k]
the first r_k rows / columns of the slot's max-rank weights ("sliced to rank"). The product is split in two
autograd functions so tensor parallelism can communicate the small rank-sized middle tensor between them:

    shrink:  x [L, N, in]  --A-->  h packed [L, sum_k n_k r_k]     (one block per segment)
    expand:  h packed      --B-->  y [L, N, out]                   (zeros where no slot targets the layer)

Rows of one slot are contiguous along N ("segments"), so each segment is one small dense matmul proportional
to its rank; a per-token gather of A/B is ~10x slower (REFERENCE.md section 1).

Weight gradients are accumulated straight into `param.grad` (as megatron does for main_grad with gradient
accumulation fusion): only the touched slot rows are written, so an idle slot costs nothing in backward and
keeps an exactly zero gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segment:
    """Rows [start, end) along N belong to `slot`, which uses `rank` rows of A and has scale `scale`."""

    slot: int
    start: int
    end: int
    rank: int
    scale: float
    dropout: float = 0.0

    @property
    def size(self) -> int:
        return self.end - self.start


def _accumulate(param: torch.Tensor, index, value: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    param.grad[index] += value.to(param.grad.dtype)


class _Shrink(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight_a, segments):
        ctx.save_for_backward(x, weight_a)
        ctx.segments = segments
        ctx.weight = weight_a
        blocks = [
            (x[:, s.start:s.end] @ weight_a[s.slot, : s.rank].t()).flatten(1) for s in segments
        ]
        return torch.cat(blocks, dim=1)

    @staticmethod
    def backward(ctx, grad_h):
        x, weight_a = ctx.saved_tensors
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        offset = 0
        for s in ctx.segments:
            width = s.size * s.rank
            g = grad_h[:, offset:offset + width].reshape(grad_h.shape[0], s.size, s.rank)
            offset += width
            xs = x[:, s.start:s.end]
            a = weight_a[s.slot, : s.rank]
            if grad_x is not None:
                grad_x[:, s.start:s.end] = g @ a
            _accumulate(ctx.weight, (s.slot, slice(0, s.rank)), torch.einsum("lnr,lni->ri", g, xs))
        return grad_x, None, None


class _Expand(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight_b, segments, n_rows):
        ctx.save_for_backward(h, weight_b)
        ctx.segments = segments
        ctx.weight = weight_b
        out = h.new_zeros(h.shape[0], n_rows, weight_b.shape[1])
        offset = 0
        for s in segments:
            width = s.size * s.rank
            hs = h[:, offset:offset + width].reshape(h.shape[0], s.size, s.rank)
            offset += width
            out[:, s.start:s.end] = (hs @ weight_b[s.slot, :, : s.rank].t()) * s.scale
        return out

    @staticmethod
    def backward(ctx, grad_y):
        h, weight_b = ctx.saved_tensors
        blocks = []
        offset = 0
        for s in ctx.segments:
            width = s.size * s.rank
            hs = h[:, offset:offset + width].reshape(h.shape[0], s.size, s.rank)
            offset += width
            gy = grad_y[:, s.start:s.end] * s.scale
            b = weight_b[s.slot, :, : s.rank]
            blocks.append((gy @ b).flatten(1))
            _accumulate(ctx.weight, (s.slot, slice(None), slice(0, s.rank)), torch.einsum("lno,lnr->or", gy, hs))
        return torch.cat(blocks, dim=1), None, None, None


def shrink(x: torch.Tensor, weight_a: torch.nn.Parameter, segments: list[Segment]) -> torch.Tensor:
    """x [L, N, in] -> packed h [L, sum n_k r_k]. weight_a: [slots, max_rank, in]."""
    return _Shrink.apply(x, weight_a, segments)


def expand(h: torch.Tensor, weight_b: torch.nn.Parameter, segments: list[Segment], n_rows: int) -> torch.Tensor:
    """packed h [L, sum n_k r_k] -> y [L, n_rows, out], scaled per slot. weight_b: [slots, out, max_rank]."""
    return _Expand.apply(h, weight_b, segments, n_rows)


def segment_dropout(x: torch.Tensor, segments: list[Segment], training: bool) -> torch.Tensor:
    """Each slot's own LoRA dropout on its rows of x (the base path never sees it)."""
    if not training or all(s.dropout == 0.0 for s in segments):
        return x
    out = x.clone()
    for s in segments:
        if s.dropout > 0.0:
            out[:, s.start:s.end] = torch.nn.functional.dropout(x[:, s.start:s.end], s.dropout, training=True)
    return out


def lora_delta(x, weight_a, weight_b, segments, middle=lambda h: h, training=False):
    """The whole delta for x [L, N, in]; `middle` is the tensor-parallel communication of h (identity on one
    rank)."""
    h = shrink(segment_dropout(x, segments, training), weight_a, segments)
    return expand(middle(h), weight_b, segments, x.shape[1])
