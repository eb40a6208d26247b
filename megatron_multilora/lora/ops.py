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

Cost (tools/bench.py, profiled): the LoRA matmuls are skinny and memory-bound, so every extra pass over a
hidden-sized tensor shows. A slot's scale multiplies the rank-sized products (matmul alpha), never the
hidden-sized output or gradient; a segment spanning the whole micro-batch is sliced and copied nowhere; rows no
slot targets are the only ones zero-filled; shrink keeps the segments' rows of x (a view when one segment spans
it), so backward copies nothing; outputs and gradients are contiguous (collectives downstream need that).
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


def _accumulate_mm(param: torch.Tensor, index, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """param.grad[index] += alpha * (a @ b), in place (one matmul into the slot's rows, no temporary)."""
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    target = param.grad[index]
    if target.dtype == a.dtype == b.dtype:
        target.addmm_(a, b, alpha=alpha)
    else:
        target.add_(torch.mm(a, b).mul_(alpha).to(target.dtype))


def _spans_all(segments: list[Segment], n_rows: int) -> bool:
    """One segment over every row: the whole tensor is that slot's, no slicing or scattering needed."""
    return len(segments) == 1 and segments[0].start == 0 and segments[0].end == n_rows


def _rows(t: torch.Tensor, s: Segment) -> torch.Tensor:
    """The segment's rows of t [L, N, d] as a [L * n, d] matrix (sequence-major, like the packed h): a view
    when the segment spans all of N, else one copy."""
    return t[:, s.start:s.end].reshape(-1, t.shape[-1])


def _gather_rows(like: torch.Tensor, n_rows: int, width: int, segments: list[Segment], product,
                 dtype=None) -> torch.Tensor:
    """[L, n_rows, width] with each segment's rows set to product(segment) ([L * n, width], sequence-major) and
    the rows of samples no slot targets here set to zero (only those rows are zero-filled)."""
    seq = like.shape[0]
    out = like.new_empty(seq, n_rows, width, dtype=dtype)
    covered = 0
    for s in sorted(segments, key=lambda s: s.start):
        if s.start > covered:
            out[:, covered:s.start].zero_()
        covered = s.end
    if covered < n_rows:
        out[:, covered:].zero_()
    for s in segments:
        out[:, s.start:s.end] = product(s).view(seq, s.size, width)
    return out


def _scaled_mm(block: torch.Tensor, weight_b: torch.Tensor, s: Segment) -> torch.Tensor:
    """s.scale * (h_k B_k^T) for a packed [L, n * r] block: [L * n, out], the scale applied by the matmul (alpha)
    rather than by another pass over the hidden-sized result."""
    h2d = block.reshape(-1, s.rank)
    out = h2d.new_empty(h2d.shape[0], weight_b.shape[1])
    return out.addmm_(h2d, weight_b[s.slot, :, : s.rank].t(), beta=0, alpha=s.scale)


class _Shrink(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight_a, segments):
        seq = x.shape[0]
        rows = [_rows(x, s) for s in segments]
        # The segments' rows are kept (a view of x when one segment spans it), not x: backward needs no copy.
        ctx.save_for_backward(*rows)
        ctx.segments = segments
        ctx.weight = weight_a
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        blocks = [(xs @ weight_a[s.slot, : s.rank].t()).view(seq, -1) for s, xs in zip(segments, rows)]
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)

    @staticmethod
    def backward(ctx, grad_h):
        rows = ctx.saved_tensors
        weight_a, segments = ctx.weight, ctx.segments
        seq, n_rows, width_in = ctx.x_shape
        blocks, offset = [], 0
        for s in segments:
            width = s.size * s.rank
            blocks.append(grad_h[:, offset:offset + width])
            offset += width
        grad_x = None
        if ctx.needs_input_grad[0]:
            if _spans_all(segments, n_rows):
                s = segments[0]
                grad_x = (blocks[0].reshape(-1, s.rank) @ weight_a[s.slot, : s.rank]).view(seq, n_rows, width_in)
            else:
                by_start = {s.start: g for s, g in zip(segments, blocks)}
                grad_x = _gather_rows(
                    grad_h, n_rows, width_in, segments,
                    lambda s: by_start[s.start].reshape(-1, s.rank) @ weight_a[s.slot, : s.rank], ctx.x_dtype,
                )
        for s, g, xs in zip(segments, blocks, rows):
            _accumulate_mm(weight_a, (s.slot, slice(0, s.rank)), g.reshape(-1, s.rank).t(), xs)
        return grad_x, None, None


class _Expand(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight_b, segments, n_rows):
        ctx.save_for_backward(h)
        ctx.segments = segments
        ctx.weight = weight_b
        seq, width_out = h.shape[0], weight_b.shape[1]
        if _spans_all(segments, n_rows):
            return _scaled_mm(h, weight_b, segments[0]).view(seq, n_rows, width_out)
        blocks, offset = {}, 0
        for s in segments:
            width = s.size * s.rank
            blocks[s.start] = h[:, offset:offset + width]
            offset += width
        return _gather_rows(h, n_rows, width_out, segments, lambda s: _scaled_mm(blocks[s.start], weight_b, s))

    @staticmethod
    def backward(ctx, grad_y):
        (h,) = ctx.saved_tensors
        weight_b = ctx.weight
        blocks = []
        offset = 0
        for s in ctx.segments:
            width = s.size * s.rank
            hs = h[:, offset:offset + width].reshape(-1, s.rank)
            offset += width
            gy = _rows(grad_y, s)
            b = weight_b[s.slot, :, : s.rank]
            # the slot's scale on the rank-sized products, not on the hidden-sized gradient
            blocks.append(torch.mm(gy, b).mul_(s.scale).view(h.shape[0], width))
            _accumulate_mm(weight_b, (s.slot, slice(None), slice(0, s.rank)), gy.t(), hs, s.scale)
        return (blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)), None, None, None


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
