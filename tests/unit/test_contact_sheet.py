"""The `search --grid` contact sheet: every thumbnail in its own cell with white between the cells, and one line
on stderr saying where the sheet was written."""

from __future__ import annotations

import numpy as np
from PIL import Image

from brain_trainer.inference.grid import GAP, STRIP, TILE, cell, write_grid


def test_cells_are_apart_and_the_sheet_says_where_it_is(tmp_path, capsys):
    black = tmp_path / "black.png"
    Image.new("RGB", (200, 150), "black").save(black)
    sheet_path = tmp_path / "out" / "sheet.png"
    write_grid(sheet_path, queries=["a query", "another"], query_images=[None, black], results=[[(0.9, black)] * 3] * 2)
    assert capsys.readouterr().err == (
        f"Contact sheet written to {sheet_path}: a row per query (2), the query then its top 3\n"
    )
    sheet = np.asarray(Image.open(sheet_path).convert("L"))
    assert sheet.shape == (2 * (TILE + STRIP + GAP) + GAP, 4 * (TILE + GAP) + GAP)
    for row in range(2):
        for column in range(1, 4):
            left, top = cell(row, column)
            assert (sheet[top : top + TILE, left : left + TILE] == 0).all()  # the whole thumbnail
            assert (sheet[top : top + TILE, left - GAP : left] == 255).all()  # white to its left
            assert (sheet[top - GAP : top, left : left + TILE] == 255).all()  # and above
