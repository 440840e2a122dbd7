"""`brain-trainer search`: the model's retrieval to the last printed digit of `eval`, its output formats, the
contact sheet, and every bad input as one line with exit status 2."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import ROOT, assert_one_error_line, run_cli, split_folder
from PIL import Image

from brain_trainer.inference.grid import GAP, TILE, cell

TABLE_ROW = re.compile(r"^(image -> text|text -> image)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+\d+$")


def printed_table(out: str) -> dict[str, list[str]]:
    """eval's table: {'i2t': [R@1, R@5, R@10], 't2i': [...]} as printed."""
    rows = {match[1]: [match[2], match[3], match[4]] for match in map(TABLE_ROW.match, out.splitlines()) if match}
    return {"i2t": rows["image -> text"], "t2i": rows["text -> image"]}


def recall_at(results: list[list[tuple[float, bool]]], k: int) -> float:
    """evaluation.retrieval_metrics' Recall@k from each query's top k+1 (score, right?) results, best first.

    Its rank is 1 + the number of wrong items scoring at least the best right one (ties count against the
    model). From the top k+1 the count is exact whenever it is below k: were the best right item outside the
    list, or a wrong item at its score left out, k+1 listed items would score at least as high (a miss)."""
    hits = 0
    for found in results:
        right = [score for score, is_right in found if is_right]
        hits += bool(right) and sum(score >= right[0] for score, is_right in found if not is_right) < k
    return 100.0 * hits / len(results)


