"""Shared by the checkpoint and tenant-lifecycle tests: generated tenant data, small run configs, the CLI as a
subprocess (killable), and metrics.jsonl reading."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
WORDS = "the a red big small old new cat dog owl fox bee fish bird sees finds helps likes runs to and".split()
# Per-tenant metrics compared between runs (timing-dependent globals such as iteration-time are not).
COMPARED = ("lm loss", "learning-rate", "grad-norm", "tokens", "skipped", "lm loss validation")


def make_data(directory: Path, name: str, count: int, seed: int) -> Path:
    """``count`` short text samples (byte tokenizer: < 32 bytes each) in ``directory/name.jsonl``."""
    rng = random.Random(seed)
    path = Path(directory) / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(count):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6)))}) + "\n")
    return path


def tenant(directory: Path, name: str, *, rank: int = 4, count: int = 64, seed: int = 0, valid: bool = True,
           **fields) -> dict:
    """A tenant mapping with generated train (and valid) data."""
    t = {"name": name, "rank": rank, "lr": 5.0e-3, "global_batch_size": 4, "lr_warmup_iters": 1,
         "train_data": str(make_data(directory, f"{name}-train", count, seed))}
    if valid:
        t["valid_data"] = str(make_data(directory, f"{name}-valid", 8, seed + 1000))
    t.update(fields)
    return t


def run_config(tenants: list[dict], **fields) -> dict:
    cfg = {
        "model": "tiny-dense", "lora": {"max_slots": 2, "max_rank": 8}, "tenants": tenants,
        "seq_length": 32, "micro_batch_size": 2, "train_iters": 8, "eval_interval": 3, "eval_iters": 1,
        "log_interval": 1, "seed": 7,
    }
    cfg.update(fields)
    return cfg


def write_yaml(path: Path, data: dict) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_cli(config: Path, *flags: str, kill_at: str | None = None, timeout: float = 120.0, while_running=None):
    """``python -m megatron_multilora.train`` (one process) in its own session; returns (returncode, output).
    Whatever it started (megatron-core's checkpoint-writer helpers) is killed with it afterwards.
    ``while_running(proc, output)`` is called once it has started; ``output()`` is its output so far."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.pop("MULTILORA_TEST_KILL_AT", None)
    if kill_at:
        env["MULTILORA_TEST_KILL_AT"] = kill_at
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    import tempfile

    with tempfile.TemporaryFile("w+") as log:
        # output to a file, not a pipe: a helper process surviving the SIGKILL would hold a pipe open
        proc = subprocess.Popen(
            [sys.executable, "-m", "megatron_multilora.train", "--config", str(config), *flags],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        try:
            if while_running is not None:  # (pread: the child shares the file's offset)
                while_running(proc, lambda: os.pread(log.fileno(), 1 << 24, 0).decode(errors="replace"))
            proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the session we created: its leftovers only
            except ProcessLookupError:
                pass
            proc.wait()
        log.seek(0)
        return proc.returncode, log.read()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def per_tenant(rows: list[dict], after: int = 0) -> dict:
    """{(iteration, tenant, kind): {metric: value}} of the rows after iteration ``after`` (kind: train / valid);
    a later row for the same key (a resumed run repeating an iteration) replaces an earlier one."""
    out = {}
    for r in rows:
        if "tenant" not in r or r["iteration"] <= after:
            continue
        kind = "valid" if "lm loss validation" in r else "train"
        out[(r["iteration"], r["tenant"], kind)] = {k: r[k] for k in COMPARED if k in r}
    return out


def signal_when(seen, signum: int, timeout: float = 60.0):
    """A ``while_running`` for run_cli: send ``signum`` to the process's group, as torchrun and Slurm do (its
    helper processes get it too), once ``seen(output so far)`` is true (never, if the process ends first or
    ``timeout`` seconds pass: the caller's assertions then say what happened)."""
    import time

    def act(proc, output):
        deadline = time.monotonic() + timeout
        while not seen(output()):
            if proc.poll() is not None or time.monotonic() > deadline:
                return
            time.sleep(0.05)
        os.killpg(proc.pid, signum)  # (run_cli starts it in a session of its own)

    return act
