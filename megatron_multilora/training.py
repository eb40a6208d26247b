"""The multi-tenant training loop: plan -> forward/backward (megatron schedules) -> gradient sync -> per-slot
optimizer step -> metrics, evaluation, tenant lifecycle.

Every tenant gets exactly the update it would get training alone: micro-batches report token-SUMMED losses per
slot, gradients stay sums through every all-reduce, and the optimizer scales each slot by 1/(its tokens in its
whole global batch) before its own norm, clipping and AdamW step. A tenant that does not step this iteration
is not touched at all.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpointing, platform
from . import model as model_lib
from . import tenant_checkpoint as ckpt
from .config import (ConfigError, RunConfig, TenantConfig, base_identity, field_changes, tenant_from_dict,
                     tokenizer_change, tokenizer_identity)
from .data.datasets import DataError, TenantDataset
from .data.source import PAD_SLOT, MultiAdapterDataSource
from .data.tokenizer import build_tokenizer
from .early_exit import EarlyExit
from .lora import grads as grad_lib
from .lora.inject import inject_lora, lora_parameters
from .lora.routing import AdapterRouting
from .lifecycle import TenantsDirWatcher, kill_point
from .lora.slots import LoRASpec, SlotError, SlotTable, check_tenant_name
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


def _check_same_adapter(tc: TenantConfig, saved: dict, where) -> None:
    """A tenant resuming from a checkpoint under a (possibly edited) config keeps its adapter's shape."""
    diffs = field_changes(saved, {"rank": tc.rank, "alpha": float(tc.alpha), "rslora": tc.rslora,
                                  "targets": sorted(tc.target_modules or saved["targets"])})
    if diffs:
        raise ckpt.CheckpointError(f"tenant {tc.name!r}: its config does not match its checkpoint {where}: "
                                   + ", ".join(diffs) + " (use a new name to train a different adapter)")


def _check_same_tokenizer(name: str, saved: dict, mine: dict, where) -> None:
    """A tenant's checkpoint goes on with the tokenizer it trained with (another gives its data other token
    ids); one that does not record it (import-peft's, older ones) is taken as it is."""
    change = tokenizer_change(saved.get("tokenizer"), mine)
    if change is not None:
        raise ckpt.CheckpointError(f"tenant {name!r}: its checkpoint {where} {change}")


@dataclass
class TenantScope:
    """One tenant scoped for evaluation (see MultiLoRATrainer.scoped)."""

    trainer: "MultiLoRATrainer"
    name: str
    slot: int
    valid: TenantDataset | None

    eval_count: int | None = None  # default sample count: eval_iters x global batch size

    def evaluate(self, dataset=None, count: int | None = None) -> float:
        """Loss over ``dataset`` (default: the tenant's validation data, the samples evaluate() uses)."""
        if dataset is None:
            if self.valid is None:
                raise ValueError(f"tenant {self.name!r} has no validation data")
            dataset, count = self.valid, self.eval_count if count is None else count
        return self.trainer.scoped_loss(self.slot, dataset, count)


IDLE_POLL_SECONDS = 1.0  # how often an idle job looks at its control directory


