"""Other data through the CLI, on generated data: Flickr30k- and COCO-shaped Karpathy files train and resume
bitwise after SIGTERM with no --root_dir on the resume; a folder of captioned images trains, its checkpoint
evaluates without --root_dir, and `eval --folds 5` equals the mean of five evals of its five folds; mistakes
are one line; `sample-data` keeps what a folder holds."""

from __future__ import annotations

import contextlib
import io
import json
import signal
from pathlib import Path

import pytest
import torch
from helpers import (
    TINY_MODEL,
    assert_bitwise_equal,
    assert_one_error_line,
    finish,
    run_cli,
    run_to_end,
    start,
    wait_for_step,
)

pytestmark = pytest.mark.slow


def run_args(run_dir: Path, *extra: str) -> list[str]:
    return [
        "--savedir", str(run_dir / "ckpt"), "--logdir", str(run_dir / "runs"),
        "--cache_dir", str(run_dir / "cache"), *TINY_MODEL, *extra,
    ]  # fmt: skip


def sample_data(capsys, root: Path, layout: str, *size: str) -> Path:
    status, out, err = run_cli(capsys, "sample-data", root, "--layout", layout, "--size", "48x36", *size)
    assert status == 0 and f"({layout} layout) to {root}" in out, err
    return root


def recall_rows(out: str, after: str = "median rank") -> list[float]:
    """The R@1/5/10 of both directions from the first table after the line containing `after`."""
    lines = out[out.index(after) :].splitlines()
    rows = [next(line for line in lines if line.startswith(label)) for label in ("image -> text", "text -> image")]
    return [float(value) for row in rows for value in row.split()[3:6]]


@pytest.mark.parametrize("layout", ["karpathy-flickr30k", "karpathy-coco"])
def test_karpathy_files_of_flickr30k_and_coco_train_and_resume_bitwise_without_root_dir(capsys, tmp_path, layout):
    root = sample_data(capsys, tmp_path / "data", layout, "--images", "20", "--val", "4", "--test", "2")
    reference = run_to_end(["--root_dir", str(root), *run_args(tmp_path / "reference", "--epochs", "1")])
    assert ("restval images counted as train" in reference) == (layout == "karpathy-coco")
    args = run_args(tmp_path / "stopped", "--epochs", "1")
    process = start(["--root_dir", str(root), *args])
    wait_for_step(process, 3)
    process.send_signal(signal.SIGTERM)
    status, out = finish(process)
    assert status == 128 + signal.SIGTERM, out
    resumed = run_to_end([*args, "--resume", "auto"])
    assert f"Data: {root.absolute()} (from the checkpoint" in resumed
    final, expected = (torch.load(run / "ckpt" / "last_brain_v2.pt", weights_only=True) for run in
                       (tmp_path / "stopped", tmp_path / "reference"))  # fmt: skip
    assert final["global_step"] == expected["global_step"] == 8
    assert_bitwise_equal(final["model_state_dict"], expected["model_state_dict"], "model")
    assert_bitwise_equal(final["optimizer_state_dict"], expected["optimizer_state_dict"], "optimizer")
    assert final["data"]["root_dir"] == str(root.absolute())


@pytest.fixture(scope="module")
def captioned_folder(tmp_path_factory) -> tuple[Path, Path, str]:
    """(data, run folder, output) of one tiny epoch on an imagefolder (metadata.jsonl with split, captions as a
    list) with a 40-image test split, two rows it cannot use among them."""
    from brain_trainer.cli import main
    from brain_trainer.data.sample_data import write_sample_dataset

    work = tmp_path_factory.mktemp("imagefolder")
    root = write_sample_dataset(work / "data", "imagefolder", images=60, val=5, test=40, size=(48, 36), seed=2)
    with open(root / "metadata.jsonl", "a") as handle:
        handle.write('{"file_name": "images/gone.jpg", "text": "Gone .", "split": "train"}\n{"file_name": 3}\n')
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["train", "--root_dir", str(root), *run_args(work, "--epochs", "1")])
    assert status == 0, out.getvalue()
    return root, work, out.getvalue()


