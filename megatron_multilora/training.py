"""The multi-tenant training loop: plan -> forward/backward (megatron schedules) -> gradient sync -> per-slot
optimizer step -> metrics, evaluation, tenant lifecycle.

Every tenant gets exactly the update it would get training alone: micro-batches report token-SUMMED losses per
slot, gradients stay sums through every all-reduce, and the optimizer scales each slot by 1/(its tokens in its
whole global batch) before its own norm, clipping and AdamW step. A tenant that does not step this iteration
is not touched at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import checkpointing, platform
from . import model as model_lib
from .config import RunConfig, TenantConfig
from .data.datasets import TenantDataset
from .data.source import PAD_SLOT, MultiAdapterDataSource
from .data.tokenizer import build_tokenizer
from .lora import grads as grad_lib
from .lora.inject import inject_lora, lora_parameters
from .lora.routing import AdapterRouting
from .lora.slots import LoRASpec, SlotTable
from .metrics import MetricsWriter
from .optim import SlotOptimizer
from .schedule import forward_backward, token_loss_func


@dataclass
class Tenant:
    config: TenantConfig
    slot: int
    valid: TenantDataset | None
    steps: int = 0


def _reduce_sq_norms(sq_norms: dict) -> torch.Tensor:
    """Per-slot squared grad norms summed over the ranks that hold different pieces: TP x PP for dense LoRA,
    expert-TP x EP x PP for expert LoRA (gradients are already identical across data-parallel replicas)."""
    from megatron.core import parallel_state as ps

    total = None
    for group_name, group in (
        ("dense", ps.get_model_parallel_group()),
        ("expert", ps.get_expert_tensor_model_pipeline_parallel_group()),
    ):
        part = sq_norms.get(group_name)
        if part is None:  # every rank issues the same collectives
            part = torch.zeros_like(next(iter(sq_norms.values())))
        part = part.clone()
        dist.all_reduce(part, group=group)
        total = part if total is None else total + part
    return total


class MultiLoRATrainer:
    def __init__(self, run: RunConfig):
        from megatron.core import parallel_state as ps

        self.run = run
        layout = platform.ParallelLayout(
            run.tensor_model_parallel_size, run.pipeline_model_parallel_size,
            run.expert_model_parallel_size, run.sequence_parallel,
        )
        platform.initialize_model_parallel(
            layout, seed=run.seed, timeout_seconds=60 * run.distributed_timeout_minutes,
            backend=run.distributed_backend,
        )
        self.seq_length = run.seq_length or run.model.max_position_embeddings
        config = model_lib.transformer_config(
            run.model,
            tensor_model_parallel_size=run.tensor_model_parallel_size,
            pipeline_model_parallel_size=run.pipeline_model_parallel_size,
            expert_model_parallel_size=run.expert_model_parallel_size,
            sequence_parallel=run.sequence_parallel,
            recompute=run.recompute_activations,
        )
        self.model = model_lib.build_gpt_model(run.model, config)
        if run.load_base:
            checkpointing.load_base(self.model, run.load_base)
        self.table = SlotTable(run.lora.max_slots, run.lora.max_rank, tuple(run.lora.target_modules), seed=run.seed)
        inject_lora(self.model, self.table)
        self.params = [p for _, p in lora_parameters(self.model)]
        self.optimizer = SlotOptimizer(lora_parameters(self.model), run.lora.max_slots,
                                       grad_sq_norm_reduce=_reduce_sq_norms)
        self.tokenizer = build_tokenizer(run.tokenizer)
        if self.tokenizer.vocab_size > run.model.vocab_size:
            raise ValueError(
                f"tokenizer has {self.tokenizer.vocab_size} tokens but the model's vocab_size is {run.model.vocab_size}"
            )
        self.dp_group = ps.get_data_parallel_group()
        self.source = MultiAdapterDataSource(
            seed=run.seed, micro_batch_size=run.micro_batch_size,
            data_parallel_size=ps.get_data_parallel_world_size(), data_parallel_rank=ps.get_data_parallel_rank(),
            max_samples_per_iteration=run.max_samples_per_iteration,
        )
        self.is_last_stage = ps.is_pipeline_last_stage()
        self.tenants: dict[str, Tenant] = {}
        self.queue: list[TenantConfig] = []
        self.finished: list[str] = []
        self.iteration = 0
        self.metrics = MetricsWriter(
            run.tensorboard_dir, run.metrics_file,
            enabled=dist.get_rank() == dist.get_world_size() - 1, train_iters=run.train_iters,
        )
        for tenant in run.tenants:
            self.add_tenant(tenant)

    # ---- tenants ---------------------------------------------------------------------------------------
    def add_tenant(self, tc: TenantConfig) -> int | None:
        """Give the tenant a slot (or queue it when all are taken); returns the slot or None if queued."""
        if not self.table.free_slots:
            if not self.run.lora.queue:
                raise RuntimeError(f"no free slot for tenant {tc.name!r} and queueing is off")
            self.queue.append(tc)
            return None
        spec = LoRASpec(
            rank=tc.rank, alpha=tc.alpha, target_modules=None if tc.target_modules is None else tuple(tc.target_modules),
            dropout=tc.dropout, rslora=tc.rslora, init=tc.init,
        )
        train = TenantDataset(tc.train_data, self.tokenizer, self.seq_length, pack=self.run.pack_sequences)
        valid = TenantDataset(tc.valid_data, self.tokenizer, self.seq_length) if tc.valid_data else None
        slot = self.table.acquire(tc.name, spec)
        self.optimizer.reset_slot(slot)
        self.optimizer.configure_slot(slot, tc.hyper_params(self.run.train_iters))
        self.source.add_tenant(tc.name, train, tc.global_batch_size, tc.max_epochs)
        self.tenants[tc.name] = Tenant(tc, slot, valid)
        return slot

    def release_tenant(self, name: str) -> None:
        """Free the tenant's slot (weights and optimizer state of that slot only) and admit a queued tenant."""
        tenant = self.tenants.pop(name)
        self.source.remove_tenant(name)
        self.table.release(name)
        self.optimizer.reset_slot(tenant.slot)
        self.finished.append(name)
        if self.queue:
            self.add_tenant(self.queue.pop(0))

    def _tenant_done(self, tenant: Tenant) -> bool:
        own = tenant.config.train_iters
        return (own is not None and tenant.steps >= own) or not self.source.is_active(tenant.config.name)

    # ---- one iteration ---------------------------------------------------------------------------------
    def _run_micro_batches(self, micro_batches: list[dict], forward_only: bool):
        """Forward (and backward) over this rank's micro-batches; per-slot loss sums (last stage, else zeros)
        and per-slot token counts, both summed over data-parallel ranks."""
        slots = self.run.lora.max_slots
        loss_sum = torch.zeros(slots, dtype=torch.float64)
        tokens = torch.zeros(slots, dtype=torch.float64)
        for mb in micro_batches:
            mb["routing"] = AdapterRouting(mb["slots"], self.table)
            real = mb["slots"] != PAD_SLOT
            tokens.index_add_(0, mb["slots"][real], mb["loss_mask"].sum(1)[real].double())

        def loss_func(batch, per_token_loss):
            real = batch["slots"] != PAD_SLOT
            per_sample = (per_token_loss.detach().float() * batch["loss_mask"]).sum(1).double()
            loss_sum.index_add_(0, batch["slots"][real], per_sample[real])
            return token_loss_func(batch, per_token_loss)

        if micro_batches:
            forward_backward(
                [self.model], micro_batches, num_micro_batches=len(micro_batches), seq_length=self.seq_length,
                micro_batch_size=self.run.micro_batch_size, forward_only=forward_only, loss_func=loss_func,
                before_forward=lambda b: b["routing"].activate(),
                after_forward=lambda b, out: b["routing"].bind_to_backward(out),
            )
        stats = torch.stack([loss_sum, tokens])
        dist.all_reduce(stats, group=self.dp_group)
        return stats[0], stats[1]

    def train_step(self) -> dict:
        start = time.perf_counter()
        slot_of = {name: t.slot for name, t in self.tenants.items()}
        plan = self.source.next_iteration(slot_of)
        grad_lib.zero_grads(self.params)
        loss_sum, tokens = self._run_micro_batches(plan.micro_batches, forward_only=False)
        grad_lib.sync_grads(self.params)
        active = torch.zeros(self.run.lora.max_slots, dtype=torch.bool)
        for name in plan.tenants:
            active[slot_of[name]] = tokens[slot_of[name]] > 0
        grad_scale = torch.where(active, 1.0 / tokens.clamp_min(1.0), torch.zeros_like(tokens)).float()
        report = self.optimizer.step(grad_scale, active)
        self.iteration += 1
        per_tenant = {}
        for name in plan.tenants:
            tenant, s = self.tenants[name], slot_of[name]
            tenant.steps += int(report.stepped[s])
            per_tenant[name] = {
                "lm loss": (loss_sum[s] / tokens[s]).item() if tokens[s] > 0 else float("nan"),
                "learning-rate": float(report.lr[s]),
                "grad-norm": float(report.grad_norm[s]),
                "tokens": int(tokens[s]),
                "skipped": int(report.skipped[s]),
            }
        elapsed = time.perf_counter() - start
        total_tokens = int(tokens.sum())
        return dict(
            plan=plan, per_tenant=per_tenant,
            global_metrics={"iteration-time": elapsed, "throughput": total_tokens / max(elapsed, 1e-9),
                            "batch-size": sum(plan.samples_per_tenant.values())},
        )

    # ---- evaluation ------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Token-weighted mean validation loss of every tenant with validation data, over the first
        eval_iters x global_batch_size validation samples (the same samples every time)."""
        samples = []
        for name, t in sorted(self.tenants.items(), key=lambda kv: kv[1].slot):
            if t.valid is not None and self.run.eval_iters > 0:
                count = min(len(t.valid), self.run.eval_iters * t.config.global_batch_size)
                samples += [(t.slot, t.valid, i) for i in range(count)]
        if not samples:
            return {}
        self.model.eval()
        with torch.no_grad():
            loss_sum, tokens = self._run_micro_batches(self.source.micro_batches(samples), forward_only=True)
        self.model.train()
        results = {
            name: (loss_sum[t.slot] / tokens[t.slot]).item()
            for name, t in self.tenants.items() if t.valid is not None and tokens[t.slot] > 0
        }
        self.metrics.log_validation(self.iteration, results)
        return results

    # ---- the loop --------------------------------------------------------------------------------------
    def train(self) -> None:
        run = self.run
        while self.iteration < run.train_iters and (self.tenants or self.queue):
            out = self.train_step()
            for name, m in out["per_tenant"].items():
                if m["skipped"]:
                    self.metrics.note(f"tenant {name}: non-finite gradient at iteration {self.iteration}, step skipped")
            if self.iteration % run.log_interval == 0 or self.iteration == 1:
                self.metrics.log_train(self.iteration, out["per_tenant"], out["global_metrics"])
            if run.eval_interval and self.iteration % run.eval_interval == 0:
                self.evaluate()
            for name in [n for n, t in self.tenants.items() if self._tenant_done(t)]:
                self.release_tenant(name)
        if not run.eval_interval or self.iteration % run.eval_interval:
            self.evaluate()

    def close(self) -> None:
        self.metrics.close()
