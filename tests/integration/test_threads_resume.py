"""A run records its intra-op thread count in the checkpoint, prints it in the banner, and a resume at another
count says in one ⚠ line that it is not bitwise exact (float sums round differently at another count)."""

from __future__ import annotations

import pytest
from helpers import load, run_args

from brain_trainer import checkpointing as ck
from brain_trainer import train as cli

pytestmark = pytest.mark.slow


def test_a_resume_at_another_thread_count_says_so_once_and_records_the_new_count(sample_root, trained, capsys):
    saved = load(trained / "ckpt" / ck.LAST)["run"]["threads"]
    assert isinstance(saved, int) and saved >= 1
    other = saved + 1
    capsys.readouterr()
    status = cli.main(run_args(sample_root, trained, "--epochs", "2", "--resume", "auto", "--threads", str(other)))
    out = capsys.readouterr().out
    assert status == 0, out
    assert out.count(f"Threads: {other} per process (--threads)") == 1
    assert (
        out.count(
            f"⚠ Threads: the checkpoint was written with {saved} per process, this run has {other}; float sums "
            f"round differently, so the resume is not bitwise exact (pass --threads {saved} for that)"
        )
        == 1
    )
    assert load(trained / "ckpt" / ck.LAST)["run"]["threads"] == other
