"""The contact sheet `search --grid` writes: a row per query, the query (its image, or its text) in the first
cell, then its top-k result images left to right, best first, each with its score underneath; white gaps
between the cells."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms import v2

from brain_trainer.data.augment import eval_transform
from brain_trainer.data.images import UnreadableImage, decode_image
from brain_trainer.inference.load import InferenceError
from brain_trainer.safe_files import describe, write_file

TILE, STRIP, GAP = 128, 20, 8  # a square thumbnail, the strip under it for the score, the white between cells


def thumbnail(path: Path) -> Image.Image:
    """The image's centre at TILE x TILE; a grey square when it cannot be read (any more)."""
    try:
        return v2.functional.to_pil_image(eval_transform(TILE)(decode_image(path, TILE)))
    except UnreadableImage:
        return Image.new("RGB", (TILE, TILE), "gray")


def cell(row: int, column: int) -> tuple[int, int]:
    """The top left corner of a cell's thumbnail: a GAP around every cell, its score strip under it."""
    return GAP + column * (TILE + GAP), GAP + row * (TILE + STRIP + GAP)


def write_grid(
    path: Path, *, queries: list[str], query_images: list[Path | None], results: list[list[tuple[float, Path]]]
) -> None:
    """Rows of (query cell, k result tiles), then one line on stderr saying where the sheet is."""
    columns = 1 + max((len(row) for row in results), default=0)
    sheet = Image.new("RGB", cell(len(queries), columns), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=13)
    for row, (query, query_image, found) in enumerate(zip(queries, query_images, results)):
        left, top = cell(row, 0)
        if query_image is not None:
            sheet.paste(thumbnail(query_image), (left, top))
        else:
            draw.multiline_text((left + 4, top + 4), "\n".join(textwrap.wrap(query, 18)[:8]), fill="black", font=font)
        draw.text((left + 4, top + TILE + 3), "query", fill="gray", font=font)
        for column, (score, image) in enumerate(found, start=1):
            left, top = cell(row, column)
            sheet.paste(thumbnail(image), (left, top))
            draw.text((left + 4, top + TILE + 3), f"{column}. {score:.3f}", fill="black", font=font)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, lambda handle: sheet.save(handle, format="PNG"))  # whole or not at all, never via a link
    except OSError as error:
        raise InferenceError(f"--grid {describe(error, path)}; give a writable .png path") from None
    print(
        f"Contact sheet written to {path}: a row per query ({len(queries)}), the query then its top {columns - 1}",
        file=sys.stderr,
    )
