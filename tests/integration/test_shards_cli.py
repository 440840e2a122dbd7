"""Training data from WebDataset shards, through the CLI: `brain-trainer shards index` builds the index once,
reuses it, rebuilds it for a changed shard, and names a missing shard in one line."""

from __future__ import annotations

import os

import pytest
from helpers import assert_one_error_line, run_cli
from shard_helpers import colour_shard
from torch.utils.data import DataLoader, Dataset

from brain_trainer.data.shards import ShardError

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
