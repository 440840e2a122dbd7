"""Training data from WebDataset shards, through the CLI: `brain-trainer shards index` builds the index once,
reuses it, rebuilds it for a changed shard, and names a missing shard in one line; a run from local shards or
from the local S3 server stopped by SIGTERM resumes bitwise, on one process or on two at the same sample; a
truncated shard and an undecodable image are substituted and counted."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
from helpers import (
    assert_bitwise_equal,
    assert_one_error_line,
    finish,
    load,
    run_args,
    run_cli,
    run_to_end,
    scalars,
    start,
    wait_for_step,
)
from shard_helpers import colour_shard, truncate
from torch.utils.data import DataLoader, Dataset

from brain_trainer import checkpointing as ck
from brain_trainer.data.shards import ShardError
from brain_trainer.data.shards_sample import write_sample_shards

pytestmark = pytest.mark.slow


def test_shards_index_builds_once_reuses_and_rebuilds_a_changed_shard(capsys, tmp_path):
    for n in range(3):
        colour_shard(tmp_path / f"{n}.tar", first=10 * n, count=4)
    pattern, cache = str(tmp_path / "{0..2}.tar"), tmp_path / "cache"

    status, out, _ = run_cli(capsys, "shards", "index", pattern, "--cache_dir", cache)
    assert status == 0 and "3 shards, 12 samples" in out and "indexed 3, reused 0" in out

    status, out, _ = run_cli(capsys, "shards", "index", pattern, "--cache_dir", cache)
    assert status == 0 and "indexed 0, reused 3" in out

    colour_shard(tmp_path / "2.tar", first=50, count=7)
    os.utime(tmp_path / "2.tar", ns=(1, 1))
    status, out, _ = run_cli(capsys, "shards", "index", pattern, "--cache_dir", cache)
    assert status == 0 and "3 shards, 15 samples" in out and "indexed 1, reused 2" in out


def test_shards_index_of_a_missing_shard_is_one_line_exit_2(capsys, tmp_path):
    colour_shard(tmp_path / "0.tar", first=0, count=2)
    status, _, err = run_cli(capsys, "shards", "index", str(tmp_path / "{0..1}.tar"), "--cache_dir", tmp_path / "c")
    assert_one_error_line(status, err, str(tmp_path / "1.tar"), "no such shard")


class _StoreGone(Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int):
        raise ShardError("s3://b/1.tar: cannot be read (the endpoint did not answer)")


def test_a_shard_error_in_a_loader_worker_comes_back_as_its_one_line():
    with pytest.raises(ShardError) as raised:
        next(iter(DataLoader(_StoreGone(), num_workers=1)))
    assert str(raised.value) == "s3://b/1.tar: cannot be read (the endpoint did not answer)"


# ----------------------------------------------------------------------------- training from shards

TRAIN = "train-{00000..00004}.tar"  # 20 images in shards of 4: 100 samples (five captions each), 12 steps of 8
VAL = "val-{00000..00001}.tar"  # 6 images, 30 captions


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    write_sample_shards(folder, images=26, val=6, per_shard=4, size=(96, 72), seed=1)
    return folder


def shard_args(train: str, val: str, run_dir: Path, *extra: str) -> list[str]:
    args = run_args(Path("unused"), run_dir, "--epochs", "1", *extra)
    at = args.index("--root_dir")
    return [*args[:at], "--train_shards", train, "--val_shards", val, *args[at + 2 :]]


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """The uninterrupted run from local shards every stopped-and-resumed run must equal."""
    run_dir = tmp_path_factory.mktemp("reference")
    out = run_to_end(shard_args(str(shards / TRAIN), str(shards / VAL), run_dir))
    (run_dir / "out.txt").write_text(out)
    assert f"Data: {shards / TRAIN}: 5 shards, 100 samples (one per caption)" in out
    return run_dir


def assert_equals_reference(run_dir: Path, reference: Path) -> None:
    final, expected = load(run_dir / "ckpt" / ck.LAST), load(reference / "ckpt" / ck.LAST)
    assert final["global_step"] == expected["global_step"] == 12
    assert_bitwise_equal(final["model_state_dict"], expected["model_state_dict"], "model")
    assert_bitwise_equal(final["optimizer_state_dict"], expected["optimizer_state_dict"], "optimizer")
    assert final["best_val"] == expected["best_val"]
    assert scalars(run_dir / "runs", "train/loss") == scalars(reference / "runs", "train/loss")


def stop_at(args: list[str], step: int, processes: int = 0) -> dict:
    process = start(args, processes)
    wait_for_step(process, step)
    process.send_signal(signal.SIGTERM)
    status, out = finish(process)
    assert status == 128 + signal.SIGTERM, out
    return load(Path(args[args.index("--savedir") + 1]) / ck.LAST)


def test_a_run_from_local_shards_stopped_mid_epoch_resumes_bitwise(shards, reference, tmp_path):
    args = shard_args(str(shards / TRAIN), str(shards / VAL), tmp_path, "--num_workers", "2")
    stopped = stop_at(args, 5)
    assert stopped["data"]["train_shards"] == str(shards / TRAIN)
    resumed = run_to_end(_without_shards(args) + ["--resume", "auto"])
    assert f"Data: {shards / TRAIN} and {shards / VAL} (from the checkpoint" in resumed
    assert f"✓ Starting from epoch 0, sample {stopped['data_state']['samples_seen']} (mid-epoch)" in resumed
    assert_equals_reference(tmp_path, reference)


def _without_shards(args: list[str]) -> list[str]:
    """The same command without --train_shards/--val_shards: a resume finds them in the checkpoint."""
    at = args.index("--train_shards")
    return args[:at] + args[at + 4 :]


def upload(shards: Path, s3) -> tuple[str, str]:
    """The shards in the test's bucket on the local S3 server: (train pattern, val pattern)."""
    store, bucket = s3.filesystem(), s3.url.split("/")[2]
    for path in shards.glob("*.tar"):
        store.put_file(str(path), f"{bucket}/shards/{path.name}")
    return f"s3://{bucket}/shards/{TRAIN}", f"s3://{bucket}/shards/{VAL}"


