"""A folder of captioned images, Hugging Face's `imagefolder` convention: `metadata.jsonl` or `metadata.csv`
beside the images, one row per image or per (image, caption): `file_name` (relative to the metadata file's
folder), a caption column (`text`, `caption` or `captions`; a list of captions allowed in JSONL) and an
optional `split` (`train`, `validation` or `val`, `test`). Without `split`, images are split by a hash of
the name (`--val_fraction`, `--test_fraction`)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from brain_trainer.data.annotations import Captions, DatasetError, name_first, read_text

FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_COLUMNS = ("text", "caption", "captions")
SPLIT_NAMES = {"train": "train", "validation": "val", "val": "val", "test": "test"}


def read_metadata_file(path: Path, root: Path) -> Captions:
    """Rows that cannot be used (malformed, empty captions, duplicates, unknown splits) are counted into the one
    summary warning; a file without `file_name` or a caption column is a DatasetError naming its columns."""
    rows, columns = _csv_rows(path) if path.suffix.lower() == ".csv" else _jsonl_rows(path)
    if "file_name" not in columns or not set(CAPTION_COLUMNS) & set(columns):
        raise DatasetError(
            f"{path}: an imagefolder metadata file needs a 'file_name' column and a caption column "
            f"({', '.join(CAPTION_COLUMNS)}); its columns are: {', '.join(columns) or 'none'}"
        )
    captions = Captions(split_of={} if "split" in columns else None, image_dir=path.parent)
    seen, first = set(), {}
    for where, row in rows:
        problem = _add_row(captions, row, seen)
        if problem:
            captions.skipped[problem[0]] += 1
            first.setdefault(problem[0], f"{where}: {problem[1]}")
    for what, instance in first.items():
        name_first(captions.skipped, what, instance)
    return captions


def _add_row(captions: Captions, row, seen: set) -> tuple[str, str] | None:
    """Add one row's captions (from its first caption column: text, caption, captions); (what to count, why)
    when the row, or a caption of it, is not used."""
    if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not row["file_name"].strip():
        return "malformed rows", f"no file name in {str(row)[:60]}"
    text_column = next((column for column in CAPTION_COLUMNS if row.get(column) is not None), CAPTION_COLUMNS[0])
    name, texts = row["file_name"].strip(), row.get(text_column)
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
        return "malformed rows", f"'{text_column}' is {row.get(text_column)!r:.40}, not text or a list of text"
    if captions.split_of is not None:
        split = SPLIT_NAMES.get(str(row.get("split", "")).strip().lower())
        if split is None:
            return "rows with an unknown split", f"{row.get('split')!r:.40}"
        if captions.split_of.setdefault(name, split) != split:
            return "rows whose split differs from the image's first row", name
    problem = None
    for text in (text.strip() for text in texts):
        if not text:
            problem = ("empty captions", name)
        elif (name, text) in seen:
            problem = ("duplicate rows", name)
        else:
            seen.add((name, text))
            captions.by_image.setdefault(name, []).append(text)
    return problem


def _jsonl_rows(path: Path) -> tuple[list[tuple[str, object]], list[str]]:
    rows, columns = [], {}
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            row = f"<not JSON: {error.msg}>"
        rows.append((f"line {number}", row))
        columns.update(dict.fromkeys(row if isinstance(row, dict) else ()))
    return rows, list(columns)


def _csv_rows(path: Path) -> tuple[list[tuple[str, object]], list[str]]:
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    columns = [column.strip() for column in reader.fieldnames or ()]
    reader.fieldnames = columns
    return [(f"line {reader.line_num}", row) for row in reader], columns


def is_metadata_file(path: Path, text: str) -> bool:
    return path.name in FILES
