"""The multi-slot LoRA math, in one place.

For the samples (or tokens) of slot k:  y = x W^T + s_k (x A_k^T) B_k^T, with A_k [r_k, in], B_k [out, r_k]
the first r_k rows / columns of the slot's max-rank weights ("sliced to rank"). The product is split in two
autograd functions so tensor parallelism can communicate the small rank-sized middle tensor between them:

    shrink:  x [L, N, in]  --A-->  h packed [L, sum_k n_k r_k]     (one block per segment)
    expand:  h packed      --B-->  y [L, N, out] += the delta      (in place on the base output)

Rows of one slot are contiguous along N ("segments"), so each slot's product is a dense matmul proportional to
its rank; a per-token gather of A/B is ~10x slower (REFERENCE.md section 1). N is the samples of megatron's
[s, b, d] layout (L = s), or, token-major (model.token_major: [b * s, 1, d], taken as [1, T, d]), the tokens.

Runs: adjacent segments of equal size, rank and scale (a mixed batch of N tenants with equal shares is one run)
share ONE batched matmul per product -- torch.bmm over the run's G segments, their rows as [G, L * n, d] and
their slots' weights as [G, r, d] (a view when the slots are evenly spaced) -- so per-op overhead does not
grow with the number of tenants (tools/bench.py case 1: 32 tenants cost 2.8x one tenant with a matmul per
segment). Runs need no padding and no masks, and a run's block of h is its segments' blocks side by side: the
packed layout, which the tensor-parallel `middle` sees, is the same as with one matmul per segment. Segments of
unequal size are runs of one, each a matmul on views.

Expert tokens (`expert_linear`, below) are rows of one [T, in] matrix grouped by (local expert, slot), with no
tensor-parallel middle (the token dispatcher does the experts' communication), so all local experts' segments
of one rank go through ONE grouped GEMM per product (torch's grouped_mm over the jagged rows; on CPU, for small
groups, one bmm over the groups padded to the longest), with the experts' weights stacked per segment. The
experts' frozen base linear is part of the same autograd function: the LoRA is written into its output, and
its input gradient into the base's, with no node, temporary or pass of its own.

Weight gradients are accumulated straight into `param.grad` (as megatron does for main_grad with gradient
accumulation fusion; in training that is a row of lora/grads.GradBuffer): only the touched slots' rows (up to
their rank) are written, so an idle slot costs nothing in backward and keeps an exactly zero gradient.

Cost (tools/bench.py, profiled): the LoRA matmuls are skinny and memory-bound, so every extra pass over a
hidden-sized tensor shows. A slot's scale multiplies the rank-sized products (matmul alpha), never the
hidden-sized output or gradient. A run's rows are a view when they form one matrix per segment (L == 1 -- the
token-major layout, the model's default -- or one segment spanning the micro-batch: then nothing is sliced or
copied), else copied once into [G, L * n, d] (under sequence parallelism; kept for backward; strided views of
one-sample segments made the weight-gradient bmm ~2x slower than the copy; these copies made a 64x64 layer's
8-tenant batch 1.22x its one-tenant batch, 1.02x token-major: tools/bench.py case 1);
products are written straight into the output's rows when those are a view, else through one temporary. The
delta is added into the base linear's output in place (no delta tensor, no add pass: one adapter's step over its
frozen base 1.08 -> 1.04 at d=1024, bench case 9); autograd refuses that on a view, so an output that is one
(megatron's TP reductions return their input) is copied first, and anything that saved the base output for its
backward would fail loudly on the version counter, never silently. Rows no slot targets are the only ones
zero-filled (input gradients); h and the gradients are contiguous (megatron's all-reduce of h silently needs
that).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch


class Segment(NamedTuple):
    """Rows [start, end) along N belong to `slot`, which uses `rank` rows of A and has scale `scale` (a tuple:
    built per micro-batch and layer, hashed as a cache key, so cheap to make and compare)."""

    slot: int
    start: int
    end: int
    rank: int
    scale: float
    dropout: float = 0.0
    weight: int = 0  # expert tokens: which local expert's A / B (an index into expert_linear's LoRA lists)

    @property
    def size(self) -> int:
        return self.end - self.start


class _Run(NamedTuple):
    """`count` adjacent segments of `size` rows each, rows [start, end) along N, all of rank `rank` and scale
    `scale`; their block of the packed h is columns [offset, offset + width). a_index / b_index select the
    slots' rows of A [slots, max_rank, in] / B [slots, out, max_rank] sliced to rank (every slot when the slots
    are not evenly spaced: `even` False, then gathered)."""

    slots: tuple[int, ...]
    start: int
    end: int
    size: int
    count: int
    rank: int
    scale: float
    offset: int
    width: int
    even: bool
    a_index: tuple
    b_index: tuple


def _slot_rows(slots: tuple) -> slice | None:
    """The rows of `slots` as a slice when they are evenly spaced (a view), else None (gather them)."""
    step = slots[1] - slots[0] if len(slots) > 1 else 1
    if step >= 1 and all(b - a == step for a, b in zip(slots, slots[1:])):
        return slice(slots[0], slots[-1] + 1, step)
    return None


def _runs(segments: list[Segment]) -> list[_Run]:
    """Segments in order, adjacent ones of equal size, rank and scale merged into runs."""
    groups: list[list[Segment]] = []
    for s in segments:
        last = groups[-1][-1] if groups else None
        if last is not None and (s.start, s.size, s.rank, s.scale) == (last.end, last.size, last.rank, last.scale):
            groups[-1].append(s)
        else:
            groups.append([s])
    runs, offset = [], 0
    for g in groups:
        first, count, slots = g[0], len(g), tuple(s.slot for s in g)
        rows = _slot_rows(slots)
        even = rows is not None
        rows = rows if even else slice(None)
        width = count * first.size * first.rank
        runs.append(_Run(slots, first.start, first.start + count * first.size, first.size, count, first.rank,
                         first.scale, offset, width, even, (rows, slice(0, first.rank)),
                         (rows, slice(None), slice(0, first.rank))))
        offset += width
    return runs


def _batched(rows: torch.Tensor, count: int, copy: bool = True) -> torch.Tensor | None:
    """[L, G * n, d] (G segments' rows) -> [G, L * n, d] (each segment's rows sequence-major, like its packed h
    block): a view when L == 1 or the rows are one [L * n, d] matrix, else a contiguous copy (None if `copy`
    is False)."""
    seq, m, d = rows.shape
    if seq == 1 and count == 1:  # one segment, L == 1 (token-major): already [1, n, d]
        return rows
    n = m // count
    if seq == 1 or (count == 1 and rows.stride(0) == m * rows.stride(1)):
        return rows.view(count, seq * n, d)
    return rows.view(seq, count, n, d).transpose(0, 1).contiguous().view(count, seq * n, d) if copy else None


def _mm_into(rows: torch.Tensor, count: int, a, b, alpha: float = 1.0, add: bool = False) -> None:
    """rows [L, G * n, d] <- alpha * (a @ b) (`add`: rows += ...) for a, b batched over the G segments
    ([G, L * n, d] product): in place when the rows allow a view, else through one temporary."""
    dest = _batched(rows, count, copy=False)
    if dest is not None:
        dest.baddbmm_(a, b, beta=1 if add else 0, alpha=alpha)
        return
    seq, m, d = rows.shape
    product = rows.new_empty(count, seq * (m // count), d).baddbmm_(a, b, beta=0, alpha=alpha)
    product = product.view(count, seq, -1, d).transpose(0, 1)
    target = rows.view(seq, count, m // count, d)
    target.add_(product) if add else target.copy_(product)


def _cols(t: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """t[:, start:end] (t itself when that is all of it: one op less per run on the common single-run path)."""
    return t if start == 0 and end == t.shape[1] else t[:, start:end]


def _h_rows(h: torch.Tensor, run: _Run) -> torch.Tensor:
    """The run's block of the packed h [L, W] as rows [L, G * n, r]."""
    return _cols(h, run.offset, run.offset + run.width).view(h.shape[0], -1, run.rank)


