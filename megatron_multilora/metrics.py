"""Per-tenant and global training metrics to TensorBoard, a JSONL file and the console.

The caller decides which rank writes (``enabled=False`` everywhere else), so nothing here asks
torch.distributed. TensorBoard tags follow Megatron's names, prefixed with the tenant: ``<tenant>/lm loss``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path


class MetricsWriter:
    def __init__(self, tensorboard_dir=None, metrics_file=None, enabled: bool = True, console: bool = True,
                 train_iters: int | None = None):
        self.enabled = enabled
        self.console = console
        self.train_iters = train_iters  # shows progress and ETA on the console when given
        self._tensorboard = None
        self._file = None
        self._start = None  # (monotonic time, iteration) of the first log_train call, for the ETA
        if not enabled:
            return
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(tensorboard_dir))
        if metrics_file is not None:
            path = Path(metrics_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8")  # append: a resumed run continues the same file

    def log_train(self, iteration: int, per_tenant: Mapping[str, Mapping], global_metrics: Mapping,
                  consumed_samples: int | Mapping[str, int] | None = None) -> None:
        """Log one iteration. ``consumed_samples`` adds Megatron's ``<tag> vs samples`` twins: one number for
        every tag, or a dict per tenant (each tenant's own samples; global tags use the sum)."""
        if not self.enabled:
            return
        per_tenant = {name: _numbers(values) for name, values in per_tenant.items()}
        global_metrics = _numbers(global_metrics)
        if isinstance(consumed_samples, Mapping):
            seen, total = consumed_samples.get, sum(consumed_samples.values())
        else:
            seen, total = (lambda name: consumed_samples), consumed_samples

        for name, values in per_tenant.items():
            for tag, value in values.items():
                self._scalar(f"{name}/{tag}", value, iteration, seen(name))
        for tag, value in global_metrics.items():
            self._scalar(tag, value, iteration, total)

        rows = [{"tenant": name, **values, **global_metrics} for name, values in per_tenant.items()]
        for row in rows or [dict(global_metrics)]:  # an iteration without tenants still records the globals
            if consumed_samples is not None:
                row["consumed_samples"] = seen(row["tenant"]) if "tenant" in row else total
            self._write({"iteration": iteration, **row})

        losses = " | ".join(f"{name} lm loss {_fmt(m.get('lm loss'))}" for name, m in per_tenant.items())
        globals_ = " | ".join(f"{tag} {_fmt(value)}" for tag, value in global_metrics.items())
        self._print(" | ".join(part for part in (self._progress(iteration), losses, globals_) if part))

    def log_validation(self, iteration: int, per_tenant: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        per_tenant = _numbers(per_tenant)
        for name, loss in per_tenant.items():
            self._scalar(f"{name}/lm loss validation", loss, iteration)
            self._write({"iteration": iteration, "tenant": name, "lm loss validation": loss})
        losses = " | ".join(f"{name} {_fmt(loss)}" for name, loss in per_tenant.items())
        self._print(f"validation lm loss at iteration {iteration} | {losses}")

    def note(self, line: str) -> None:
        """A console line outside the regular logs (events: tenant joined, skipped step, finished)."""
        if self.enabled:
            self._print(line)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def _scalar(self, tag: str, value, iteration: int, samples: int | None = None) -> None:
        if self._tensorboard is None:
            return
        self._tensorboard.add_scalar(tag, value, iteration)
        if samples is not None:
            self._tensorboard.add_scalar(f"{tag} vs samples", value, samples)

    def _write(self, row: dict) -> None:
        """One JSON object per line; NaN / inf become null so every line stays standard JSON."""
        if self._file is None:
            return
        row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()  # readable while training runs (tail -f, dashboards)

    def _print(self, line: str) -> None:
        if self.console:
            print(f"[{datetime.now():%Y-%m-%d %H:%M:%S}] {line}", flush=True)

    def _progress(self, iteration: int) -> str:
        now = time.monotonic()
        if self._start is None:
            self._start = (now, iteration)
        if not self.train_iters:
            return f"iteration {iteration}"
        text = f"iteration {iteration}/{self.train_iters} ({100 * iteration / self.train_iters:.1f}%"
        started, first = self._start
        if iteration > first:
            eta = (now - started) / (iteration - first) * max(self.train_iters - iteration, 0)
            text += f", ETA {timedelta(seconds=round(eta))}"
        return text + ")"


def _numbers(values: Mapping) -> dict:
    """Plain Python numbers (tensors and numpy scalars unwrapped; ints such as token counts stay ints)."""
    out = {}
    for tag, value in values.items():
        value = value.item() if hasattr(value, "item") else value
        out[tag] = int(value) if isinstance(value, bool) else value
    return out


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
