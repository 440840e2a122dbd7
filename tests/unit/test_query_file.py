"""`search --queries FILE`: blank lines (a trailing one, spaces only) are skipped and counted on stderr, so the
results on stdout stay one block per query; a file of blank lines alone is one error naming it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from brain_trainer.inference.load import InferenceError
from brain_trainer.inference.search import read_queries

BRAIN = SimpleNamespace(caption_batch=2, embed_texts=lambda texts: torch.ones(len(texts), 4))  # no model needed


def test_blank_lines_are_skipped_and_counted(tmp_path, capsys):
    queries = tmp_path / "queries.txt"
    queries.write_text("a red circle\n\n   \ntwo blue squares\r\nthree green triangles\n\n")
    read = read_queries(queries, BRAIN)
    assert read.labels == ["a red circle", "two blue squares", "three green triangles"]
    assert read.embeddings.shape == (3, 4)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"--queries {queries}: skipped 3 blank lines\n"


def test_a_file_without_a_query_is_refused(tmp_path):
    queries = tmp_path / "queries.txt"
    queries.write_text("\n  \n")
    with pytest.raises(InferenceError, match=f"--queries {queries}: holds no queries"):
        read_queries(queries, BRAIN)
