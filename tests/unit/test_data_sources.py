"""Other data through the layout registry: Karpathy files of Flickr30k and COCO (filepath, restval), folders of
captioned images (metadata.jsonl / .csv, with and without split), the one skip warning and the one-line
refusals, one error for every unreadable image, caption files for `embed`, and recall over folds."""

from __future__ import annotations

import csv
import json
import struct
import warnings
import zlib
from pathlib import Path

import pytest
import torch

from brain_trainer.data.annotations import DatasetError
from brain_trainer.data.datasets import UniqueImages
from brain_trainer.data.images import JpegImages, UnreadableImage, decode_image
from brain_trainer.data.layouts import LAYOUTS, DataSource, layout_of_file, load_splits, read_splits
from brain_trainer.data.sample_data import write_sample_dataset
from brain_trainer.evaluation import fold_metrics, retrieval_metrics, retrieval_picture
from brain_trainer.inference.captions import read_captions


def read_quietly(root: Path, annotations: str = "auto", **fractions) -> tuple[dict, str, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits, summary = read_splits(DataSource(root, annotations, **fractions))
    return splits, summary, [str(w.message) for w in caught]


def counts(splits: dict) -> list[tuple[int, int]]:
    return [(len(splits[name].images), len(splits[name])) for name in ("train", "val", "test")]


def imagefolder(tmp_path: Path, name: str = "folder") -> Path:
    return write_sample_dataset(tmp_path / name, "imagefolder", images=12, val=3, test=2, size=(32, 24))


def rewrite_rows(root: Path, change) -> list[dict]:
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    rows = [row for old in rows for row in change(old)]
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


# ----------------------------------------------------------------------------- Karpathy files


def test_a_flickr30k_named_karpathy_file_reads_its_images_from_flickr30k_images(tmp_path):
    root = write_sample_dataset(tmp_path / "f30k", "karpathy-flickr30k", images=12, val=3, test=2, size=(32, 24))
    splits, summary, messages = read_quietly(root)
    assert counts(splits) == [(7, 35), (3, 15), (2, 10)] and not messages
    assert splits["train"].image_dir == root / "flickr30k-images"
    assert "dataset_flickr30k.json (karpathy layout): train 7 images / 35 captions" in summary


def test_coco_filepath_folders_are_honoured_and_restval_counts_as_train_and_says_so(tmp_path):
    root = write_sample_dataset(tmp_path / "coco", "karpathy-coco", images=12, val=3, test=2, size=(32, 24))
    entries = json.loads((root / "dataset_coco.json").read_text())["images"]
    restval = [entry for entry in entries if entry["split"] == "restval"]
    assert restval and all(entry["filepath"] == "val2014" for entry in restval)
    splits, summary, _ = read_quietly(root)
    assert counts(splits) == [(7, 35), (3, 15), (2, 10)]
    assert {name.split("/")[0] for name in splits["train"].images} == {"train2014", "val2014"}
    assert all(path.is_file() for path in splits["train"].image_paths())
    assert f"{len(restval)} restval images counted as train" in summary


def test_annotations_may_name_the_file_and_its_layout_is_known_by_name_or_content(tmp_path):
    root = write_sample_dataset(tmp_path / "coco", "karpathy-coco", images=8, val=2, test=1, size=(32, 24))
    moved = root / "annotations" / "my_split.json"
    moved.parent.mkdir()
    (root / "dataset_coco.json").rename(moved)
    assert layout_of_file(moved) == "karpathy"
    assert counts(read_quietly(root, str(moved))[0])[0] == (5, 25)
    with pytest.raises(DatasetError, match=r"--annotations .*nothing\.txt: not an annotation file"):
        load_splits(root, str(root / "nothing.txt"))


# ----------------------------------------------------------------------------- folders of captioned images


def test_imagefolder_with_a_split_column_and_captions_as_a_list(tmp_path):
    splits, summary, messages = read_quietly(imagefolder(tmp_path))
    assert counts(splits) == [(7, 35), (3, 15), (2, 10)] and not messages
    assert splits["val"].images[0].startswith("images/") and "imagefolder layout" in summary


def test_imagefolder_without_split_is_hash_split_by_the_fractions_and_one_caption_a_row_is_grouped(tmp_path):
    root = imagefolder(tmp_path)
    rewrite_rows(root, lambda row: [{"file_name": row["file_name"], "text": text} for text in row["captions"]])
    splits, _, _ = read_quietly(root, val_fraction=0.25, test_fraction=0.25)
    assert counts(splits) == [(6, 30), (3, 15), (3, 15)]
    default = read_quietly(root)[0]
    assert [len(default[name].images) for name in ("val", "test")] == [1, 1], "at least one image each"
    assert default == read_quietly(root)[0], "the same split on every read"


def test_imagefolder_metadata_csv(tmp_path):
    root = imagefolder(tmp_path)
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    (root / "metadata.jsonl").unlink()
    with open(root / "metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "caption", "split"])
        writer.writerows([row["file_name"], text, row["split"]] for row in rows for text in row["captions"])
    splits, _, messages = read_quietly(root)
    assert counts(splits) == [(7, 35), (3, 15), (2, 10)] and not messages


def test_unusable_rows_are_counted_in_one_warning(tmp_path):
    root = imagefolder(tmp_path)
    rows = rewrite_rows(root, lambda row: [row])
    extra = [
        {"file_name": "images/missing.jpg", "captions": ["Gone ."], "split": "train"},
        {"file_name": rows[0]["file_name"], "captions": ["  "], "split": "train"},
        {"file_name": rows[0]["file_name"], "captions": [rows[0]["captions"][0]], "split": "train"},
        {"file_name": rows[1]["file_name"], "captions": ["Other ."], "split": "holdout"},
        {"file_name": rows[2]["file_name"], "captions": 7, "split": "train"},
    ]
    with open(root / "metadata.jsonl", "a") as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in extra) + "{broken\n")
    splits, _, messages = read_quietly(root)
    assert counts(splits) == [(7, 35), (3, 15), (2, 10)]
    assert len(messages) == 1
    for needle in (
        "1 images missing from the image folder",
        "1 empty captions",
        "1 duplicate rows",
        "1 rows with an unknown split (first: line 16: 'holdout')",
        "2 malformed rows",
    ):
        assert needle in messages[0], (needle, messages[0])


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_metadata_without_file_name_or_caption_column_names_the_file_and_its_columns(tmp_path, suffix):
    (tmp_path / "pictures").mkdir()
    path = tmp_path / "pictures" / f"metadata.{suffix}"
    path.write_text('{"file": "a.jpg", "label": "cat"}\n' if suffix == "jsonl" else "file,label\na.jpg,cat\n")
    with pytest.raises(DatasetError) as refused:
        load_splits(tmp_path / "pictures")
    assert str(path) in str(refused.value) and "its columns are: file, label" in str(refused.value)