def _weights(w: torch.Tensor, run: _Run, index: tuple) -> torch.Tensor:
    """w[index] (the run's slots, sliced to rank; `index` is run.a_index or run.b_index): a view when the slots
    are evenly spaced, else a gather of those slots only."""
    if run.even:
        return w[index]
    return w[index].index_select(0, torch.tensor(run.slots, device=w.device))


# On CPU, torch runs a batched matmul into rows that are not one contiguous block (a GradBuffer's rows: slot
# stride = the whole row) as one matmul call per slot; below this many elements per slot's matrix one bmm into a
# temporary plus an add is cheaper (measured: 2x at 16 x 64, even at ~6000 elements, slower above).
_CPU_SMALL_GRAD = 4096


def _grad(param: torch.Tensor) -> torch.Tensor:
    """param.grad, created zero on first use (in training it is a GradBuffer view from the start)."""
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    return param.grad


def _accumulate(param: torch.Tensor, run: _Run, index: tuple, a, b, alpha: float = 1.0) -> None:
    """param.grad[index] += alpha * (a @ b) (batched over the run's slots), in place: one batched matmul into
    those rows, or one index_add_ when the slots are not evenly spaced; nothing else is written."""
    grad = _grad(param)
    if run.even and grad.dtype == a.dtype:
        rows = grad[index]
        if run.count > 1 and not rows.is_contiguous() and rows.is_cpu and rows[0].numel() < _CPU_SMALL_GRAD:
            rows.add_(torch.bmm(a, b), alpha=alpha)
        else:
            rows.baddbmm_(a, b, alpha=alpha)
    else:
        index_t = torch.tensor(run.slots, device=param.device)
        grad[index].index_add_(0, index_t, torch.bmm(a, b).to(grad.dtype), alpha=alpha)


