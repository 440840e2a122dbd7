"""The CheckpointWriter: a snapshot at the step boundary, the persist behind it (write once, publish the other
names, rotate), failures reported, and SIGKILL at any instant of a background persist."""

from __future__ import annotations

import json

import torch
from checkpoint_helpers import run_worker

from brain_trainer import checkpointing as ck


def test_sigkill_during_background_persists_always_leaves_loadable_whole_checkpoints(tmp_path):
    for name in (ck.LAST, ck.BEST):
        ck.save_checkpoint({"global_step": 0, "w": torch.zeros(1_000_000)}, str(tmp_path / name))
    done = run_worker("ckpt_kill_writers.py", "background", tmp_path, 30, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"trials": 30, "all_loadable_and_whole": True, "left": [ck.BEST, ck.LAST]}
