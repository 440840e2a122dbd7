"""Captions to embed: a Flickr8k caption file in any layout the trainer reads (`Flickr8k.token.txt` lines
`IMAGE#k caption`, Karpathy's `dataset_flickr8k.json`, Kaggle's `captions.txt` CSV with the header
`image,caption`), or plain text with one caption per line. Each caption comes with its image's name where
the file says it."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from brain_trainer.data.flickr8k_dataset import TOKEN_LINE, DatasetError, read_text
from brain_trainer.inference.load import InferenceError

Caption = tuple[str, str | None]  # (text, the image's file name, if known)


def read_captions(path: Path) -> list[Caption]:
    """The file's captions in file order; raises InferenceError when there is none or it cannot be read."""
    if not path.is_file():
        raise InferenceError(
            f"--captions {path}: no such file; pass a Flickr8k caption file or a text file with one caption per line"
        )
    try:
        text = read_text(path)
    except DatasetError as error:
        raise InferenceError(str(error)) from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if path.suffix.lower() == ".json":
        captions = _karpathy(path, text)
    elif lines and [cell.strip().lower() for cell in lines[0].split(",")[:2]] == ["image", "caption"]:
        captions = _kaggle(text)
    elif lines and all(TOKEN_LINE.match(line) for line in lines):
        captions = [(match["caption"].strip(), match["file"].strip()) for match in map(TOKEN_LINE.match, lines)]
    else:
        captions = [(line, None) for line in lines]
    captions = [(caption, image) for caption, image in captions if caption]
    if not captions:
        raise InferenceError(f"--captions {path}: holds no captions; give one caption per line")
    return captions


def _karpathy(path: Path, text: str) -> list[Caption]:
    try:
        return [
            (sentence["raw"].strip(), entry["filename"])
            for entry in json.loads(text)["images"]
            for sentence in entry["sentences"]
        ]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise InferenceError(
            f"--captions {path}: not a Karpathy split file (images[].filename, .sentences[].raw): {error}"
        ) from None


def _kaggle(text: str) -> list[Caption]:
    rows = list(csv.reader(io.StringIO(text, newline="")))[1:]
    return [(",".join(row[1:]).strip(), row[0].strip()) for row in rows if len(row) >= 2 and row[0].strip()]
