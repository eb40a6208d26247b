"""Tenants joining and leaving a running job through a control directory (``--tenants-dir DIR``).

The directory is read at every iteration boundary by rank 0 only; the decision is broadcast and every rank
applies it in the same order, so all ranks change their slot tables alike.

* ``DIR/<file>.yaml`` (or ``.yml``): one tenant (fields of TenantConfig; ``name`` defaults to the file's
  stem). A tenant that is not running, not queued and has not finished in this run joins: it takes a free
  slot (it trains from the next iteration on) or waits in the queue. If a checkpoint of it exists under
  ``<load>/tenants/<name>`` or ``<save>/tenants/<name>`` it resumes from there (its adapter shape -- rank,
  alpha, rslora, target modules -- must match; the file's other settings, e.g. a longer ``train_iters``,
  apply). Write files atomically (write ``x.tmp`` then rename to ``x.yaml``); a file that cannot be read or
  validated is reported once (again when it changes) and ignored.
* ``DIR/<name>.stop``: stops tenant ``<name>``: it is saved (with ``--save``) and its slot released; a queued
  tenant leaves the queue. While the ``.stop`` file exists the tenant is not admitted again; deleting the
  ``.stop`` file (with the YAML still there) lets it rejoin, resuming from its checkpoint.
* Deleting a tenant's YAML does NOT stop it (a half-finished copy or move of the directory must not kill a
  tenant); use ``<name>.stop``.

A tenant that reaches its own ``train_iters`` or ``max_epochs`` is evaluated, saved and released; it is not
admitted again in this run (the run's ``finished`` list is part of the run checkpoint). A job with no tenant
running or queued ends, or first waits up to ``--tenants-dir-idle-wait`` seconds for one to join.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from .config import ConfigError, TenantConfig, load_tenant_file, validate_tenant

STOP_SUFFIX = ".stop"

# Test hook (never set in production): kill this process with SIGKILL at a chosen point, so tests can show
# that a run killed there resumes exactly. Values:
#   "iter:N"          after iteration N's metrics are written, before anything else at that boundary;
#   "save:N[:PHASE]"  inside the checkpoint save at iteration N: PHASE "t<i>" = tenant i's shards are in its
#                     temporary directory, not yet promoted (tenants 0..i-1 are complete); "run" = the run
#                     state is in its temporary directory; "pointer" = the run state is promoted but the
#                     latest pointer not yet updated. Default PHASE: "t1".
KILL_ENV = "MULTILORA_TEST_KILL_AT"


def kill_point(kind: str, iteration: int, phase: str | None = None) -> None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] != kind or len(parts) < 2 or int(parts[1]) != iteration:
        return
    if kind == "save" and (parts[2] if len(parts) > 2 else "t1") != phase:
        return
    os.kill(os.getpid(), signal.SIGKILL)


class TenantsDirWatcher:
    """Rank 0's reader of the control directory: turns its contents into a decision (plain data)."""

    def __init__(self, directory: str | Path, run):
        self.directory = Path(directory)
        self.run = run
        self._cache: dict[Path, tuple[tuple, TenantConfig | None, str | None]] = {}
        self._reported: set[tuple] = set()
        self.refused: set[str] = set()  # tenants whose admission failed; retried when their file changes

    def stopped_names(self) -> set[str]:
        """Collective: the tenants with a ``<name>.stop`` file (read by rank 0, the same set on every rank)."""
        from .tenant_checkpoint import on_rank0

        def read():
            return sorted(p.name[: -len(STOP_SUFFIX)] for p in self.directory.iterdir()
                          if p.name.endswith(STOP_SUFFIX) and p.is_file())

        return set(on_rank0(read))

    def data_paths(self) -> dict[str, tuple[str, str | None]]:
        """Collective: tenant name -> (train_data, valid_data) of the directory's usable tenant files (rank 0
        reads; the first file of a name wins, as in decide)."""
        from .tenant_checkpoint import on_rank0

        def read():
            out = {}
            for _path, tenant, _error, _stamp in self._tenant_files(sorted(self.directory.iterdir())):
                if tenant is not None:
                    out.setdefault(tenant.name, (tenant.train_data, tenant.valid_data))
            return out

        return on_rank0(read)

    def _tenant_files(self, entries):
        """(path, TenantConfig or None, error or None, stamp) of each tenant file among ``entries`` (sorted
        paths); a file removed while we look is skipped."""
        for path in entries:
            if path.suffix not in (".yaml", ".yml"):
                continue
            try:
                read = self._read(path)
            except OSError:
                continue
            yield (path, *read)

    def _read(self, path: Path):
        """(TenantConfig or None, error or None), cached while the file's mtime and size stay the same."""
        st = path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._cache.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1], cached[2], stamp
        tenant, error = None, None
        try:
            tenant = load_tenant_file(path, self.run.tenant_defaults)
            validate_tenant(self.run, tenant, f"{path}: tenant")
        except (ConfigError, OSError) as e:
            tenant, error = None, str(e)
        if cached is not None and cached[0] != stamp and cached[1] is not None:
            self.refused.discard(cached[1].name)
        self._cache[path] = (stamp, tenant, error)
        return tenant, error, stamp

    def decide(self, *, active, queued, finished, free_slots: int, queue_allowed: bool) -> dict:
        """{"stop": [names], "add": [tenant dicts], "notes": [lines]} for the current directory. ``active`` and
        ``queued`` map names to the tenants' configs: a file that differs from them is named, not applied."""
        notes: list[str] = []

        def note_once(key, line):
            if key not in self._reported:
                self._reported.add(key)
                notes.append(line)

        try:
            entries = sorted(p for p in self.directory.iterdir() if p.is_file())
        except OSError as e:
            note_once(("dir", str(e)), f"tenants_dir {self.directory}: cannot be read ({e})")
            return {"stop": [], "add": [], "notes": notes}
        stops = {p.name[: -len(STOP_SUFFIX)] for p in entries if p.name.endswith(STOP_SUFFIX)}
        stop = [n for n in sorted(stops) if n in active or n in queued]
        add, seen = [], {}
        room = free_slots + len([n for n in stop if n in active])
        for path, tenant, error, stamp in self._tenant_files(entries):
            if error is not None:
                note_once((str(path), stamp), f"tenants_dir: {path} refused: {error}")
                continue
            name = tenant.name
            if name in seen:
                note_once((str(path), stamp), f"tenants_dir: {path} refused: tenant {name!r} is already defined "
                                              f"by {seen[name]}")
                continue
            seen[name] = path
            running = active.get(name, queued.get(name))
            if running is not None and running != tenant:
                state = "running" if name in active else "queued"
                note_once((str(path), stamp, "differs"), f"tenants_dir: {path}: tenant {name!r} is already {state} "
                          f"with other settings; this file is not applied (stop it with {name}{STOP_SUFFIX}, or "
                          "use a new name)")
            if running is not None or name in finished or name in stops or name in self.refused:
                continue
            if room <= 0 and not queue_allowed:
                note_once((str(path), stamp, "full"), f"tenants_dir: tenant {name!r} waits: no free slot and "
                                                      "queueing is off (lora.queue: false)")
                continue
            room -= 1
            add.append(tenant.to_dict())
        return {"stop": stop, "add": add, "notes": notes}
