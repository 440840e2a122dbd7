"""The folder's policy: rotation of epoch snapshots, --resume auto's discovery, one run per folder, consent
before replacing another run's checkpoints, unreadable files set aside, names that are not files refused."""

from __future__ import annotations

import os

from checkpoint_helpers import run_worker

from brain_trainer import checkpointing as ck


def local(folder) -> ck.LocalStorage:
    return ck.LocalStorage(str(folder))


def test_a_second_run_on_a_folder_is_refused_naming_the_first(tmp_path):
    first = ck.claim_savedir(local(tmp_path), resume=None, overwrite=False, unreadable=[])
    try:
        second = run_worker("ckpt_claim_savedir.py", tmp_path)
    finally:
        first.release()
    assert second.returncode == 2 and f"another run (PID {os.getpid()} on " in second.stderr
    assert "Traceback" not in second.stderr
    assert run_worker("ckpt_claim_savedir.py", tmp_path).returncode == 0, "released: the folder is free again"
