"""What a newcomer reads first: `brain-trainer --version` as a user runs it, and after a resume the banner's
learning rate is the one the run goes on with (the schedule at the restored step), beside the peak."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import ROOT, load, run_args, run_cli

from brain_trainer import __version__
from brain_trainer.config import TrainSettings
from brain_trainer.trainer import learning_rate

pytestmark = pytest.mark.slow


def test_version_is_one_line_with_the_versions_a_bug_report_needs():
    done = subprocess.run(
        [sys.executable, "-m", "brain_trainer", "--version"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.startswith(f"brain-trainer {__version__} (Python ") and "torch " in done.stdout
    assert len(done.stdout.splitlines()) == 1


def test_the_resumed_banner_shows_the_learning_rate_the_run_resumes_at(sample_root, trained, capsys):
    step = load(trained / "ckpt" / "last_brain_v2.pt")["global_step"]
    status, out, err = run_cli(capsys, "train", *run_args(sample_root, trained, "--epochs", "2", "--resume", "auto"))
    assert status == 0, err
    resumed = learning_rate(step, TrainSettings(lr=1e-3, warmup_steps=2, epochs=2), 2 * step)
    assert f"Learning rate: 0.001 (peak); resuming at {resumed:.3g}\n" in out
    assert resumed < 1e-3  # a point of the schedule, not its peak