def _zero_uncovered(out: torch.Tensor, runs: list[_Run]) -> None:
    """Zero the rows along N of out [L, N, d] that no run covers (only those rows)."""
    covered = 0
    for run in sorted(runs, key=lambda r: r.start):
        if run.start > covered:
            out[:, covered:run.start].zero_()
        covered = run.end
    if covered < out.shape[1]:
        out[:, covered:].zero_()


class _Shrink(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight_a, runs):
        rows = [_batched(_cols(x, r.start, r.end), r.count) for r in runs]
        weights = [_weights(weight_a, r, r.a_index) for r in runs]
        # The runs' rows are kept (views of x where possible), not x: backward needs no copy.
        ctx.save_for_backward(*rows)
        ctx.runs, ctx.param, ctx.weights, ctx.x_shape = runs, weight_a, weights, x.shape
        h = x.new_empty(x.shape[0], sum(r.width for r in runs))
        for r, xs, a in zip(runs, rows, weights):
            _mm_into(_h_rows(h, r), r.count, xs, a.mT)
        return h

    @staticmethod
    def backward(ctx, grad_h):
        runs = ctx.runs
        grads = [_batched(_h_rows(grad_h, r), r.count) for r in runs]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_h.new_empty(ctx.x_shape)
            _zero_uncovered(grad_x, runs)
            for r, g, a in zip(runs, grads, ctx.weights):
                _mm_into(_cols(grad_x, r.start, r.end), r.count, g, a)
        for r, g, xs in zip(runs, grads, ctx.saved_tensors):
            _accumulate(ctx.param, r, r.a_index, g.mT, xs)
        return grad_x, None, None


class _ExpandAdd(torch.autograd.Function):
    """out += expand(h), in place: the delta is never a tensor of its own (no hidden-sized allocation, no
    extra pass to add it), and out's gradient passes through untouched."""

    @staticmethod
    def forward(ctx, out, h, weight_b, runs, token_major):
        rows = [_batched(_h_rows(h, r), r.count) for r in runs]
        weights = [_weights(weight_b, r, r.b_index) for r in runs]
        ctx.save_for_backward(*rows)
        ctx.runs, ctx.param, ctx.weights, ctx.token_major = runs, weight_b, weights, token_major
        target = out.transpose(0, 1) if token_major else out
        for r, hs, b in zip(runs, rows, weights):
            # the slot's scale on the rank-sized product (matmul alpha), not on the hidden-sized output
            _mm_into(_cols(target, r.start, r.end), r.count, hs, b.mT, r.scale, add=True)
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        runs = ctx.runs
        rows = grad_out.transpose(0, 1) if ctx.token_major else grad_out
        grad_h = grad_out.new_empty(rows.shape[0], sum(r.width for r in runs))
        for r, hs, b in zip(runs, ctx.saved_tensors, ctx.weights):
            gy = _batched(_cols(rows, r.start, r.end), r.count)
            # the slot's scale on the rank-sized products, not on the hidden-sized gradient
            _mm_into(_h_rows(grad_h, r), r.count, gy, b, r.scale)
            _accumulate(ctx.param, r, r.b_index, gy.mT, hs, r.scale)
        return grad_out, grad_h, None, None, None


def _keep_mask(shape, p: float, like: torch.Tensor) -> torch.Tensor:
    """1 where dropout keeps an element (probability 1 - p), else 0."""
    return torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(1.0 - p)


