"""Run a function in N fresh processes (gloo, one thread each, a free port) and collect what each returns."""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import time
import traceback

import torch

from megatron_multilora.platform import free_port


def _worker(fn, rank, world_size, port, args, results, timeout):
    import faulthandler

    faulthandler.dump_traceback_later(max(timeout - 20, 10), exit=True)  # a hang shows where it is
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        out = fn(*args)
        # As bytes: a tensor put on the queue as-is is shared through a file descriptor that this process
        # serves, and it may have exited by the time the parent reads it.
        buffer = io.BytesIO()
        torch.save(out, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put((rank, False, traceback.format_exc()))
    finally:
        from megatron_multilora import platform

        platform.destroy()


def run_world(fn, world_size: int, *args, timeout: float = 600.0):
    """fn(*args) on every rank; returns the list of per-rank results, raises the first rank's error."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(fn, r, world_size, port, args, results, timeout), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outs: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outs) < world_size:
            try:
                rank, ok, out = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in outs and p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    what = f"died (exit codes {[procs[r].exitcode for r in dead]})" if dead else "timed out"
                    raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(outs))} did not finish: {what}")
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{out}")
            outs[rank] = torch.load(io.BytesIO(out), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [outs[r] for r in range(world_size)]