class MultiLoRATrainer:
    def __init__(self, run: RunConfig):
        from megatron.core import parallel_state as ps

        self.run = run
        self._exit = EarlyExit(run, started=time.monotonic())  # (its clock: --exit-duration-in-mins)
        self._stopped_waiting: str | None = None  # why an idle wait ended early (an exit condition)
        self.seq_length = run.seq_length  # resolved: the model's max_position_embeddings when unset
        self.tokenizer = build_tokenizer(run.tokenizer)
        self._tokenizer_identity = tokenizer_identity(run)  # (recorded in run checkpoints: a resume must match)
        if self.tokenizer.vocab_size > run.model.vocab_size:
            raise ValueError(
                f"tokenizer has {self.tokenizer.vocab_size} tokens but the model's vocab_size is {run.model.vocab_size}"
            )
        # The config file's tenants' data is read first: a bad file fails before any process group or model
        # exists. (The control directory's tenants are read when they start.)
        self._preloaded: dict[tuple[str, bool], TenantDataset] = {}
        self._noted_files: set[tuple[str, bool]] = set()
        for tc in run.tenants:
            for path, pack in ((tc.train_data, run.pack_sequences), (tc.valid_data, False)):
                if path is not None:
                    self._preloaded[(path, pack)] = TenantDataset(path, self.tokenizer, self.seq_length, pack=pack)
        platform.initialize_model_parallel(
            run.parallel_layout(), seed=run.seed, timeout_seconds=60 * run.distributed_timeout_minutes,
            backend=run.distributed_backend,
        )
        config = model_lib.transformer_config(
            run.model,
            tensor_model_parallel_size=run.tensor_model_parallel_size,
            pipeline_model_parallel_size=run.pipeline_model_parallel_size,
            expert_model_parallel_size=run.expert_model_parallel_size,
            sequence_parallel=run.sequence_parallel,
            recompute=run.recompute_activations,
            moe_token_dispatcher_type=run.moe_token_dispatcher_type,
        )
        self.model = model_lib.build_gpt_model(run.model, config)
        if run.load_base:
            checkpointing.load_base(self.model, run.load_base)
        self.table = SlotTable(run.lora.max_slots, run.lora.max_rank, tuple(run.lora.target_modules), seed=run.seed)
        inject_lora(self.model, self.table)
        self.params = [p for _, p in lora_parameters(self.model)]
        self.grads = grad_lib.GradBuffer(self.params)
        self.optimizer = SlotOptimizer(lora_parameters(self.model), run.lora.max_slots,
                                       grad_sq_norm_reduce=_reduce_sq_norms, grad_sq_norms=self.grads.sq_norms)
        self.dp_group = ps.get_data_parallel_group()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.source = MultiAdapterDataSource(
            seed=run.seed, micro_batch_size=run.micro_batch_size,
            data_parallel_size=ps.get_data_parallel_world_size(), data_parallel_rank=ps.get_data_parallel_rank(),
            max_samples_per_iteration=run.max_samples_per_iteration,
        )
        self.tenants: dict[str, Tenant] = {}
        self.queue: list[TenantConfig] = []
        self.finished: list[str] = []
        self.iteration = 0
        self._slots_with_grads: set[int] | None = None  # None: every gradient row may be stale
        self.metrics = MetricsWriter(
            run.tensorboard_dir, run.metrics_file,
            enabled=dist.get_rank() == dist.get_world_size() - 1, train_iters=run.train_iters,
        )
        if not run.byte_tokenizer:  # (said: by default the one a --load-base ships)
            self.metrics.note(f"tokenizer: {self.tokenizer.describe()}")
        self._param_names = {id(p): n for n, p in lora_parameters(self.model)}
        self.run_id = ckpt.broadcast_object(uuid.uuid4().hex)  # names this run's lineage in its checkpoints
        self._saved_iteration: int | None = None  # newest run checkpoint written or loaded
        self._tenant_saves: dict[str, dict] = {}  # name -> the meta (iteration, steps, spec, ...) it last saved
        self._last_eval_iteration: int | None = None
        self._watcher = TenantsDirWatcher(run.tenants_dir, run) if run.tenants_dir else None
        resumed = bool(run.load) and self.load_checkpoint(run.load)
        if run.save:  # (validation refuses this up front; a program may build a trainer without it)
            ckpt.on_rank0(self._check_own_pointer)
        if not resumed:
            stopped = self._watcher.stopped_names() if self._watcher else set()
            for tenant in run.tenants:
                if tenant.name in stopped:
                    self.metrics.note(f"tenant {tenant.name}: not started ({tenant.name}.stop in {run.tenants_dir})")
                else:
                    self.add_tenant(tenant)
        self._preloaded.clear()  # (queued, stopped or finished tenants read theirs when they start)

    # ---- tenants ---------------------------------------------------------------------------------------
    def add_tenant(self, tc: TenantConfig, *, slot: int | None = None, resume: bool = True) -> int | None:
        """Give the tenant a slot (or queue it when all are taken); returns the slot, or None if queued (or
        finished at once). With ``resume`` (default) a tenant with a checkpoint under <load or save>/tenants/<name>
        continues from it; one whose checkpoint already did its train_iters / max_epochs is finished."""
        check_tenant_name(tc.name)
        if tc.name in self.tenants or any(q.name == tc.name for q in self.queue):
            raise SlotError(f"tenant {tc.name!r} is already running or queued")
        if not self.table.free_slots:
            if not self.run.lora.queue:
                raise RuntimeError(f"no free slot for tenant {tc.name!r} and queueing is off")
            self.queue.append(tc)
            return None
        found = self.find_tenant_checkpoint(tc.name) if resume else None
        slot = self._acquire(tc, slot, found)
        if found is not None and self._tenant_done(self.tenants[tc.name]):  # (a job that died before its save)
            self.metrics.note(f"tenant {tc.name}: its checkpoint {found} has done its train_iters / max_epochs "
                              f"({self.tenants[tc.name].steps} steps): finished without training")
            self.release_tenant(tc.name)
            return None
        self._note_short_schedule(self.tenants[tc.name])
        return slot

    def _acquire(self, tc: TenantConfig | None, slot: int | None, checkpoint=None, *, saved_spec: bool = False,
                 verified: bool = False, data_paths: dict | None = None):
        """Take a slot for a tenant, fresh or from ``checkpoint`` (its directory); ``saved_spec``: train with the
        spec stored in the checkpoint (exact resume) instead of ``tc``, its data read where ``data_paths`` (name ->
        (train_data, valid_data)) now lists it."""
        common = ckpt.load_common(checkpoint, verify=not verified)["tenant"] if checkpoint is not None else None
        if saved_spec:
            tc = self._moved_data(tenant_from_dict(dict(common["spec"]), f"checkpoint {checkpoint}: tenant"),
                                  data_paths or {})
        elif common is not None:
            _check_same_adapter(tc, common, checkpoint)
        if common is not None:
            _check_same_tokenizer(tc.name, common, self._tokenizer_identity, checkpoint)
        if common is not None and not saved_spec:  # (a run's resume says its base change once, for all)
            self._note_other_base(tc.name, common.get("base"), checkpoint)
        spec = LoRASpec(
            rank=tc.rank, alpha=tc.alpha, dropout=tc.dropout, rslora=tc.rslora, init=tc.init,
            target_modules=None if tc.target_modules is None else tuple(tc.target_modules),
        )
        train = self._dataset(tc.train_data, pack=self.run.pack_sequences)
        valid = self._dataset(tc.valid_data) if tc.valid_data else None
        slot = self.table.acquire(tc.name, spec, slot)
        self._tenant_saves.pop(tc.name, None)  # (what is in the slot now has not been saved by this process)
        self.optimizer.reset_slot(slot)
        try:
            self.optimizer.configure_slot(slot, tc.hyper_params(self.run.train_iters))
            steps, data_state = 0, None
            if common is not None:
                self._load_tenant_tensors(tc.name, slot, checkpoint, common)
                steps, data_state = common["steps"], common["data"]
            self.source.add_tenant(tc.name, train, tc.global_batch_size, tc.max_epochs, state=data_state,
                                   seed=self.run.seed_of(tc))
        except BaseException:
            self.table.release(tc.name)
            self.optimizer.reset_slot(slot)
            raise
        self.tenants[tc.name] = Tenant(tc, slot, valid, steps)
        if common is not None:
            self.metrics.note(f"tenant {tc.name}: resumed from {checkpoint} ({steps} steps) into slot {slot}")
        return slot

    def _note_other_base(self, name: str, saved: dict | None, checkpoint) -> None:
        """A tenant checkpoint trained on another base than this run's goes on against other weights (a run's own
        resume on another base is refused at validation; a tenant joining may mean it, e.g. a base's new release):
        said, with what differs. Checkpoints that do not record it (import-peft's, older ones) are taken as they are."""
        mine = base_identity(self.run)
        if saved is None or saved == mine:
            return
        changes = field_changes(saved.get("model", {}), mine["model"]) + field_changes(
            {k: v for k, v in saved.items() if k != "model"}, {k: v for k, v in mine.items() if k != "model"})
        self.metrics.note(f"tenant {name}: its checkpoint {checkpoint} records another base than this run's "
                          f"({', '.join(changes) or 'recorded differently'}): unless they are the same weights, it "
                          "goes on against other ones")

    def _note_short_schedule(self, tenant: Tenant) -> None:
        """A decaying learning rate that would stop short of min_lr, said with the fix: a tenant decaying over the
        run's train_iters counted in ITS steps cannot take them all when it joins mid-run, nor one whose data
        (max_epochs) runs out first. (Iterations it sits out under max_samples_per_iteration shorten it too.)"""
        tc, steps = tenant.config, tenant.steps
        decay = None if tc.lr_decay_style == "constant" else tc.decay_iters(self.run.train_iters)
        if decay is None or tc.min_lr >= tc.lr:  # (no decay, nothing to decay, or an unvalidated run's)
            return
        run_left = None if self.run.train_iters is None else self.run.train_iters - self.iteration
        data_left = self.source.steps_left(tc.name)
        own_left = None if tc.train_iters is None else tc.train_iters - steps
        if data_left is not None and steps + data_left < decay and all(
                other is None or data_left < other for other in (run_left, own_left)):
            fit = steps + data_left
            fix = (f"set its lr_decay_iters to {fit} to fit" if fit > tc.lr_warmup_iters else
                   f"it ends within its lr_warmup_iters {tc.lr_warmup_iters}: lower them or raise max_epochs")
            self.metrics.note(f"tenant {tc.name}: its learning rate decays over {decay} of its own steps; with "
                              f"{steps} done its data (max_epochs {tc.max_epochs}) lasts {data_left} more, ending "
                              f"above min_lr ({fix})")
        elif tc.decays_over_run and run_left is not None and steps + run_left < decay:
            self.metrics.note(f"tenant {tc.name}: its learning rate decays over the run's train_iters "
                              f"({self.run.train_iters}) of its own steps; at iteration {self.iteration} with "
                              f"{steps} done it can take {run_left} more, ending above min_lr (set its train_iters or "
                              f"lr_decay_iters to fit)")

    def _moved_data(self, saved: TenantConfig, data_paths: dict) -> TenantConfig:
        """A tenant resumed with its checkpoint's spec reads its data where its config (the config file's, or its
        control file's) now lists it: data directories move; the position in them comes from the checkpoint."""
        now = data_paths.get(saved.name)
        if now is None or now == (saved.train_data, saved.valid_data):
            return saved
        self.metrics.note(f"tenant {saved.name}: data read where its config now lists it: " + ", ".join(
            f"{k} {new} (was {old})" for k, new, old in zip(("train_data", "valid_data"), now,
                                                            (saved.train_data, saved.valid_data)) if new != old))
        return replace(saved, train_data=now[0], valid_data=now[1])

    def release_tenant(self, name: str, *, finished: bool = True) -> None:
        """Free the tenant's slot (weights and optimizer state of that slot only) and admit a queued tenant.
        ``finished=False`` (a stopped tenant): it may join again later."""
        if name not in self.tenants:
            state = "queued (stop_tenant drops it from the queue)" if any(q.name == name for q in self.queue) \
                else "not running"
            raise SlotError(f"tenant {name!r} holds no slot: it is {state}")
        tenant = self.tenants.pop(name)
        self.source.remove_tenant(name)
        self.table.release(name)
        self.optimizer.reset_slot(tenant.slot)
        if finished:
            self.finished.append(name)
        while self.queue and self.table.free_slots:
            queued = self.queue.pop(0)
            try:
                self.add_tenant(queued)
            except (ckpt.CheckpointError, ConfigError, DataError, SlotError, ValueError) as e:
                self.metrics.note(f"tenant {queued.name}: cannot leave the queue: {e}")
            else:
                if queued.name in self.tenants:  # (else finished at once: its checkpoint was complete)
                    self.metrics.note(f"tenant {queued.name}: left the queue for slot "
                                      f"{self.tenants[queued.name].slot} at iteration {self.iteration}")

    def _tenant_done(self, tenant: Tenant) -> bool:
        own = tenant.config.train_iters
        return (own is not None and tenant.steps >= own) or not self.source.is_active(tenant.config.name)

    # ---- one iteration ---------------------------------------------------------------------------------
    def _run_micro_batches(self, micro_batches: list[dict], forward_only: bool):
        """Forward (and backward) over this rank's micro-batches; per-slot loss sums and token counts, summed
        over data-parallel ranks (the losses, computed on the last stage, are shared with every stage)."""
        slots, device = self.run.lora.max_slots, platform.device()  # the stats are reduced where NCCL can
        loss_sum = torch.zeros(slots, dtype=torch.float64, device=device)
        tokens = torch.zeros(slots, dtype=torch.float64)
        for mb in micro_batches:
            mb["routing"] = AdapterRouting(mb["slots"], self.table)
            real = mb["slots"] != PAD_SLOT
            tokens.index_add_(0, mb["slots"][real], mb["loss_mask"].sum(1)[real].double())

        def loss_func(batch, per_token_loss):  # batch: moved to the device by forward_backward
            real = batch["slots"] != PAD_SLOT
            per_sample = (per_token_loss.detach().float() * batch["loss_mask"]).sum(1).double()
            loss_sum.index_add_(0, batch["slots"][real].to(device), per_sample[real.to(device)])
            return token_loss_func(batch, per_token_loss)

        if micro_batches:
            forward_backward(
                [self.model], micro_batches, num_micro_batches=len(micro_batches), seq_length=self.seq_length,
                micro_batch_size=self.run.micro_batch_size, forward_only=forward_only, loss_func=loss_func,
                before_forward=lambda b: b["routing"].activate(),
                after_forward=lambda b, out: b["routing"].bind_to_backward(out),
            )
        stats = torch.stack([loss_sum, tokens.to(device)])
        dist.all_reduce(stats, group=self.dp_group)
        dist.all_reduce(stats[0], group=self.pp_group)  # losses live on the last stage: every rank knows them
        stats = stats.cpu()  # the step's one host read of them
        return stats[0], stats[1]

    def train_step(self) -> dict:
        start = time.perf_counter()
        slot_of = {name: t.slot for name, t in self.tenants.items()}
        plan = self.source.next_iteration(slot_of)
        # Only the slots routed in the previous step can hold a nonzero gradient (every rank plans alike).
        self.grads.zero(self._slots_with_grads)
        self._slots_with_grads = set(slot_of[name] for name in plan.tenants)
        loss_sum, tokens = self._run_micro_batches(plan.micro_batches, forward_only=False)
        self.grads.sync(self._slots_with_grads)
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
            lr = float(report.lr[s]) if active[s] else self.optimizer.slot_lr(s)  # no loss token: no step
            per_tenant[name] = {
                "lm loss": (loss_sum[s] / tokens[s]).item() if tokens[s] > 0 else float("nan"),
                "learning-rate": lr,
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

    def _dataset(self, path: str, pack: bool = False) -> TenantDataset:
        """A tenant data file as a dataset: the one read at start, once, else read now. What the dataset notes
        (samples cut to fit seq_length -- those left with no loss count in batches and train nothing --, packed
        prompts) is said once per file."""
        found = self._preloaded.pop((path, pack), None)
        dataset = found if found is not None else TenantDataset(path, self.tokenizer, self.seq_length, pack=pack)
        if (path, pack) not in self._noted_files:
            self._noted_files.add((path, pack))
            for sentence in dataset.notes():
                self.metrics.note(sentence)
        return dataset

    # ---- evaluation ------------------------------------------------------------------------------------
    def evaluate(self, tenants: list[str] | None = None) -> dict[str, float]:
        """Token-weighted mean validation loss of every tenant (or of ``tenants``) with validation data, over
        the first eval_iters x global_batch_size validation samples (the same samples every time)."""
        if tenants is None:
            self._last_eval_iteration = self.iteration
        samples = []
        for name, t in sorted(self.tenants.items(), key=lambda kv: kv[1].slot):
            if t.valid is not None and self.run.eval_iters > 0 and (tenants is None or name in tenants):
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
            for name, t in self.tenants.items()
            if t.valid is not None and tokens[t.slot] > 0 and (tenants is None or name in tenants)
        }
        self.metrics.log_validation(self.iteration, results)
        return results

    # ---- the loop --------------------------------------------------------------------------------------
    @property
    def saved_iteration(self) -> int | None:
        """The iteration of the newest run checkpoint this trainer wrote or loaded (None: none yet)."""
        return self._saved_iteration

    def train(self) -> str | None:
        """Train until the run's train_iters (or until no tenant is left and none joins within
        tenants_dir_idle_wait); evaluate and save at the end. An exit condition (--exit-interval, ...) met
        before that ends the run after the iteration, with a run checkpoint saved (with --save) and no final
        evaluation, or ends an idle wait: returns why, else None."""
        run = self.run
        if self.iteration >= run.train_iters:
            self.metrics.note(f"the run is at iteration {self.iteration} already (train_iters {run.train_iters}): "
                              "nothing to train; raise --train-iters to go on")
        self._stopped_waiting = None
        if run.load and not run.save:
            self.metrics.note(f"--load without --save: what this run trains after {run.load} will not be saved")
        if not run.save and (run.exit_interval or run.exit_duration_in_mins or run.exit_signal_handler):
            self.metrics.note("no --save: leaving early (--exit-*) will save nothing")
        with self._exit:  # (a signal during the final save is only recorded too: the job ends after it anyway)
            while self.iteration < run.train_iters and self.train_iteration():
                reason = self._exit.reason(self.iteration) if self.iteration < run.train_iters else None
                if reason:
                    self._save_unless_saved()
                    self.metrics.note(f"leaving at iteration {self.iteration}: {reason}; " + (
                        f"--load {run.save} resumes here" if run.save else "nothing saved (no --save)"))
                    return reason
            if not run.eval_interval or self.iteration % run.eval_interval:
                self.evaluate()
            self._save_unless_saved()
        return self._stopped_waiting

    def _save_unless_saved(self) -> None:
        """A run checkpoint of this iteration (with --save), unless one was written or loaded at it already, or
        nothing was trained (a job that ends at iteration 0 leaves --save as it was: the same command runs again,
        rather than being told to resume a checkpoint of nothing)."""
        if self.run.save and self._saved_iteration != self.iteration:
            if self.iteration == 0:
                self.metrics.note(f"nothing trained: no run checkpoint written to {self.run.save}")
            else:
                self.save_checkpoint()

    def train_iteration(self) -> bool:
        """One iteration boundary to the next: tenants join / stop (control directory), one training step,
        logging, evaluation, finished tenants leave, periodic save. False when no tenant is left to train."""
        run = self.run
        self.poll_tenants_dir()
        if not self.tenants and not self._wait_for_tenants():
            return False
        out = self.train_step()
        for name, m in out["per_tenant"].items():
            if m["skipped"]:
                self.metrics.note(f"tenant {name}: non-finite gradient at iteration {self.iteration}, step skipped")
        if self.iteration % run.log_interval == 0 or self.iteration == 1:
            self.metrics.log_train(self.iteration, out["per_tenant"], out["global_metrics"])
        if run.eval_interval and self.iteration % run.eval_interval == 0:
            self.evaluate()
        kill_point("iter", self.iteration)  # test hook, only with MULTILORA_TEST_KILL_AT set
        for name in [n for n, t in self.tenants.items() if self._tenant_done(t)]:
            self.finish_tenant(name)
        if run.save and run.save_interval and self.iteration % run.save_interval == 0:
            self.save_checkpoint()
        return True

    def _wait_for_tenants(self) -> bool:
        """An idle job with a control directory waits up to tenants_dir_idle_wait seconds for a tenant to join.
        Rank 0 keeps the clock and every rank polls in step, so all ranks end the wait together."""
        wait = self.run.tenants_dir_idle_wait
        if self._watcher is None or not wait:
            if self._watcher is not None:
                self.metrics.note(f"no tenant running or queued at iteration {self.iteration}: ending (no "
                                  f"--tenants-dir-idle-wait to wait for one to join through {self.run.tenants_dir})")
            return False
        self.metrics.note(f"no tenant running or queued at iteration {self.iteration}: waiting up to {wait:g} s "
                          f"for one to join through {self.run.tenants_dir}")
        deadline = time.monotonic() + wait
        while not self.tenants:
            remaining = ckpt.broadcast_object(deadline - time.monotonic() if dist.get_rank() == 0 else None)
            if remaining <= 0:
                return False
            self._stopped_waiting = self._exit.requested()
            if self._stopped_waiting:  # an idle job holds no tenant state: it ends as at the end of its wait
                self.metrics.note(f"stopped waiting: {self._stopped_waiting}")
                return False
            time.sleep(min(IDLE_POLL_SECONDS, remaining))
            self.poll_tenants_dir()
        return True

    # ---- tenant lifecycle ------------------------------------------------------------------------------
    def finish_tenant(self, name: str) -> None:
        """A tenant that reached its train_iters / max_epochs: evaluated, saved (with --save) and released."""
        if self._last_eval_iteration != self.iteration:
            self.evaluate(tenants=[name])
        where = self.save_tenant(name, done=True) if self.run.save else None
        self.metrics.note(f"tenant {name}: finished at iteration {self.iteration} after "
                          f"{self.tenants[name].steps} steps" + (f", saved to {where}" if where else ""))
        self.release_tenant(name)

    def stop_tenant(self, name: str) -> None:
        """Stop a running tenant (saved with --save, slot released; it may join again) or drop a queued one."""
        if name in self.tenants:
            where = self.save_tenant(name) if self.run.save else None
            self.release_tenant(name, finished=False)
            self.metrics.note(f"tenant {name}: stopped at iteration {self.iteration}"
                              + (f", saved to {where}" if where else " (not saved: no --save)"))
        else:
            self.queue = [q for q in self.queue if q.name != name]
            self.metrics.note(f"tenant {name}: removed from the queue")

    def poll_tenants_dir(self) -> dict:
        """Apply the control directory (see megatron_multilora/lifecycle.py): rank 0 reads it, every rank
        applies the same decision. Returns the decision."""
        if self._watcher is None:
            return {}
        decision = None
        if dist.get_rank() == 0:
            decision = self._watcher.decide(
                active={n: t.config for n, t in self.tenants.items()}, queued={q.name: q for q in self.queue},
                finished=set(self.finished),
                free_slots=len(self.table.free_slots), queue_allowed=self.run.lora.queue,
            )
        decision = ckpt.broadcast_object(decision)
        for line in decision["notes"]:
            self.metrics.note(line)
        for name in decision["stop"]:
            self.stop_tenant(name)
        for data in decision["add"]:
            tc = tenant_from_dict(data, f"tenants_dir tenant {data.get('name')!r}")
            try:
                slot = self.add_tenant(tc)
            except (ckpt.CheckpointError, ConfigError, DataError, SlotError, ValueError, RuntimeError) as e:
                self._watcher.refused.add(tc.name)
                self.metrics.note(f"tenants_dir: tenant {tc.name!r} refused: {e}")
                continue
            if tc.name not in self.finished:
                self.metrics.note(f"tenant {tc.name}: joined at iteration {self.iteration}, "
                                  + ("queued (no free slot)" if slot is None else f"slot {slot}"))
        return decision

    @contextlib.contextmanager
    def scoped(self, tenant: str | TenantConfig):
        """Scope one tenant for evaluation: yields a :class:`TenantScope` whose samples all go to its slot.
        A tenant that is not running is loaded from its newest checkpoint (or, given as a TenantConfig without
        one, freshly initialised) into a free slot for the duration and released on exit; only that slot is
        touched, and the scoped tenant never trains."""
        name = tenant if isinstance(tenant, str) else tenant.name
        if name in self.tenants:
            t = self.tenants[name]
            yield TenantScope(self, name, t.slot, t.valid, self.run.eval_iters * t.config.global_batch_size)
            return
        found = self.find_tenant_checkpoint(name)
        if found is None and not isinstance(tenant, TenantConfig):
            raise ckpt.CheckpointError(f"tenant {name!r} is not running and has no checkpoint to scope")
        common = ckpt.load_common(found)["tenant"] if found is not None else None
        tc = tenant_from_dict(dict(common["spec"]), f"checkpoint {found}") if common is not None else tenant
        spec = LoRASpec(rank=tc.rank, alpha=tc.alpha, target_modules=None if tc.target_modules is None else
                        tuple(tc.target_modules), dropout=tc.dropout, rslora=tc.rslora, init=tc.init)
        slot = self.table.acquire(name, spec)
        try:
            if common is not None:
                self._load_tenant_tensors(name, slot, found, common, optimizer=False)
            valid = self._dataset(tc.valid_data) if tc.valid_data else None
            yield TenantScope(self, name, slot, valid, self.run.eval_iters * tc.global_batch_size)
        finally:
            self.table.release(name)

    def scoped_loss(self, slot: int, dataset, count: int | None = None) -> float:
        """Token-weighted loss of the first ``count`` samples of ``dataset``, all routed to ``slot``."""
        count = len(dataset) if count is None else min(count, len(dataset))
        self.model.eval()
        with torch.no_grad():
            loss_sum, tokens = self._run_micro_batches(
                self.source.micro_batches([(slot, dataset, i) for i in range(count)]), forward_only=True)
        self.model.train()
        return (loss_sum[slot] / tokens[slot]).item() if tokens[slot] > 0 else float("nan")

    # ---- checkpoints -----------------------------------------------------------------------------------
    def _tenant_meta(self, name: str, done: bool) -> dict:
        t = self.tenants[name]
        record = self.table.record(name)
        has_master = any(p.dtype != torch.float32 for p in self.params)  # the optimizer keeps fp32 masters
        return {
            "format": ckpt.FORMAT, "name": name, "iteration": self.iteration, "run_id": self.run_id,
            "spec": t.config.to_dict(), "rank": record.spec.rank, "alpha": float(t.config.alpha),
            "rslora": t.config.rslora, "targets": sorted(record.targets), "steps": t.steps,
            "optimizer_step": self.optimizer.slot_step_count(t.slot), "data": self.source.tenant_state(name),
            "done": done, "has_master": has_master, "tokenizer": self._tokenizer_identity,
            "base": base_identity(self.run),
        }

    def save_tenant(self, name: str, *, done: bool = False, kill_phase: str | None = None):
        """Collective: write <save>/tenants/<name>/iter_XXXXXXX (adapter at its rank, optimizer moments and
        step, data position, spec) and point its latest_checkpointed_iteration.txt there."""
        import yaml

        root = ckpt.tenant_root(self.run.save, name)
        meta = self._tenant_meta(name, done)
        if self._tenant_saves.get(name) == meta:
            # written by this process with the same state (no step since: the periodic save, then a stop), and
            # rewriting would swap out the checkpoint the run's latest pointer names
            return root / ckpt.iter_name(self.iteration)
        t = self.tenants[name]
        record = self.table.record(name)
        entries = ckpt.adapter_entries(self.table, record, self._param_names)
        sharded = ckpt.adapter_sharded_state_dict(entries, t.slot, record.spec.rank, self.optimizer,
                                                  with_master=meta["has_master"])
        sharded["tenant"] = meta
        hook = (lambda: kill_point("save", self.iteration, kill_phase)) if kill_phase else None
        where = ckpt.save_sharded(root, self.iteration, sharded,
                                  {**{k: meta[k] for k in ("name", "iteration", "run_id", "done")},
                                   "saved_at": time.time()},
                                  extra_files={ckpt.SPEC_FILE: yaml.safe_dump(meta["spec"], sort_keys=False)},
                                  before_promote=hook)
        self._tenant_saves[name] = meta
        if kill_phase is None:  # a lone tenant save (finished / stopped): prune now
            self._prune(root, tenant=True)
        return where

    def _load_tenant_tensors(self, name: str, slot: int, directory, common: dict, optimizer: bool = True) -> None:
        record = self.table.record(name)
        entries = ckpt.adapter_entries(self.table, record, self._param_names)
        # (an fp32 run takes a checkpoint's fp32 masters as its weights, evaluating too; a run that keeps masters
        # loads them with its optimizer state)
        with_master = common.get("has_master", False) and (optimizer or all(p.dtype == torch.float32
                                                                             for p in self.params))
        sharded = ckpt.adapter_sharded_state_dict(entries, slot, record.spec.rank,
                                                  self.optimizer if optimizer else None, for_load=True,
                                                  with_master=with_master)
        loaded = ckpt.load_sharded(directory, sharded, strict="raise_all" if optimizer else "raise_unexpected",
                                   verify=False)  # load_common just verified it
        ckpt.apply_adapter_state(loaded, entries, slot, record.spec.rank, self.optimizer if optimizer else None,
                                 step=common["optimizer_step"], with_master=with_master)

    def find_tenant_checkpoint(self, name: str):
        """The most recently saved complete checkpoint of tenant ``name`` under <load> and <save> (None if none;
        iteration numbers do not order checkpoints of different runs or directories). One that does not record
        when it was saved (its file's time changes with a copy) ranks, in its directory, below those that do
        unless the directory's pointer names it. Skips checkpoints this run's own lineage wrote at a later
        iteration (left by an attempt that crashed after the run checkpoint it resumed from)."""
        roots = [d for d in dict.fromkeys((self.run.load, self.run.save)) if d]

        def find():
            newest, key = None, None
            for save_dir in roots:
                root = ckpt.tenant_root(save_dir, name)
                ckpt.recover(root)
                try:
                    latest = ckpt.read_tracker(root)
                except ckpt.CheckpointError:  # a damaged pointer: the checkpoints' own times decide
                    latest = None
                candidates = []
                for it in ckpt.complete_iterations(root):
                    meta = ckpt.read_manifest(root / ckpt.iter_name(it)).get("meta", {})
                    if it > self.iteration and meta.get("run_id") == self.run_id:
                        continue
                    # (a checkpoint without saved_at, e.g. written by an older import-peft: its manifest's time,
                    # which a copy changes -- so it ranks below those that record theirs, unless the pointer names it)
                    recorded = meta.get("saved_at")
                    saved_at = recorded or (root / ckpt.iter_name(it) / ckpt.MANIFEST).stat().st_mtime
                    candidates.append((recorded is not None or it == latest, saved_at, it))
                if candidates:
                    _, saved_at, it = max(candidates)
                    if key is None or (saved_at, it) > key:
                        newest, key = str(root / ckpt.iter_name(it)), (saved_at, it)
            return newest

        found = ckpt.on_rank0(find)
        return None if found is None else Path(found)

    def _run_state(self) -> dict:
        data = self.source.state_dict()
        return {
            "format": ckpt.FORMAT, "run_id": self.run_id, "iteration": self.iteration,
            "tenants": {n: {"slot": t.slot, "iteration": self.iteration} for n, t in self.tenants.items()},
            "queue": [q.to_dict() for q in self.queue], "finished": list(self.finished),
            "data": {"iteration": data["iteration"], "last_step": data["last_step"]},
            "layout": self._layout(), "train_iters": self.run.train_iters,
        }

    def _layout(self) -> dict:
        r = self.run
        return {"tp": r.tensor_model_parallel_size, "pp": r.pipeline_model_parallel_size,
                "ep": r.expert_model_parallel_size, "world": dist.get_world_size()}

    def save_checkpoint(self) -> None:
        """Collective: every running tenant's checkpoint, then the run state, then the run's latest pointer
        (<save>/latest_checkpointed_iteration.txt); old checkpoints beyond keep_last_checkpoints are pruned."""
        save, it = self.run.save, self.iteration
        if not save:
            raise ValueError("save_checkpoint needs a save directory (--save)")
        ckpt.on_rank0(self._check_own_pointer)
        ckpt.on_rank0(self._record_run_id)
        by_slot = sorted(self.tenants, key=lambda n: self.tenants[n].slot)
        for i, name in enumerate(by_slot):
            self.save_tenant(name, kill_phase=f"t{i}")
        state = self._run_state()
        root = ckpt.run_root(save)
        ckpt.save_sharded(root, it, {"run": state, "rng_state": ckpt.rng_sharded_object(ckpt.rng_state())},
                          {"iteration": it, "run_id": self.run_id, "base": base_identity(self.run),
                           "tokenizer": self._tokenizer_identity},
                          before_promote=lambda: kill_point("save", it, "run"), tracker=False)
        kill_point("save", it, "pointer")
        ckpt.on_rank0(ckpt.write_tracker, Path(save).resolve(), it)
        self._saved_iteration = it
        self._prune(root)
        for name in by_slot:
            self._prune(ckpt.tenant_root(save, name), tenant=True)
        self.metrics.note(f"saved checkpoint at iteration {it} to {save}")

    def _check_own_pointer(self) -> None:
        """<save>'s run pointer names no checkpoint, or one of this run's lineage: a run never moves another
        run's pointer or writes among its iterations (validation refuses that up front; this guards programs
        that build a trainer themselves)."""
        save = Path(self.run.save).resolve()
        it = ckpt.latest_run_iteration(save)
        if it is not None:
            ckpt.check_same_run(ckpt.run_root(save) / ckpt.iter_name(it), self.run_id)

    def _record_run_id(self) -> None:
        """<save>/run/run_id.txt names this run before its first tenant checkpoint is written (ckpt.saved_run_id)."""
        if ckpt.saved_run_id(self.run.save) != self.run_id:
            ckpt.run_root(self.run.save).mkdir(parents=True, exist_ok=True)
            ckpt.write_text_atomic(ckpt.run_root(self.run.save) / ckpt.RUN_ID_FILE, self.run_id + "\n")

    def _prune(self, root, tenant: bool = False) -> None:
        """Old checkpoints of ``root`` beyond keep_last_checkpoints; a tenant root keeps every iteration a kept
        run checkpoint resumes from (a tenant's stop / finish saves add iterations to its root alone)."""
        keep, protect = self.run.keep_last_checkpoints, {self._saved_iteration} - {None}

        def prune():
            kept_runs = ckpt.complete_iterations(ckpt.run_root(self.run.save)) if tenant else []
            return ckpt.prune(root, keep, protect | set(kept_runs))

        ckpt.on_rank0(prune)

    def load_checkpoint(self, directory) -> bool:
        """Collective: restore the whole run from <directory> (the iteration its latest_checkpointed_iteration.txt
        names, or its newest complete one if the pointer was not written: ckpt.latest_run_iteration): iteration,
        every tenant into its slot (weights, optimizer, data position), the queue, finished tenants, and the
        RNG states (when the layout is the same). False if the directory holds no run checkpoint yet."""
        base = Path(directory).resolve()
        it = ckpt.on_rank0(ckpt.latest_run_iteration, base)
        if it is None:
            began = ckpt.on_rank0(ckpt.saved_run_id, base)
            if began is not None:  # stopped during its first save: restarted as itself, so what it left is skipped
                self.run_id = began
                self.metrics.note(f"no complete checkpoint in {directory}: run {began} was stopped during its first "
                                  "save; starting it again from iteration 0 (tenant checkpoints that save left are "
                                  "not resumed)")
            else:
                self.metrics.note(f"no run checkpoint in {directory}: starting from iteration 0")
            return False
        run_dir = ckpt.run_root(base) / ckpt.iter_name(it)
        common = ckpt.load_common(run_dir)
        state = common["run"]
        tenant_dirs = {name: ckpt.tenant_root(base, name) / ckpt.iter_name(info["iteration"])
                       for name, info in state["tenants"].items()}

        def verify():  # before anything changes
            for directory in tenant_dirs.values():
                ckpt.recover(directory.parent)
                ckpt.verify_checkpoint(directory)

        ckpt.on_rank0(verify)
        queue = [tenant_from_dict(d, "checkpoint queue") for d in state["queue"]]
        self._check_pool_holds(run_dir, state["tenants"], tenant_dirs, queue)
        self.queue = []  # (releasing must not admit queued tenants)
        for name in list(self.tenants):
            self.release_tenant(name, finished=False)
        self.run_id, self.iteration = state["run_id"], state["iteration"]
        self.finished = list(state["finished"])
        data_paths = self._watcher.data_paths() if self._watcher else {}  # (the config file's tenants win)
        data_paths.update({t.name: (t.train_data, t.valid_data) for t in self.run.tenants})
        for name, info in sorted(state["tenants"].items(), key=lambda kv: kv[1]["slot"]):
            self._acquire(None, info["slot"], tenant_dirs[name], saved_spec=True, verified=True,
                          data_paths=data_paths)
        self.queue = [self._moved_data(q, data_paths) for q in queue]
        self.source.load_state_dict({
            "iteration": state["data"]["iteration"], "last_step": state["data"]["last_step"],
            "tenants": {n: self.source.tenant_state(n) for n in state["data"]["last_step"]},
        })
        known = set(self.tenants) | {q.name for q in self.queue} | set(self.finished)
        known |= self._watcher.stopped_names() if self._watcher else set()
        for tc in self.run.tenants:  # tenants added to the config since
            if tc.name not in known:
                self.add_tenant(tc)
            elif tc.name in self.tenants:  # resumed exactly, with its checkpoint's spec: say what is not applied
                self._note_unapplied(tc, self.tenants[tc.name].config)
            elif tc.name in self.finished:  # (its settings: its last checkpoint's)
                saved = ckpt.on_rank0(self._saved_tenant_config, base, tc.name)
                if saved is not None:
                    self._note_unapplied(tc, saved, "finished before the checkpoint and is not trained again")
            else:  # queued (with the config it had when it was queued)
                queued = next((q for q in self.queue if q.name == tc.name), None)
                if queued is not None:
                    self._note_unapplied(tc, queued)
        for name in sorted((set(self.tenants) | {q.name for q in self.queue}) - set(data_paths)):
            self.metrics.note(f"tenant {name}: resumed from the checkpoint though neither the config nor a control "
                              f"file lists it now (a resume restores every tenant; {name}.stop in a --tenants-dir "
                              "stops one)")
        self._note_schedule_change(state.get("train_iters"))
        self._note_base_or_tokenizer_change(run_dir)
        if state["layout"] == self._layout():
            loaded = ckpt.load_sharded(run_dir, {"rng_state": ckpt.rng_sharded_object()},
                                       strict="assume_ok_unexpected", verify=False)
            ckpt.set_rng_state(loaded["rng_state"])
        else:
            self.metrics.note(f"layout changed since the checkpoint ({state['layout']} -> {self._layout()}): "
                              "RNG states not restored")
        self._saved_iteration = self.iteration
        self.metrics.note(f"resumed from {run_dir} at iteration {self.iteration} with tenants "
                          f"{sorted(self.tenants)}, queue {[q.name for q in self.queue]}")
        return True

    def _check_pool_holds(self, run_dir, tenants: dict, tenant_dirs: dict, queue: list[TenantConfig]) -> None:
        """The checkpoint's running and queued tenants fit this run's LoRA pool (slots, max_rank,
        target_modules): named before anything changes (a queued one would be dropped when it leaves the queue)."""
        pool, problems = self.run.lora, []
        top = max((info["slot"] for info in tenants.values()), default=-1)
        if top >= pool.max_slots:
            problems.append(f"its tenants run in slots up to {top} but lora.max_slots is {pool.max_slots} "
                            f"(use >= {top + 1})")
        for name in sorted(tenants):
            meta = ckpt.load_common(tenant_dirs[name], verify=False)["tenant"]
            if meta["rank"] > pool.max_rank:
                problems.append(f"tenant {name!r} has rank {meta['rank']} > lora.max_rank {pool.max_rank}")
            missing = sorted(set(meta["targets"]) - set(pool.target_modules))
            if missing:
                problems.append(f"tenant {name!r} adapts {missing}, not in lora.target_modules")
        for q in queue:
            if q.rank > pool.max_rank:
                problems.append(f"queued tenant {q.name!r} has rank {q.rank} > lora.max_rank {pool.max_rank}")
            missing = sorted(set(q.target_modules or ()) - set(pool.target_modules))
            if missing:
                problems.append(f"queued tenant {q.name!r} adapts {missing}, not in lora.target_modules")
        if problems:
            raise ckpt.CheckpointError(f"cannot resume {run_dir}: " + "; ".join(problems))

    def _note_base_or_tokenizer_change(self, run_dir) -> None:
        """Validation refuses a resume on another model or random base, or with another tokenizer; a saved base at
        another directory may be a copy of the same one, or another with the same shapes (a base vs an instruct
        model): said. So is the tokenizer of a checkpoint that does not record its own (older versions, which took
        the byte-level one unless given --tokenizer; a --load-base's tokenizer.json is now the default)."""
        meta = ckpt.on_rank0(lambda: ckpt.read_manifest(run_dir).get("meta", {}))
        saved, mine = meta.get("base"), base_identity(self.run)["load_base"]
        if saved is not None and mine is not None and saved["load_base"] != mine:
            self.metrics.note(f"the tenants were trained on {saved['load_base'] or 'a random base'}; this run loads "
                              f"the base in {mine}: it must be the same weights")
        if meta.get("tokenizer") is None and not self.run.byte_tokenizer:
            self.metrics.note(f"{run_dir} does not record its tokenizer (an older version's); this run tokenizes with "
                              f"{self._tokenizer_identity['file']}: if it trained with the byte-level one (that "
                              f"version's default), resume with --tokenizer byte")

    def _note_schedule_change(self, saved_train_iters: int | None) -> None:
        """A tenant without its own train_iters / lr_decay_iters decays its learning rate over the run's
        train_iters: a resume with another --train-iters moves its schedule (Megatron-LM refuses that unless told;
        here it is allowed, and said)."""
        if saved_train_iters in (None, self.run.train_iters):
            return
        moved = sorted(n for n, t in self.tenants.items() if t.config.decays_over_run and t.steps)  # (0: not begun)
        if moved:
            self.metrics.note(f"train_iters {saved_train_iters} -> {self.run.train_iters}: the learning-rate decay of "
                              f"{moved} follows the new length from here (set lr_decay_iters to keep a schedule)")

    def _note_unapplied(self, tc: TenantConfig, saved: TenantConfig,
                        state: str = "resumed with its checkpoint's settings") -> None:
        """A run resumes each tenant exactly, with the spec its checkpoint holds (a queued one: the config it was
        queued with; as a running tenant keeps its own when its control file changes; a finished one is not
        trained again): the log names the config's edits, which are not applied."""
        changes = field_changes(saved.to_dict(), tc.to_dict())
        if changes:
            self.metrics.note(f"tenant {tc.name!r}: {state}; the config's changes are not applied: "
                              f"{', '.join(changes)} (a new tenant name trains with new settings)")

    @staticmethod
    def _saved_tenant_config(save, name: str) -> TenantConfig | None:
        """The settings in the checkpoint tenant ``name``'s pointer names under ``save`` (None if unreadable)."""
        import yaml

        root = ckpt.tenant_root(save, name)
        try:
            it = ckpt.read_tracker(root)
            text = (root / ckpt.iter_name(it) / ckpt.SPEC_FILE).read_text() if it is not None else None
            return None if text is None else tenant_from_dict(yaml.safe_load(text), f"checkpoint of {name!r}")
        except (ckpt.CheckpointError, ConfigError, OSError, yaml.YAMLError):
            return None

    def close(self) -> None:
        self.metrics.close()
