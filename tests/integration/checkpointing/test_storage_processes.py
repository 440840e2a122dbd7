"""LocalStorage against a real folder: whole-or-nothing writes, one clear line for a failed write, publishing,
temporaries, the startup probes, and names an attacker planted (never written through)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from checkpoint_helpers import listing, run_worker

from brain_trainer import checkpointing as ck


def test_a_process_killed_mid_write_always_leaves_a_loadable_checkpoint(tmp_path):
    ck.save_checkpoint({"global_step": 0, "w": torch.zeros(4_000_000)}, str(tmp_path / ck.LAST))
    done = run_worker("ckpt_kill_writers.py", "save", tmp_path, 10)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "trials": 10,
        "all_loadable_and_whole": True,
        "left": [ck.LAST],
    }


def test_only_temporaries_whose_writer_is_gone_are_removed(tmp_path):
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()  # reaped: its PID names no process now
        mine = tmp_path / f".{ck.LAST}.tmp-{alive.pid}"
        stale = tmp_path / f".{ck.LAST}.tmp-{dead.pid}"
        own = tmp_path / f".{ck.BEST}.tmp-{os.getpid()}"
        for path in (mine, stale, own):
            path.write_bytes(b"in flight or left by a crash")
        (tmp_path / ck.LAST).write_bytes(b"a finished checkpoint")
        assert ck.LocalStorage(str(tmp_path)).clean_up() == [stale.name]
        assert listing(tmp_path) == sorted([mine.name, own.name, ck.LAST])
    finally:
        alive.kill()
        alive.wait()
