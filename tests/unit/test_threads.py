"""The intra-op threads of a process: --threads wins, then OMP_NUM_THREADS, then the rule from the cores the
process may use, the processes sharing them and the loader workers; a resume at another count says so."""

from __future__ import annotations

import os

import pytest
import torch

from brain_trainer.runtime import Runtime
from brain_trainer.runtime.threads import choose_threads, threads_note, threads_rule, usable_cores


@pytest.mark.parametrize(
    "cores, processes, workers, expected",
    [
        (2, 1, 2, 1),  # the demo on 2 cores: the loader workers take them
        (2, 1, 0, 2),  # no workers: both cores compute
        (16, 1, 2, 14),
        (16, 4, 2, 2),  # four processes share 16 cores, each with two workers
        (16, 8, 4, 1),  # never fewer than one
        (1, 2, 0, 1),
    ],
)
def test_the_rule_gives_each_process_its_share_of_the_cores_less_its_loader_workers(
    cores, processes, workers, expected
):
    assert threads_rule(cores=cores, processes=processes, workers=workers) == expected


def test_the_flag_wins_over_omp_num_threads_which_wins_over_the_rule(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    assert choose_threads(given=3, workers=2, processes=1).count == 3
    assert choose_threads(given=3, workers=2, processes=1).line() == "Threads: 3 per process (--threads)"
    from_env = choose_threads(given=None, workers=2, processes=1)
    assert from_env.count == torch.get_num_threads() and from_env.source == "OMP_NUM_THREADS"
    monkeypatch.delenv("OMP_NUM_THREADS")
    ruled = choose_threads(given=None, workers=0, processes=1)
    assert ruled.count == threads_rule(cores=usable_cores(), processes=1, workers=0)
    assert f"the rule: {usable_cores()} cores / 1 process(es) - 0 loader workers" in ruled.line()


def test_the_cores_are_the_affinity_within_slurms_cpus_per_task(monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert usable_cores() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert usable_cores() == 1


def test_the_runtime_sets_torch_to_the_count_and_gives_the_old_one_back_on_close(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    runtime = Runtime(device=torch.device("cpu"))
    try:
        wanted = 1 if before != 1 else 2
        assert runtime.set_threads(given=wanted, workers=0).count == wanted
        assert torch.get_num_threads() == wanted
    finally:
        runtime.close()
    assert torch.get_num_threads() == before


def test_a_resume_at_another_thread_count_is_one_warning_line_naming_both_and_the_fix():
    assert threads_note(2, 2) is None
    assert threads_note(None, 2) is None, "older checkpoints record no count: nothing to compare"
    note = threads_note(1, 2)
    assert note.startswith("⚠ Threads: the checkpoint was written with 1 per process, this run has 2")
    assert note.endswith("(pass --threads 1 for that)") and "\n" not in note