def segment_dropout(x: torch.Tensor, segments: list[Segment], training: bool, shard=None) -> torch.Tensor:
    """Each slot's own LoRA dropout on its rows of x [L, N, d] (the base path never sees it). Masks are drawn
    sample by sample ([N, L, d] order), so the sequence-major and token-major layouts get the same ones.
    `shard` (dim, rank, size): x is this rank's slice along `dim` of an activation split over a tensor-parallel
    group whose ranks share one generator state (as megatron's do outside its model-parallel RNG); every rank
    then draws each mask over the whole activation and keeps its own slice, so the masks are those of one
    process -- a mask drawn over the slice alone would repeat on every rank's slice."""
    if not training or all(s.dropout == 0.0 for s in segments):
        return x
    out = x.clone()
    for s in segments:
        if s.dropout > 0.0:
            rows = x[:, s.start:s.end]
            seq, n, d = rows.shape
            whole = [seq, n, d]
            if shard is not None:
                whole[shard[0]] *= shard[2]
            keep = _keep_mask((whole[1], whole[0], whole[2]), s.dropout, x).transpose(0, 1)
            if shard is not None:
                keep = keep.narrow(shard[0], shard[1] * rows.shape[shard[0]], rows.shape[shard[0]])
            out[:, s.start:s.end] = rows * keep.div_(1.0 - s.dropout)
    return out


def lora_add(out, x, weight_a, weight_b, segments, middle=lambda h: h, training=False, token_major=False,
             dropout_shard=None):
    """out [L, N, out] + the whole LoRA delta of x [L, N, in], added into out in place (weight_a [slots,
    max_rank, in], weight_b [slots, out, max_rank]); rows no segment covers keep out's values. `middle` is the
    tensor-parallel communication of the packed h [L, sum n_k r_k] (identity on one rank). `token_major`: x and
    out are [T, 1, d] with the segments along T (model.token_major), taken as [1, T, d]: every run's rows are
    then a view. `dropout_shard`: how x is a slice of a TP-split activation (segment_dropout; dims of [L, N, in])."""
    runs = _runs(segments)
    if token_major:
        x = x.transpose(0, 1)
    h = _Shrink.apply(segment_dropout(x, segments, training, dropout_shard), weight_a, runs)
    if out._base is not None:  # autograd forbids writing into a view (megatron's reductions return their input)
        out = out.clone()
    return _ExpandAdd.apply(out, middle(h), weight_b, runs, token_major)


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x[order] for a permutation `order` (inverse[order] = arange): a gather both ways, where advanced indexing
    costs ~7x more on CPU forward and scatter-adds into a zero-filled buffer backward."""
    return _Permute.apply(x, order, inverse)


# ---- expert tokens: every local expert's linear, and all their LoRA in one batched GEMM per product -------------
# On CPU torch's grouped_mm is a loop of one matmul per group (~6 us each at a few tokens per (expert, slot));
# below this many elements per group (its padded input and output rows) one bmm over the groups padded to the
# largest is cheaper than that loop, above it the padding's extra passes cost more (measured, tools/bench.py
# case 8: tiny MoE ~8K elements per group, the d=1024 one ~150K). On GPU grouped_mm is one kernel wherever torch
# has it (_ExpertRun.padded).
_CPU_PADDED_GROUP = 32768


class _ExpertRun(NamedTuple):
    """Adjacent segments of expert tokens (rows [start, end) of x [T, in]) of one rank `rank`, of any sizes,
    slots, scales and experts: one batched GEMM per product, either torch's grouped_mm over the jagged rows
    (`offs`: int32 segment ends) or one bmm over the segments padded to `longest` rows (`pos`: each row's place
    in the padded [G * longest] rows; `src`: each padded row's row in the run, 0 for a gap). `scale` is the
    segments' common scale, or their scales per row [n, 1] and per padded segment [G, 1, 1]; `pieces` are
    (expert, slot rows, first, end): consecutive segments of one expert, its weights' rows of those slots (a
    slice, or an index tensor when not evenly spaced) and rows [first, end) of the run's stacked weights."""

    start: int
    end: int
    rank: int
    sizes: tuple
    scale: float | tuple
    pieces: tuple
    longest: int
    offs: torch.Tensor
    pos: torch.Tensor
    src: torch.Tensor
    gaps: torch.Tensor | None  # the padded rows no token fills (None: all segments are equally long)

    def padded(self, x: torch.Tensor, out_features: int, max_rank: int) -> bool:
        """Padded bmm where torch's grouped_mm does not take the input (row strides must be multiples of 16
        bytes; on CUDA it documents bf16 on sm80+ only) or, on CPU, where the groups are small."""
        aligned = all(n * x.element_size() % 16 == 0 for n in (x.shape[1], out_features, self.rank, max_rank))
        if x.device.type == "cpu":
            return not aligned or self.longest * (x.shape[1] + out_features) <= _CPU_PADDED_GROUP
        return not aligned or x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0)


