"""`brain-trainer search`: the model's retrieval to the last printed digit of `eval`, its output formats, the
contact sheet, and every bad input as one line with exit status 2."""

from __future__ import annotations

import re

import torch

from brain_trainer.inference.search import top_k

TABLE_ROW = re.compile(r"^(image -> text|text -> image)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+\d+$")


def test_top_k_in_chunks_is_the_exact_top_k():
    generator = torch.Generator().manual_seed(0)
    stored = torch.nn.functional.normalize(torch.randn(50, 8, generator=generator), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(3, 8, generator=generator), dim=1)
    scores, rows = top_k(queries, stored.numpy(), 7, chunk_rows=6)
    expected = (queries @ stored.T).topk(7, dim=1)
    assert torch.equal(rows, expected.indices) and torch.allclose(scores, expected.values)
    assert top_k(queries, stored.numpy(), 99)[1].shape == (3, 50)  # k beyond the index: every row