def test_a_run_from_shards_on_s3_stopped_mid_epoch_resumes_bitwise(shards, reference, tmp_path, s3):
    train, val = upload(shards, s3)
    args = shard_args(train, val, tmp_path, "--shard_cache_gb", "0.001")
    stop_at(args, 6)
    run_to_end(args + ["--resume", "auto"])
    assert_equals_reference(tmp_path, reference)
    cached = list((tmp_path / "cache" / "shard_cache").glob("*.tar"))
    assert 0 < len(cached) and sum(path.stat().st_size for path in cached) <= 1e6


def test_a_store_that_stops_answering_mid_run_ends_it_in_one_line_with_the_last_checkpoint_intact(shards, tmp_path, s3):
    train, val = upload(shards, s3)
    args = shard_args(train, val, tmp_path, "--shard_cache_gb", "0", "--save_every_steps", "2")
    process = start(args)
    wait_for_step(process, 3)
    s3.relay.cut()
    status, out = finish(process)
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert status == 2 and len(errors) == 1 and "Traceback" not in out, out
    assert "cannot be read (the endpoint did not answer" in errors[0] and f"{train.rsplit('/', 1)[0]}/" in errors[0]
    assert load(tmp_path / "ckpt" / ck.LAST)["global_step"] >= 2


def test_a_resume_from_one_process_on_two_continues_at_the_same_sample(shards, reference, tmp_path):
    args = shard_args(str(shards / TRAIN), str(shards / VAL), tmp_path)
    stopped = stop_at(args, 4)
    resumed = run_to_end(args + ["--resume", "auto"], processes=2)
    samples = stopped["data_state"]["samples_seen"]
    assert resumed.count(f"✓ Starting from epoch 0, sample {samples} (mid-epoch)") == 1
    final = load(tmp_path / "ckpt" / ck.LAST)
    assert final["world_size"] == 2 and final["global_step"] == load(reference / "ckpt" / ck.LAST)["global_step"]


def test_a_truncated_shard_and_an_undecodable_image_are_substituted_and_counted(shards, tmp_path):
    broken = tmp_path / "shards"
    shutil.copytree(shards, broken)
    data = (broken / "train-00001.tar").read_bytes()
    jpeg_start = data.index(b"\xff\xd8\xff")  # the first image's bytes, in the shard's first sample
    (broken / "train-00001.tar").write_bytes(data[:jpeg_start] + b"\0" * 64 + data[jpeg_start + 64 :])
    truncate(broken / "train-00003.tar", (broken / "train-00003.tar").stat().st_size // 2)
    out = run_to_end(shard_args(str(broken / TRAIN), str(broken / VAL), tmp_path))
    assert f"⚠ {broken / 'train-00003.tar'}: truncated" in out
    assert "⚠ Could not read image train-00001.tar/" in out
    skipped = scalars(tmp_path / "runs", "train/skipped_images")
    assert skipped[-1][1] >= 5  # the broken image under each of its five captions, at least


def test_a_missing_shard_is_one_line_and_exit_2(shards, tmp_path):
    status, out = finish(start(shard_args(str(shards / "train-{00000..00009}.tar"), str(shards / VAL), tmp_path)))
    assert status == 2 and out.strip().splitlines()[-1] == (
        f"Error: --train_shards {shards / 'train-00005.tar'}: no such shard; check the pattern (and the bucket) "
        f"or write the shards"
    )
    assert not (tmp_path / "ckpt" / ck.LAST).exists()
