"""A run's TensorBoard curves are never hidden without consent: a fresh run into a --logdir that holds another
run's events is refused like a used --savedir, the default --logdir gives every checkpoint folder curves of its
own, and a resume writes (and drops events past its checkpoint) only where its own run's curves are."""

from __future__ import annotations

import pytest
from helpers import STEPS_PER_EPOCH, TINY_MODEL, assert_one_error_line, run_args, run_cli, scalars

pytestmark = pytest.mark.slow


def test_a_second_fresh_run_into_a_used_logdir_is_refused_and_the_first_curves_stay(sample_root, trained, capsys):
    first = scalars(trained / "runs", "train/loss")
    status, _, err = run_cli(capsys, "train", *run_args(sample_root, trained, "--savedir", trained / "other"))
    assert_one_error_line(status, err, f"--logdir {trained / 'runs'}", "another --logdir", "--overwrite")
    assert first and scalars(trained / "runs", "train/loss") == first


def test_a_resume_of_another_folder_into_a_used_logdir_is_refused(sample_root, trained, capsys):
    first = scalars(trained / "runs", "train/loss")
    status, _, err = run_cli(
        capsys,
        "train",
        *run_args(sample_root, trained, "--savedir", trained / "other", "--epochs", "2"),
        "--resume",
        trained / "ckpt" / "last_brain_v2.pt",
    )
    assert_one_error_line(status, err, "--logdir", f"--savedir {trained / 'ckpt'}", "--overwrite")
    assert scalars(trained / "runs", "train/loss") == first


def test_runs_in_two_folders_keep_both_curves_under_the_default_logdir(sample_root, tmp_path, capsys, monkeypatch):
    """The default --logdir is runs_brain_v2/NAME, NAME the --savedir's last part: side by side in TensorBoard."""
    monkeypatch.chdir(tmp_path)
    for savedir in ("first", "second"):
        status, out, err = run_cli(
            capsys,
            "train",
            "--root_dir",
            sample_root,
            "--savedir",
            savedir,
            "--cache_dir",
            "cache",
            "--epochs",
            "1",
            *TINY_MODEL,
        )
        assert status == 0, err
        assert f"TensorBoard: runs_brain_v2/{savedir} " in out
    for savedir in ("first", "second"):
        assert len(scalars(tmp_path / "runs_brain_v2" / savedir, "train/loss")) == STEPS_PER_EPOCH