def test_a_captioned_folder_trains_with_its_unusable_rows_in_one_warning(captioned_folder):
    root, _, out = captioned_folder
    warnings = [line for line in out.splitlines() if line.startswith("⚠") and "skipped" in line]
    assert warnings == [
        f"⚠ {root / 'metadata.jsonl'}: skipped 1 images missing from the image folder, "
        f"1 malformed rows (first: line 62: no file name in {{'file_name': 3}})"
    ]
    assert "imagefolder layout): train 15 images / 75 captions, val 5 images / 25 captions, test 40 images" in out


def test_eval_over_five_folds_equals_the_mean_of_five_evals_of_each_fold(capsys, captioned_folder, tmp_path):
    root, work, _ = captioned_folder
    checkpoint = work / "ckpt" / "last_brain_v2.pt"
    # Batches of 2 images and 8 captions: each fold's 8 images and 40 captions are whole batches in both runs, so
    # each embedding is computed exactly as in the fold's own run (batch composition moves float rounding).
    evaluation = ["--eval_split", "test", "--batch_size", "2", "--cache_dir", tmp_path / "cache", "--num_workers", "0"]
    status, out, err = run_cli(capsys, "eval", "--resume", checkpoint, "--folds", "5", *evaluation)
    assert status == 0, err
    assert "from the checkpoint" in out and "mean over 5 folds of 8 images:" in out
    folded = recall_rows(out, "mean over 5 folds")
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()[:60]]
    test_rows = [row for row in rows if row["split"] == "test"]
    alone = []
    for fold in range(5):
        subset = tmp_path / f"fold{fold}"
        subset.mkdir()
        (subset / "images").symlink_to(root / "images")
        kept = [row for row in rows if row["split"] != "test"] + test_rows[8 * fold : 8 * fold + 8]
        (subset / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in kept))
        status, out, err = run_cli(capsys, "eval", "--resume", checkpoint, "--root_dir", subset, *evaluation)
        assert status == 0 and "Scored 8 test images against 40 captions" in out, err
        alone.append(recall_rows(out))
    mean = [sum(values) / 5 for values in zip(*alone)]
    assert folded == pytest.approx(mean, abs=0.06)  # each figure is printed to 0.1


def test_mistakes_with_other_data_are_one_line(capsys, captioned_folder, tmp_path):
    root, work, _ = captioned_folder
    no_columns = tmp_path / "bad" / "metadata.csv"
    no_columns.parent.mkdir()
    no_columns.write_text("path,label\na.jpg,cat\n")
    cases = [
        (["--root_dir", no_columns.parent], [str(no_columns), "its columns are: path, label"]),
        (["--annotations", tmp_path / "absent.jsonl"], ["--annotations", "absent.jsonl", "no such file"]),
        (["--root_dir", root, "--val_fraction", "0.7"], ["--val_fraction 0.7"]),
    ]
    for args, needles in cases:
        status, _, err = run_cli(capsys, "train", *args, *run_args(tmp_path / "run"))
        assert_one_error_line(status, err, *needles)
    checkpoint = work / "ckpt" / "last_brain_v2.pt"
    status, _, err = run_cli(capsys, "eval", "--resume", checkpoint, "--eval_split", "test", "--folds", "41")
    assert_one_error_line(status, err, "--folds 41", "40 images")


def test_sample_data_keeps_a_folder_holding_annotation_files_unless_told_to_overwrite(capsys, tmp_path):
    root = sample_data(capsys, tmp_path / "mine", "token", "--images", "6", "--val", "1", "--test", "1")
    token = root / "Flickr8k_text" / "Flickr8k.token.txt"
    token.write_text("my.jpg#0\tMy own caption .\n")
    status, _, err = run_cli(capsys, "sample-data", root, "--layout", "imagefolder")
    assert_one_error_line(status, err, str(root), "Flickr8k.token.txt", "--overwrite")
    assert token.read_text() == "my.jpg#0\tMy own caption .\n" and not (root / "metadata.jsonl").exists()
    sample_data(capsys, root, "token", "--images", "6", "--val", "1", "--test", "1", "--overwrite")
    assert "My own caption" not in token.read_text()
