"""Shared by the multi-LoRA tests: a tiny GPT with slot-indexed LoRA at some layout, fixed tenants and data,
and the per-slot gradients gathered back to full (unsharded) shape."""

from __future__ import annotations

import torch

SEQ = 16
TENANTS = [  # name, rank, alpha, targets (None = all the pool wraps)
    ("a", 4, 8.0, None),
    ("b", 4, 8.0, None),  # like "a": their adjacent segments form one batched run (lora/ops.py)
    ("c", 16, 32.0, ("linear_qkv", "linear_fc2", "expert_fc1")),
]
MAX_SLOTS, MAX_RANK = 4, 16


def batch(n_samples: int, vocab: int = 320, seed: int = 3):
    """Samples grouped by slot (3 tenants and one base-only sample), with their slots."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n_samples, SEQ), generator=g)
    per = n_samples // 4
    slots = [0] * per + [1] * per + [2] * per + [-1] * (n_samples - 3 * per)
    return tokens, torch.roll(tokens, -1, 1), torch.tensor(slots)


def build(preset: str, layout: dict, base_dir: str | None, targets, seed: int = 5, recompute: bool = False,
          dropout: dict[str, float] | None = None):
    """Model chunk + slot table at `layout`; base weights from base_dir (saved there if it is empty); `dropout`:
    tenant name -> its LoRA dropout."""
    from pathlib import Path

    from megatron_multilora import checkpointing, platform
    from megatron_multilora import model as M
    from megatron_multilora.config import model_config_from
    from megatron_multilora.lora.inject import inject_lora
    from megatron_multilora.lora.slots import LoRASpec, SlotTable, stable_seed

    tp, pp, ep, sp = layout.get("tp", 1), layout.get("pp", 1), layout.get("ep", 1), layout.get("sp", False)
    platform.initialize_model_parallel(platform.ParallelLayout(tp, pp, ep, sp), seed=seed)
    mc = model_config_from(preset)
    cfg = M.transformer_config(
        mc, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
        sequence_parallel=sp, recompute=recompute,
        moe_token_dispatcher_type=layout.get("dispatcher", "allgather"),
    )
    gpt = M.build_gpt_model(mc, cfg)
    if base_dir is not None:
        if (Path(base_dir) / "metadata.json").exists():
            checkpointing.load_base(gpt, base_dir)
        else:
            checkpointing.save_base(gpt, base_dir)
    table = SlotTable(MAX_SLOTS, MAX_RANK, targets, seed=seed)
    inject_lora(gpt, table)
    for name, rank, alpha, t in TENANTS:
        t = None if t is None else tuple(k for k in t if k in targets)
        spec = LoRASpec(rank=rank, alpha=alpha, target_modules=t, dropout=(dropout or {}).get(name, 0.0))
        slot = table.acquire(name, spec)
        for layer in table.layers:  # a nonzero B so that A gets a gradient too
            if layer.lora_kind in table.record(name).targets:
                g = torch.Generator().manual_seed(stable_seed("b", name, layer.global_name))
                layer.set_slot(slot, b=torch.randn(layer.global_shape("b", rank), generator=g) * 0.1)
    return gpt, table


def micro_batches(tokens, labels, slots, table, mbs: int) -> list[dict]:
    """This data-parallel rank's contiguous share of the samples, as routed micro-batches of `mbs`."""
    from megatron.core import parallel_state as ps

    from megatron_multilora.lora.routing import AdapterRouting

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per = len(slots) // dp
    mbs = min(mbs, per)
    sl = slice(dp_rank * per, (dp_rank + 1) * per)
    tokens, labels, slots = tokens[sl], labels[sl], slots[sl]
    return [
        dict(tokens=tokens[i:i + mbs], labels=labels[i:i + mbs], loss_mask=torch.ones(mbs, SEQ),
             routing=AdapterRouting(slots[i:i + mbs], table))
        for i in range(0, per, mbs)
    ]


def gathered_grads(table) -> dict:
    """{(layer global name, 'a'|'b'): full gradient [slots, ...]} of this rank's layers; TP pieces all-gathered."""
    import torch.distributed as dist

    out = {}
    for layer in table.layers:
        for which, p in (("a", layer.lora_A), ("b", layer.lora_B)):
            axis, _, size = layer.shard_info(which)
            g = p.grad.detach().clone()
            if axis is not None:
                pieces = [torch.empty_like(g) for _ in range(size)]
                dist.all_gather(pieces, g, group=layer.lora_tp_group)
                g = torch.stack([layer.unshard(which, [pc[s] for pc in pieces]) for s in range(g.shape[0])])
            out[(layer.global_name, which)] = g
    return out


def merge(per_rank: list[dict]) -> dict:
    full = {}
    for d in per_rank:
        full.update(d)
    return full
