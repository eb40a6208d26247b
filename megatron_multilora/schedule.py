"""One call into megatron-core's forward/backward schedules (no pipelining or 1F1B) for our micro-batches.

Loss contract of recent Megatron-LM: the loss function returns token-summed losses and token counts, never a
mean inside a micro-batch, so whatever normalisation a caller wants (per tenant) happens once, afterwards.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterable

import torch

from . import model as model_lib
from . import platform

DEVICE_KEYS = ("tokens", "labels", "loss_mask", "loss_weights")  # what the model and the loss compute with


def to_device(batch: dict, device: torch.device) -> dict:
    """The micro-batch's model inputs and loss mask / weights moved to `device`, in place (the data source builds
    them on the host; slot ids and routing stay there: they are read on the host)."""
    for key in DEVICE_KEYS:
        if key in batch:
            batch[key] = batch[key].to(device, non_blocking=True)
    return batch


def token_loss_func(batch: dict, per_token_loss: torch.Tensor):
    """(loss sum, token count, {'lm loss': [NLL sum, count]}): megatron's per-token loss contract. The loss sum
    weighs each token by its `loss_weights` (absent: its `loss_mask`, the plain lm loss); the count is the mask's."""
    loss_mask = batch["loss_mask"]
    loss_sum = (per_token_loss.float() * batch.get("loss_weights", loss_mask)).sum()
    nll_sum = (per_token_loss.detach().float() * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([nll_sum, num_tokens.detach().float()])}


def forward_backward(
    model,
    micro_batches: Iterable[dict],
    *,
    num_micro_batches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
    loss_func: Callable = token_loss_func,
    before_forward: Callable[[dict], None] | None = None,
    after_forward: Callable[[dict, torch.Tensor], torch.Tensor] | None = None,
):
    """Run megatron's schedule over `micro_batches` (dicts with tokens, labels, loss_mask) on this rank's
    model chunk, each micro-batch moved to this rank's device first. `before_forward(batch)` runs right before
    the model sees a micro-batch (e.g. to install its adapter routing); `after_forward(batch, output)` may hook
    the output. Returns the schedule's per micro-batch loss reductions (last pipeline stage only)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = platform.device()

    def forward_step(data_iterator, chunk):
        batch = to_device(next(data_iterator), device)
        if before_forward is not None:
            before_forward(batch)
        output = model_lib.forward_micro_batch(chunk, batch["tokens"], batch["labels"])
        if after_forward is not None:
            output = after_forward(batch, output)
        return output, partial(loss_func, batch)

    first_chunk = model[0] if isinstance(model, list) else model
    if model_lib.token_major(first_chunk.config):  # the pipeline's [s, b, h] messages are [b * s, 1, h]
        seq_length, micro_batch_size = seq_length * micro_batch_size, 1
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=model,
        num_microbatches=num_micro_batches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
