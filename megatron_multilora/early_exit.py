"""Leaving a run early, as Megatron-LM's --exit-interval, --exit-duration-in-mins and --exit-signal-handler do.

The conditions are looked at between iterations only, so the trainer leaves with whole steps behind it and
saves a run checkpoint first: --load then resumes exactly where the job stopped (a scheduler's time limit or
preemption notice costs no work). A signal or a clock seen by one rank ends every rank's run at the same
iteration: the ranks agree through one all-reduce, only when a signal or duration is set.
"""

from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

from . import platform


class EarlyExit:
    """The run's exit conditions; with --exit-signal-handler, the signal's handler while it is open (a `with`
    block: the previous handler is restored on leaving it). A caught signal is only recorded."""

    def __init__(self, run, started: float):
        self.interval, self.minutes, self.started = run.exit_interval, run.exit_duration_in_mins, started
        self.signal = getattr(signal, run.exit_signal) if run.exit_signal_handler else None
        self.saves = bool(run.save)
        self.received = False
        self._previous = None

    def __enter__(self) -> "EarlyExit":
        if self.signal is not None:
            self.received = False
            if self.saves:
                self._spare_checkpoint_writer()
            self._previous = signal.signal(self.signal, self._record)
        return self

    def __exit__(self, *exc) -> None:
        if self.signal is not None:
            signal.signal(self.signal, self._previous)

    def _spare_checkpoint_writer(self) -> None:
        """megatron-core's checkpoint writer keeps a helper process (a multiprocessing manager, spawned at the
        first save) in the rank's process group, which torchrun and Slurm signal as a whole: killed by the
        signal, it fails the save on exit (BrokenPipeError). Started now with the signal ignored -- an ignored
        signal stays ignored across exec -- it lives on. (Its SIGINT it ignores itself.)"""
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        start = getattr(filesystem_async, "_get_write_results_queue", None)  # megatron-core 0.16's
        if start is None:
            return
        previous = signal.signal(self.signal, signal.SIG_IGN)
        try:
            start()
        finally:
            signal.signal(self.signal, previous)

    def _record(self, signum, frame) -> None:
        self.received = True

    def requested(self) -> str | None:
        """A signal arrived or the duration passed, on any rank (the same answer on every rank), or None."""
        if self.signal is None and not self.minutes:
            return None
        minutes = (time.monotonic() - self.started) / 60
        flags = torch.tensor([self.received, bool(self.minutes) and minutes > self.minutes], dtype=torch.int32,
                             device=platform.device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        received, late = flags.tolist()
        if received:
            return f"{self.signal.name} received"
        if late:
            return f"more than --exit-duration-in-mins {self.minutes:g} since the trainer started"
        return None

    def reason(self, iteration: int) -> str | None:
        """Why the run leaves after `iteration` (the same on every rank), or None."""
        if self.interval and iteration % self.interval == 0:
            return f"--exit-interval {self.interval}"
        return self.requested()