@functools.lru_cache(maxsize=8)  # fc1 and fc2 of a MoE layer usually have the same segments
def _expert_runs(segments: tuple[Segment, ...], device: torch.device) -> tuple[_ExpertRun, ...]:
    groups: list[list[Segment]] = []
    for s in segments:
        last = groups[-1][-1] if groups else None
        if last is not None and (s.start, s.rank) == (last.end, last.rank):
            groups[-1].append(s)
        else:
            groups.append([s])
    runs = []
    for g in groups:
        sizes = [s.size for s in g]
        longest = max(sizes)
        pieces = []
        for i, s in enumerate(g):
            if pieces and pieces[-1][0] == s.weight:
                pieces[-1][1].append(s.slot)
                pieces[-1][3] = i + 1
            else:
                pieces.append([s.weight, [s.slot], i, i + 1])
        pos, src, gaps, offs = _padding(sizes, longest, device)
        scale = g[0].scale
        if any(s.scale != scale for s in g):
            scales = torch.tensor([s.scale for s in g], device=device)
            scale = (torch.repeat_interleave(scales, torch.tensor(sizes, device=device)).unsqueeze(1),
                     scales.view(-1, 1, 1))
        pieces = tuple((e, _slot_index(tuple(slots), device), a, b) for e, slots, a, b in pieces)
        runs.append(_ExpertRun(g[0].start, g[-1].end, g[0].rank, tuple(sizes), scale, pieces, longest, offs, pos,
                               src, gaps))
    return tuple(runs)


def _padding(sizes: list[int], longest: int, device) -> tuple:
    """Index tensors of segments of `sizes` rows padded to `longest` rows each: pos (each row's padded row), src
    (each padded row's row, 0 in a gap), gaps (the padded rows no row fills; None when there are none) and offs
    (int32 segment ends, grouped_mm's). Host arithmetic in numpy, once per run of a micro-batch's MoE layer
    (its fc1 and fc2 share it): a quarter of the time of the dozen tiny torch ops it replaces (in a loop; in the
    layer, where it runs cold, a quarter less than a compact torch version: tools/bench.py case 8, where this
    bookkeeping costs as much as 10% of the LoRA)."""
    sizes_np, column = np.asarray(sizes), np.arange(longest)
    ends = np.cumsum(sizes_np)
    filled = (column < sizes_np[:, None]).ravel()  # [G * longest]: padded row i * longest + j holds a row
    src = np.where(filled, ((ends - sizes_np)[:, None] + column).ravel(), 0)
    pos = np.flatnonzero(filled)
    gaps = None if filled.all() else np.flatnonzero(~filled)
    return tuple(None if a is None else torch.from_numpy(a).to(device)
                 for a in (pos, src, gaps, ends.astype(np.int32)))


def _slot_index(slots: tuple, device) -> slice | torch.Tensor:
    """The rows of `slots`: a slice when they are evenly spaced (a view), else an index tensor (a gather)."""
    rows = _slot_rows(slots)
    return rows if rows is not None else torch.tensor(slots, device=device)


def _stacked(weights: list[torch.Tensor], run: _ExpertRun, rank_dim: int) -> torch.Tensor:
    """The run's segments' weights sliced to rank, stacked [G, ...] in segment order (a view when they are
    evenly spaced slots of one expert, else one small copy): A [G, r, in] (rank_dim 1), B [G, out, r] (2)."""
    parts = []
    for e, rows, _, _ in run.pieces:
        w = weights[e][rows] if isinstance(rows, slice) else weights[e].index_select(0, rows)
        parts.append(_to_rank(w, run.rank, rank_dim))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _to_rank(w: torch.Tensor, rank: int, rank_dim: int) -> torch.Tensor:
    return w if w.shape[rank_dim] == rank else w.narrow(rank_dim, 0, rank)


