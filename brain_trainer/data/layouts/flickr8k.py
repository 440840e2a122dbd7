"""Flickr8k's original release (`Flickr8k.token.txt` and three split lists) and the Kaggle copy
(`captions.txt`, a CSV `image,caption`, split by a hash of the image name)."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from brain_trainer.data.annotations import Captions, DatasetError, read_lines, read_text

TOKEN_FILE = "Flickr8k.token.txt"
TEXT_DIRS = (".", "Flickr8k_text")
SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
KAGGLE_FILE = "captions.txt"
TOKEN_LINE = re.compile(r"^(?P<file>.+?)#(?P<k>\d+)\s+(?P<caption>.*)$")


def read_token_file(path: Path, root: Path) -> Captions:
    """`IMAGE#k<TAB>caption` lines; the key is the whole file name before '#' ('x.jpg.1' stays its own key)."""
    captions = Captions()
    for line in read_lines(path):
        match = TOKEN_LINE.match(line)
        if match is None or not match["caption"].strip():
            captions.skipped["unparseable caption lines"] += 1
            continue
        captions.by_image.setdefault(match["file"].strip(), []).append(match["caption"].strip())
    return captions


def token_split_lists(path: Path, root: Path) -> dict[str, list[str]]:
    """The three split lists, beside the token file or in the root's text folders."""
    lists = {}
    for split, name in SPLIT_FILES.items():
        found = [folder / name for folder in (path.parent, *(root / d for d in TEXT_DIRS)) if (folder / name).is_file()]
        if not found:
            raise DatasetError(
                f"--root_dir {root}: {name} not found beside {path}; "
                f"the original release ships the three split lists with {TOKEN_FILE}"
            )
        lists[split] = list(dict.fromkeys(read_lines(found[0])))
    return lists


def read_kaggle_file(path: Path, root: Path) -> Captions:
    """A CSV with the header `image,caption`; a caption may hold quoted commas."""
    captions = Captions()
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    header = [column.strip().lower() for column in next(reader, [])]
    if header[:2] != ["image", "caption"]:
        raise DatasetError(f"{path}: expected a CSV header 'image,caption', found {','.join(header)!r}")
    for row in reader:
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            if any(cell.strip() for cell in row):
                captions.skipped["unparseable caption lines"] += 1
            continue
        captions.by_image.setdefault(row[0].strip(), []).append(",".join(row[1:]).strip())
    return captions


def is_token_text(text: str) -> bool:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return bool(lines) and all(TOKEN_LINE.match(line) for line in lines)


def is_kaggle_text(text: str) -> bool:
    first = next((line for line in text.splitlines() if line.strip()), "")
    return [cell.strip().lower() for cell in first.split(",")[:2]] == ["image", "caption"]