def test_every_layout_name_is_one_registry_entry_read_by_the_flags():
    from brain_trainer.config import ANNOTATIONS
    from brain_trainer.data.sample_data import SAMPLE_LAYOUTS

    assert ANNOTATIONS == ("auto", *LAYOUTS)
    assert all(name.split("-")[0] in LAYOUTS for name in SAMPLE_LAYOUTS) and set(LAYOUTS) <= set(SAMPLE_LAYOUTS)


# ----------------------------------------------------------------------------- unreadable images


def broken_png(path: Path) -> Path:
    """A PNG whose second chunk header is garbage: PIL's decoder raises SyntaxError halfway through."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0))
    pixels = zlib.compress(bytes(range(256)) * 49)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", pixels[: len(pixels) // 2]) + b"\0\0\0\4\1\2\3\4abcd\0\0\0\0"
    )
    return path


def test_every_decoding_failure_is_one_unreadable_image_error(tmp_path):
    (tmp_path / "text.jpg").write_text("not an image")
    cases = [broken_png(tmp_path / "broken.png"), tmp_path / "text.jpg", tmp_path / "absent.jpg"]
    for path in cases:
        with pytest.raises(UnreadableImage, match=path.name) as raised:
            decode_image(path)
        assert isinstance(raised.value, OSError)


def test_the_evaluation_scores_and_pictures_a_syntax_error_image_instead_of_crashing(tmp_path):
    root = write_sample_dataset(tmp_path / "k", "karpathy", images=8, val=2, test=1, size=(32, 24))
    split = load_splits(root)["val"]
    broken_png(split.image_paths()[0])
    images = JpegImages(split.image_paths())
    assert [readable for _, readable in UniqueImages(split, images, 32)] == [False, True]
    similarity = torch.randn(len(split.images), len(split))
    assert retrieval_picture(similarity, split, images, count=2).shape[0] == 3


# ----------------------------------------------------------------------------- embed's caption files


def test_embed_captions_skip_and_count_what_training_skips(tmp_path, capsys):
    path = tmp_path / "dataset_flickr8k.json"
    entries = [
        {"filename": "a.jpg", "split": "test", "sentences": [{"raw": 5}]},
        {"filename": "b.jpg", "split": "test", "sentences": [{"raw": "Two cats ."}]},
    ]
    path.write_text(json.dumps({"images": entries}))
    assert read_captions(path) == [("Two cats .", "b.jpg")]
    err = capsys.readouterr().err
    assert "skipped 1 malformed entries (first: images[0]: a sentence's 'raw' is 5, not a str)" in err


def test_embed_captions_read_an_imagefolder_metadata_file(tmp_path):
    root = imagefolder(tmp_path)
    captions = read_captions(root / "metadata.jsonl")
    assert len(captions) == 60 and captions[0][1].startswith("images/")


# ----------------------------------------------------------------------------- folds


def test_recall_over_folds_is_the_mean_of_each_fold_scored_alone():
    generator = torch.Generator().manual_seed(0)
    caption_image = torch.arange(20).repeat_interleave(2)
    similarity = torch.randn(20, 40, generator=generator)
    folded = fold_metrics(similarity, caption_image, 5)
    alone = [
        retrieval_metrics(similarity[4 * f : 4 * f + 4, 8 * f : 8 * f + 8], torch.arange(4).repeat_interleave(2))
        for f in range(5)
    ]
    for key in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@10"):
        assert folded[f"folds_{key}"] == pytest.approx(sum(m[key] for m in alone) / 5)
    assert folded["fold_images"] == 4 and folded["folds"] == 5