def _accumulate_stacked(params: list[torch.Tensor], run: _ExpertRun, grads: torch.Tensor, rank_dim: int) -> None:
    """Add the stacked per-segment weight gradients [G, ...] into each expert parameter's .grad rows of those
    slots (up to rank), one foreach add for all experts; nothing else is written."""
    rows_of, sources = [], []
    for e, rows, first, end in run.pieces:
        grad = _grad(params[e])
        src = grads[first:end] if grads.dtype == grad.dtype else grads[first:end].to(grad.dtype)
        if isinstance(rows, slice):
            rows_of.append(_to_rank(grad[rows], run.rank, rank_dim))
            sources.append(src)
        else:
            _to_rank(grad, run.rank, rank_dim).index_add_(0, rows, src)
    if rows_of:
        torch._foreach_add_(rows_of, sources)


def _scaled(t: torch.Tensor, run: _ExpertRun) -> torch.Tensor:
    """The rank-sized t (rows [n, r], or padded [G, longest, r]) times each segment's scale, in t's dtype."""
    if not isinstance(run.scale, tuple):
        return t if run.scale == 1.0 else t * run.scale
    per_row, per_segment = run.scale
    return (t * (per_segment if t.dim() == 3 else per_row)).to(t.dtype)


def _pad(rows: torch.Tensor, run: _ExpertRun) -> torch.Tensor:
    """Rows [n, d] of the run's segments -> [G, longest, d] (one gather), the rows past a segment's end zero. For
    x that makes h's gap rows zero, so the weight gradients (gy^T h, g_h^T x) see nothing of the gradient's gap
    rows -- as long as those are finite: the gradient is padded with zeros too, since 0 * inf is nan and a gap
    filled from another segment's row would carry one tenant's non-finite gradient into the others' (every
    other padded row is dropped by _unpad)."""
    out = rows.index_select(0, run.src)
    if run.gaps is not None:
        out.index_fill_(0, run.gaps, 0)
    return out.view(len(run.sizes), run.longest, -1)


def _bmm_scaled(a: torch.Tensor, b: torch.Tensor, run: _ExpertRun) -> torch.Tensor:
    """a @ b [G, longest, r] times each segment's scale: a common one as the matmul's alpha (no extra pass)."""
    if isinstance(run.scale, tuple):
        return _scaled(torch.bmm(a, b), run)
    out = a.new_empty(a.shape[0], a.shape[1], b.shape[2])
    return out.baddbmm_(a, b, beta=0, alpha=run.scale)


def _unpad(padded: torch.Tensor, run: _ExpertRun) -> torch.Tensor:
    return padded.view(-1, padded.shape[-1]).index_select(0, run.pos)