def jsonl(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def by_query(results: list[dict], count: int) -> list[list[dict]]:
    grouped = [[] for _ in range(count)]
    for result in results:
        grouped[result["query_index"]].append(result)
    return grouped


@pytest.mark.slow
def test_search_gives_the_recall_eval_prints(retrieval_run, tmp_path, capsys):
    root, checkpoint = retrieval_run
    status, out, err = run_cli(
        capsys,
        "eval",
        "--resume",
        checkpoint,
        "--root_dir",
        root,
        "--eval_split",
        "test",
        "--num_workers",
        "0",
        "--cache_dir",
        tmp_path / "cache",
    )
    assert status == 0, out + err
    table = printed_table(out)
    images, captions, queries = split_folder(root, "test", tmp_path)
    index = tmp_path / "index"
    status, out, err = run_cli(
        capsys,
        "embed",
        "--checkpoint",
        checkpoint,
        "--images",
        images,
        "--captions",
        captions,
        "--out",
        index,
        "--num_workers",
        "0",
    )
    assert status == 0, err
    texts = queries.read_text().splitlines()
    status, out, err = run_cli(capsys, "search", "--index", index, "--queries", queries, "-k", 11, "--format", "jsonl")
    assert status == 0, err
    caption_image = [line.split("#")[0] for line in captions.read_text().splitlines()]
    t2i = [
        [(r["score"], r["path"].endswith(caption_image[q])) for r in found]
        for q, found in enumerate(by_query(jsonl(out), len(texts)))
    ]
    assert all(len(found) == 11 for found in t2i)
    image_paths = sorted(images.iterdir())
    status, out, err = run_cli(
        capsys, "search", "--index", index, "--image", *image_paths, "--captions", "-k", 11, "--format", "jsonl"
    )
    assert status == 0, err
    i2t = [
        [(r["score"], r["image"] == str(image_paths[q])) for r in found]
        for q, found in enumerate(by_query(jsonl(out), len(image_paths)))
    ]
    for direction, results in (("t2i", t2i), ("i2t", i2t)):
        assert [f"{recall_at(results, k):.1f}" for k in (1, 5, 10)] == table[direction], direction
    assert len(set(table["i2t"] + table["t2i"])) > 2  # the model ranks some right items high and others low


@pytest.fixture
def built(sample_root, trained, tmp_path, capsys) -> SimpleNamespace:
    """An index of the sample set's 4 val images and 20 captions, built with the shared tiny checkpoint."""
    images, captions, queries = split_folder(sample_root, "val", tmp_path)
    checkpoint, index = trained / "ckpt" / "last_brain_v2.pt", tmp_path / "index"
    status, _, err = run_cli(
        capsys,
        "embed",
        "--checkpoint",
        checkpoint,
        "--images",
        images,
        "--captions",
        captions,
        "--out",
        index,
        "--num_workers",
        "0",
    )
    assert status == 0, err
    return SimpleNamespace(index=index, images=images, checkpoint=checkpoint, queries=queries)


def test_formats_keep_the_order_of_the_queries(built, capsys):
    status, out, _ = run_cli(
        capsys,
        "search",
        "--index",
        built.index,
        "--text",
        "red circle",
        "two blue squares",
        "-k",
        3,
        "--format",
        "jsonl",
    )
    results = jsonl(out)
    assert status == 0 and [(r["query"], r["query_index"], r["rank"]) for r in results] == [
        (query, position, rank)
        for position, query in enumerate(["red circle", "two blue squares"])
        for rank in (1, 2, 3)
    ]
    assert all(a["score"] >= b["score"] for a, b in zip(results, results[1:]) if a["query_index"] == b["query_index"])
    _, tsv, _ = run_cli(capsys, "search", "--index", built.index, "--text", "red circle", "two blue squares", "-k", 3)
    blocks = [block.splitlines() for block in tsv.split("\n\n")]
    assert [[line.split("\t") for line in block] for block in blocks] == [
        [[f"{r['score']:.4f}", r["path"]] for r in results if r["query_index"] == q] for q in (0, 1)
    ]
    # the same queries in one batch (a query's embedding depends on its batch's padding, in the last bits)
    _, paths, _ = run_cli(
        capsys,
        "search",
        "--index",
        built.index,
        "--text",
        "red circle",
        "two blue squares",
        "-k",
        3,
        "--format",
        "paths",
    )
    assert [line for line in paths.splitlines() if line] == [r["path"] for r in results]
    assert all(path.startswith(str(built.images)) for path in paths.splitlines())


def test_image_to_images_and_to_captions(built, capsys):
    query = sorted(built.images.iterdir())[0]
    status, out, _ = run_cli(capsys, "search", "--index", built.index, "--image", query, "-k", 4, "--format", "jsonl")
    results = jsonl(out)
    # an image is nearest to itself (cosine 1 of a normalised embedding; the tiny model may tie others with it)
    itself = [r for r in results if r["path"] == str(query)]
    assert status == 0 and len(results) == 4 and itself and itself[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert itself[0]["score"] >= results[0]["score"] - 1e-6
    assert results[0]["score"] == pytest.approx(1.0, abs=1e-5)
    status, out, _ = run_cli(
        capsys, "search", "--index", built.index, "--image", query, "--captions", "-k", 20, "--format", "jsonl"
    )
    captions = jsonl(out)
    assert (
        status == 0
        and len(captions) == 20
        and {r["caption"] for r in captions} == set(built.queries.read_text().splitlines())
    )
    assert sum(r["image"] == str(query) for r in captions) == 5  # the index knows each caption's image


def test_grid_has_k_tiles_per_query(built, tmp_path, capsys):
    grid = tmp_path / "sheet.png"
    status, _, err = run_cli(
        capsys, "search", "--index", built.index, "--text", "red circle", "green square", "-k", 3, "--grid", grid
    )
    assert status == 0, err
    assert f"Contact sheet written to {grid}: a row per query (2), the query then its top 3" in err
    sheet = np.asarray(Image.open(grid).convert("RGB"))
    assert sheet.shape == (*cell(2, 4)[::-1], 3)  # a query cell, then k tiles, per row
    for row in range(2):
        for column in range(1, 4):
            left, top = cell(row, column)
            tile = sheet[top : top + TILE, left : left + TILE]
            assert tile.std() > 0 or tile.mean() < 250  # a drawn image, not the white sheet
            assert (sheet[top : top + TILE, left - GAP : left] == 255).all()  # white between thumbnails


def test_queries_file_and_help(built, capsys):
    status, out, _ = run_cli(
        capsys, "search", "--index", built.index, "--queries", built.queries, "-k", 1, "--format", "paths"
    )
    assert status == 0 and len(out.splitlines()) == 20
    with pytest.raises(SystemExit):
        from brain_trainer.cli import main

        main(["search", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for explained in ("tsv score<TAB>path", "paths only the paths", "jsonl one JSON object per result"):
        assert explained in help_text


def test_bad_inputs_are_one_line(built, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    other = tmp_path / "other.pt"
    checkpoint = torch.load(built.checkpoint, weights_only=True)
    checkpoint["model_state_dict"]["logit_scale"] += 1
    torch.save(checkpoint, other)
    cases = [
        (["--index", tmp_path / "nowhere", "--text", "a"], ["--index", "brain-trainer embed"]),
        (["--index", built.index, "--text", "a", "-k", 0], ["-k"]),
        (["--index", built.index, "--text", "  "], ["empty"]),
        (["--index", built.index, "--image", broken], ["--image", str(broken)]),
        (["--index", built.index, "--image", tmp_path / "missing.png"], ["--image"]),
        (["--index", built.index, "--text", "a", "--checkpoint", other], ["--checkpoint", "sha256"]),
        (["--index", built.index, "--queries", tmp_path / "none.txt"], ["--queries"]),
    ]
    for args, needles in cases:
        assert_one_error_line(*run_cli(capsys, "search", *args)[::2], *needles)
    manifest = json.loads((built.index / "manifest.json").read_text())
    (built.index / "manifest.json").write_text(json.dumps({**manifest, "width": 64}))
    assert_one_error_line(*run_cli(capsys, "search", "--index", built.index, "--text", "a")[::2], "width")


@pytest.mark.slow
def test_search_in_a_subprocess(built):
    """As a user runs it: `python -m brain_trainer search ...` prints rclip's `score<TAB>path`."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "brain_trainer",
            "search",
            "--index",
            str(built.index),
            "--text",
            "a red circle",
            "-k",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = [line.split("\t") for line in done.stdout.splitlines()]
    assert len(lines) == 2 and all(float(score) <= 1 and path.endswith(".jpg") for score, path in lines)
