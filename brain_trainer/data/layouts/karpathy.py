"""Karpathy's split files (`dataset_flickr8k.json`, `dataset_flickr30k.json`, `dataset_coco.json`):
`images[]` entries with `filename`, `split`, `sentences[].raw` and, for COCO, `filepath` (`train2014`, ...).
Karpathy's COCO split has `restval` (30,504 images), which is training data, as in the papers."""

from __future__ import annotations

import json
from pathlib import Path

from brain_trainer.data.annotations import Captions, DatasetError, name_first, read_text

FILES = ("dataset_flickr8k.json", "dataset_flickr30k.json", "dataset_coco.json")
SPLIT_NAMES = {"restval": "train"}  # any other name is its own (train, val, test; others are in no split)


def _entry(entry) -> tuple[str, str, list[str]]:
    """(file name, Karpathy split, captions) of one images[] entry; ValueError saying what is wrong with it.
    One pass over the sentences: COCO has 616,435 of them."""
    if not isinstance(entry, dict):
        raise ValueError(f"is {type(entry).__name__}, not an object")
    filename, split, sentences, filepath = (entry.get(key) for key in ("filename", "split", "sentences", "filepath"))
    for key, value, kind in (("filename", filename, str), ("split", split, str), ("sentences", sentences, list)):
        if not isinstance(value, kind):
            raise ValueError(f"'{key}' is {value!r:.40}, not a {kind.__name__}")
    if filepath is not None and not isinstance(filepath, str):
        raise ValueError(f"'filepath' is {filepath!r:.40}, not a str")
    captions = []
    for sentence in sentences:
        raw = sentence.get("raw") if isinstance(sentence, dict) else None
        if not isinstance(raw, str):
            raise ValueError(f"a sentence's 'raw' is {raw!r:.40}, not a str")
        if raw := raw.strip():
            captions.append(raw)
    return f"{filepath}/{filename}" if filepath else filename, split, captions


def read_karpathy_file(path: Path, root: Path) -> Captions:
    """A malformed images[] entry is skipped into the summary warning, the first one named. Names are relative
    to the root when entries have `filepath` (COCO), else to the image folder."""
    try:
        entries = json.loads(read_text(path))["images"]
        if not isinstance(entries, list):
            raise TypeError(f"'images' is a {type(entries).__name__}, not a list")
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DatasetError(
            f"{path}: not a Karpathy split file (images[].filename, .split, .sentences[].raw): {error}"
        ) from None
    captions, first_bad, restval, with_path = Captions(split_of={}), None, 0, False
    for position, entry in enumerate(entries):
        try:
            name, split, entry_captions = _entry(entry)
        except ValueError as error:
            first_bad = first_bad or f"images[{position}]: {error}"
            captions.skipped["malformed entries"] += 1
            continue
        captions.by_image[name], captions.split_of[name] = entry_captions, SPLIT_NAMES.get(split, split)
        restval += split == "restval"
        with_path = with_path or "/" in name
    name_first(captions.skipped, "malformed entries", first_bad)
    if restval:
        captions.notes.append(f"{restval} restval images counted as train")
    if with_path:
        captions.image_dir = root
    return captions


def is_karpathy_file(path: Path, text: str) -> bool:
    return path.suffix.lower() == ".json"