class _ExpertLinear(torch.autograd.Function):
    """y [T, out]: every local expert's rows of x [T, in] (`counts` rows each, in expert order) times its frozen
    weight^T, plus the scaled LoRA products of every (expert, slot) segment of `runs`, one batched GEMM per
    product for each run, all in ONE autograd node (the LoRA written into y in place, its input gradient into
    the base's). `x_lora` is the LoRA's own input (None: x) when a tenant has dropout. Each run's weights are
    stacked once in forward and kept for backward. Backward writes every expert's LoRA gradients into their
    .grad itself, so the parameters are not inputs of the node (each tensor input costs autograd an edge and an
    AccumulateGrad call, for 2 x experts parameters per call): `anchor`, one of them, is the only one, so
    that autograd runs this backward even when x needs no gradient (the first that requires a gradient: with
    none, there is nothing to train)."""

    @staticmethod
    def forward(ctx, x, x_lora, weights, counts, runs, weights_a, weights_b, anchor=None):
        y = _per_expert_mm(x, weights, counts, transpose=True)
        ctx.weights, ctx.counts, ctx.runs = weights, counts, runs
        if not runs:
            return y
        xl = x if x_lora is None else x_lora
        saved, stacked, padded = [], [], [run.padded(x, y.shape[1], weights_b[0].shape[2]) for run in runs]
        for run, pad in zip(runs, padded):
            a, b = _stacked(weights_a, run, 1), _stacked(weights_b, run, 2)
            xs = _rows(xl, run)
            if pad:  # x and h kept padded for the weight gradients
                xs = _pad(xs, run)
                hs = _bmm_scaled(xs, a.mT, run)
                product = _unpad(torch.bmm(hs, b.mT), run)
            else:
                hs = _scaled(torch.nn.functional.grouped_mm(xs, a.mT, offs=run.offs), run)
                product = torch.nn.functional.grouped_mm(hs, b.mT, offs=run.offs)
            _rows(y, run).add_(product)
            saved += [xs, hs]
            stacked.append((a, b))
        ctx.save_for_backward(*saved)
        ctx.padded, ctx.weights_a, ctx.weights_b, ctx.stacked = padded, weights_a, weights_b, stacked
        ctx.x_shape, ctx.own_input = x.shape, x_lora is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _per_expert_mm(grad_y, ctx.weights, ctx.counts, transpose=False)
        if not ctx.runs:
            return grad_x, None, None, None, None, None, None, None
        grad_lora = grad_x
        if ctx.own_input:
            grad_lora = grad_y.new_zeros(ctx.x_shape) if ctx.needs_input_grad[1] else None
        gmm, saved = torch.nn.functional.grouped_mm, ctx.saved_tensors
        for i, (run, pad, (a, b)) in enumerate(zip(ctx.runs, ctx.padded, ctx.stacked)):
            xs, hs = saved[2 * i], saved[2 * i + 1]
            gy = _rows(grad_y, run)
            if pad:
                gy = _pad(gy, run)
                g_h = _bmm_scaled(gy, b, run)
                grad_b, grad_a = torch.bmm(gy.mT, hs), torch.bmm(g_h.mT, xs)
            else:
                g_h = _scaled(gmm(gy, b, offs=run.offs), run)
                grad_b, grad_a = gmm(gy.t(), hs, offs=run.offs), gmm(g_h.t(), xs, offs=run.offs)
            _accumulate_stacked(ctx.weights_b, run, grad_b, 2)
            _accumulate_stacked(ctx.weights_a, run, grad_a, 1)
            if grad_lora is not None:
                _rows(grad_lora, run).add_(_unpad(torch.bmm(g_h, a), run) if pad else gmm(g_h, a, offs=run.offs))
        return grad_x, grad_lora if ctx.own_input else None, None, None, None, None, None, None


def _per_expert_mm(x: torch.Tensor, weights, counts: list[int], transpose: bool) -> torch.Tensor:
    """Expert e's rows of x times weights[e]^T (`transpose`) or weights[e], into one new [T, *] tensor."""
    out = x.new_empty(x.shape[0], weights[0].shape[0 if transpose else 1])
    start = 0
    for w, n in zip(weights, counts):
        if n:
            torch.mm(x[start:start + n], w.t() if transpose else w, out=out[start:start + n])
        start += n
    return out


def _rows(t: torch.Tensor, run: _ExpertRun) -> torch.Tensor:
    return t if run.start == 0 and run.end == t.shape[0] else t[run.start:run.end]


def expert_linear(x, weights, counts, lora_a=(), lora_b=(), segments=(), training=False):
    """One linear of every local expert over the dispatched tokens x [T, in] (`counts` rows per local expert, in
    expert order; weights[e] [out, in], frozen), with the LoRA of the tokens' segments (token rows of one (local
    expert, slot), sorted; segment.weight indexes lora_a ([slots, max_rank, in] per expert) and lora_b ([slots,
    out, max_rank])) added: one batched GEMM per product for each run of equal rank, however many experts and
    slots it spans (a matmul per (expert, slot) segment made the expert LoRA cost 5.2x the same tokens x rank on
    a dense MLP, tools/bench.py case 8, tiny shape)."""
    if any(w.requires_grad for w in weights):
        raise RuntimeError("the grouped experts compute no base weight gradient: the base must stay frozen")
    if len(counts) != len(weights) or sum(counts) != x.shape[0]:
        raise ValueError(f"rows per expert {counts} do not match {len(weights)} experts and {x.shape[0]} tokens")
    if not segments:  # the frozen linears alone
        return _ExpertLinear.apply(x, None, tuple(weights), counts, (), (), ())
    runs = _expert_runs(tuple(segments), x.device)
    x_lora = None
    if training and any(s.dropout > 0.0 for s in segments):
        x_lora = segment_dropout(x.unsqueeze(0), segments, training)[0]
    anchor = next((p for p in (*lora_a, *lora_b) if p.requires_grad), None)  # (one that trains)
    return _ExpertLinear.apply(x, x_lora, tuple(weights), counts, runs, tuple(lora_a), tuple(lora_b), anchor)
