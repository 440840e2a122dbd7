"""Captions to embed: an annotation file in any layout the trainer reads (the data wing's registry and readers:
`Flickr8k.token.txt` lines, Karpathy's JSON, Kaggle's `captions.txt`, an imagefolder `metadata.jsonl`/`.csv`),
or plain text with one caption per line. Each caption comes with its image's name where the file says it;
what training would skip is skipped here too, and counted in one ⚠ line."""

from __future__ import annotations

import sys
from pathlib import Path

from brain_trainer.data.annotations import DatasetError, read_lines, skip_summary
from brain_trainer.data.layouts import LAYOUTS, layout_of_file
from brain_trainer.inference.load import InferenceError

Caption = tuple[str, str | None]  # (text, the image's file name, if known)


def read_captions(path: Path) -> list[Caption]:
    """The file's captions, image by image in file order; raises InferenceError when there is none or the file
    cannot be read."""
    if not path.is_file():
        raise InferenceError(
            f"--captions {path}: no such file; pass a caption file of the training data or a text file with one "
            f"caption per line"
        )
    try:
        kind = layout_of_file(path)
        if kind is None:
            captions = [(line, None) for line in read_lines(path)]
        else:
            parsed = LAYOUTS[kind].read(path, path.parent)
            if line := skip_summary(path, parsed.skipped):
                print(f"⚠ {line}", file=sys.stderr)
            captions = parsed.pairs()
    except DatasetError as error:
        raise InferenceError(f"--captions {error}") from None
    if not captions:
        raise InferenceError(f"--captions {path}: holds no captions; give one caption per line")
    return captions
