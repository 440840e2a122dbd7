"""The runtime with one process: every collective is the identity; precision resolves once; the stop flag."""

from __future__ import annotations

import subprocess
import sys

from helpers import ROOT


def double_ctrl_c(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tests" / "workers" / "double_ctrl_c.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_second_ctrl_c_quits_at_once_naming_the_checkpoint_that_is_kept(tmp_path):
    last = tmp_path / "last_brain_v2.pt"
    last.write_bytes(b"a completed save")
    child = double_ctrl_c(str(last))
    assert child.returncode == 130
    assert "first: stop requested" in child.stdout and "still running" not in child.stdout
    assert child.stderr.strip() == (
        f"SIGINT again: quitting without saving; {last} (the last completed save) is "
        f"intact: inspect it with `python -m brain_trainer ckpt inspect {last}`, "
        f"continue with --resume auto"
    )


def test_a_second_ctrl_c_before_any_save_says_nothing_was_saved(tmp_path):
    child = double_ctrl_c(str(tmp_path / "last_brain_v2.pt"))
    assert child.returncode == 130
    assert child.stderr.strip() == "SIGINT again: quitting without saving; no checkpoint of this run was completed yet"
