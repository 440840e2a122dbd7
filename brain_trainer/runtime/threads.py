"""How many intra-op threads a process computes with: `--threads` when given, else OMP_NUM_THREADS when set
(torch read it at import), else a rule from the cores this process may use, the training processes that share
them and its loader workers. Oversubscribing a few cores costs far more than an idle one (bench/README.md:
threads), and the thread count changes float sums, so a run records it and a resume with another says so."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


def threads_rule(*, cores: int, processes: int, workers: int) -> int:
    """This process's share of the cores, less one per loader worker (each decodes and crops while the model
    computes), at least one."""
    return max(1, cores // max(1, processes) - workers)


def usable_cores() -> int:
    """The cores this process may run on (its affinity: taskset, cgroups, srun's binding), within SLURM's
    --cpus-per-task when that is set."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return min(cores, int(per_task)) if per_task.isdigit() and int(per_task) > 0 else cores


@dataclass(frozen=True)
class Threads:
    count: int
    source: str  # why this count, for the banner

    def line(self) -> str:
        return f"Threads: {self.count} per process ({self.source})"


def choose_threads(*, given: int | None, workers: int, processes: int) -> Threads:
    """The count and its reason; torch is set to it (OMP_NUM_THREADS: torch already runs with it)."""
    if given is not None:
        return Threads(given, "--threads")
    if os.environ.get("OMP_NUM_THREADS"):
        return Threads(torch.get_num_threads(), "OMP_NUM_THREADS")
    cores = usable_cores()
    count = threads_rule(cores=cores, processes=processes, workers=workers)
    rule = f"{cores} cores / {processes} process(es) - {workers} loader workers, at least 1"
    return Threads(count, f"the rule: {rule}; --threads N to set")


def threads_note(saved: object, count: int) -> str | None:
    """The ⚠ line when the checkpoint was written with another thread count (older files record none)."""
    if not isinstance(saved, int) or isinstance(saved, bool) or saved == count:
        return None
    return (
        f"⚠ Threads: the checkpoint was written with {saved} per process, this run has {count}; float sums "
        f"round differently, so the resume is not bitwise exact (pass --threads {saved} for that)"
    )
