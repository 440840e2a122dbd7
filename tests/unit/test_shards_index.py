"""The shards' index: patterns, samples per caption, built once and reused, rebuilt when a shard changes,
and one line for a missing shard."""

from __future__ import annotations

import os

import pytest
from shard_helpers import colour_shard, jpeg, truncate, write_tar

from brain_trainer.data.shards import ShardError, expand_pattern, load_index


def test_a_pattern_expands_braces_and_joins_lists_with_double_colons():
    assert expand_pattern("d/{00..02}.tar::s3://b/x-{a,b}.tar") == [
        "d/00.tar",
        "d/01.tar",
        "d/02.tar",
        "s3://b/x-a.tar",
        "s3://b/x-b.tar",
    ]


def test_a_pattern_naming_no_shard_is_one_line():
    with pytest.raises(ShardError, match="--train_shards '': names no shard"):
        expand_pattern("")


@pytest.mark.parametrize("pattern", ["data/train-{00000..0000.tar", "x{0..1"])
def test_a_pattern_with_unbalanced_braces_is_one_line_naming_the_flag(pattern):
    with pytest.raises(ShardError, match=r"^--val_shards .*: Unbalanced braces"):
        expand_pattern(pattern, "--val_shards")


def test_each_caption_is_a_sample_and_captions_come_from_json_txt_or_json_caption(tmp_path):
    write_tar(
        tmp_path / "0.tar",
        {
            "a.jpg": jpeg((1, 2, 3)),
            "a.json": {"captions": ["one", "two", "three"]},
            "a.txt": "not used: json has captions",
            "b.png": jpeg((4, 5, 6)),
            "b.txt": "from txt",
            "c.webp": jpeg((7, 8, 9)),
            "c.json": {"caption": "from json"},
            "d.txt": "no image",
            "e.jpg": jpeg((0, 0, 0)),
        },
    )
    index = load_index(str(tmp_path / "0.tar"), index_dir=tmp_path / "index")
    assert index.captions == ["one", "two", "three", "from txt", "from json"]
    assert index.keys == ["a", "a", "a", "b", "c"]
    assert index.problems == [f"{tmp_path / '0.tar'}: skipped 1 images without a caption, 1 keys without an image"]
    data = (tmp_path / "0.tar").read_bytes()
    offset, size = int(index.offset[3]), int(index.size[3])
    assert data[offset : offset + size] == jpeg((4, 5, 6))


def test_the_index_is_built_once_reused_and_rebuilt_for_a_changed_shard(tmp_path):
    for n in range(3):
        colour_shard(tmp_path / f"{n}.tar", first=10 * n, count=4)
    pattern = str(tmp_path / "{0..2}.tar")
    first = load_index(pattern, index_dir=tmp_path / "index")
    assert (first.built, len(first), list(first.samples_per_shard())) == (3, 12, [4, 4, 4])

    again = load_index(pattern, index_dir=tmp_path / "index")
    assert again.built == 0 and again.captions == first.captions

    colour_shard(tmp_path / "1.tar", first=100, count=6)
    os.utime(tmp_path / "1.tar", ns=(1, 1))  # a new version even on a coarse clock
    changed = load_index(pattern, index_dir=tmp_path / "index")
    assert changed.built == 1 and list(changed.samples_per_shard()) == [4, 6, 4]
    assert "image 100" in changed.captions
    assert changed.fingerprint() != first.fingerprint()


def test_a_missing_shard_is_one_line_naming_its_url(tmp_path):
    colour_shard(tmp_path / "0.tar", first=0, count=2)
    with pytest.raises(ShardError, match=r"--train_shards .*1\.tar: no such shard"):
        load_index(str(tmp_path / "{0..1}.tar"), index_dir=tmp_path / "index")


def test_a_truncated_shard_keeps_its_samples_before_the_cut_and_says_so(tmp_path):
    shard = colour_shard(tmp_path / "0.tar", first=0, count=6)
    full = load_index(str(shard), index_dir=tmp_path / "full")
    cut = int(full.offset[3]) + 10  # inside the fourth image
    truncate(shard, cut)
    index = load_index(str(shard), index_dir=tmp_path / "index")
    assert index.captions[:3] == full.captions[:3]
    assert 3 <= len(index) < 6
    assert any("truncated" in problem for problem in index.problems)


def test_the_tokenizer_sample_is_bounded_and_a_function_of_the_index(tmp_path):
    for n in range(3):
        colour_shard(tmp_path / f"{n}.tar", first=10 * n, count=5)
    index = load_index(str(tmp_path / "{0..2}.tar"), index_dir=tmp_path / "index")
    sample = index.tokenizer_captions(limit=4)
    assert sample == ["image 0", "image 4", "image 13", "image 22"]  # every 4th of 15, in shard order
    assert index.tokenizer_captions(limit=100) == index.captions
