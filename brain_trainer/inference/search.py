"""`brain-trainer search`: exact cosine search of an index built by `brain-trainer embed` (a chunked matrix
product and top-k over every stored row: the model's own retrieval, no approximation).

    brain-trainer search --index photos.index --text "a dog on the beach"
    brain-trainer search --index photos.index --image query.jpg -k 5 --grid sheet.png
    brain-trainer search --index photos.index --queries questions.txt --format jsonl
    brain-trainer search --index photos.index --image query.jpg --captions

Queries are embedded by the checkpoint the index was built with (its manifest names it), under the same
precision; --checkpoint points at that checkpoint elsewhere and is refused when its sha256 differs.
Results come best first, in the order of the queries.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from brain_trainer.data.annotations import DatasetError, read_text
from brain_trainer.data.images import UnreadableImage
from brain_trainer.inference.common import Parser, positive_int, resolve_device, run_command
from brain_trainer.inference.grid import write_grid
from brain_trainer.inference.index import Index, read_index
from brain_trainer.inference.load import Brain, InferenceError, load_brain

SCORE_BUDGET = 2**26  # scores held at once (256 MB of float32): stored rows per product = this / queries
FORMATS = {
    "tsv": "score<TAB>path per result, best first (rclip's convention; with --captions the caption text in place "
    "of the path); several queries: one block each, in query order, an empty line between blocks",
    "paths": "only the paths (with --captions: the caption texts), one a line, in query order: for piping",
    "jsonl": 'one JSON object per result: {"query", "query_index" (0-based position in the queries, blank '
    'lines of --queries not counted), "rank" (1 = best), "score", "path"}; with --captions "caption" and '
    '"image" (its image\'s path, or null) in place of "path"',
}


@dataclass
class Queries:
    labels: list[str]  # the text, or the image's path
    embeddings: torch.Tensor  # (Q, d) float32 on the device
    images: list[Path | None]  # the query image, for the grid


def top_k(
    queries: torch.Tensor, stored: np.ndarray, k: int, *, stored_first: bool = False, chunk_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k cosine (dot products of L2-normalised rows) of every query over `stored`, chunk by chunk:
    (scores, row indices), each (Q, min(k, N)), best first. A NaN score ranks lowest, as in the evaluation.

    The evaluation scores a pair as `image_embeddings @ text_embeddings.T`; `stored_first` (stored images, text
    queries) computes the product in that orientation too, and at the evaluation's scale (queries x rows within
    SCORE_BUDGET) it is one product of the evaluation's shape, so a score is the evaluation's to the last bit."""
    chunk_rows = chunk_rows or max(1, SCORE_BUDGET // max(1, len(queries)))
    best_scores = torch.zeros(len(queries), 0, device=queries.device)
    best_rows = torch.zeros(len(queries), 0, dtype=torch.long, device=queries.device)
    for start in range(0, len(stored), chunk_rows):
        block = torch.from_numpy(np.ascontiguousarray(stored[start : start + chunk_rows])).to(queries.device).float()
        scores = torch.nan_to_num((block @ queries.T).T if stored_first else queries @ block.T, nan=-float("inf"))
        scores, rows = scores.topk(min(k, scores.shape[1]), dim=1)
        merged_scores = torch.cat([best_scores, scores], dim=1)
        merged_rows = torch.cat([best_rows, rows + start], dim=1)
        best_scores, keep = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
        best_rows = merged_rows.gather(1, keep)
    return best_scores, best_rows


def load_model_of(index: Index, checkpoint: Path | None, device: torch.device) -> Brain:
    """The brain the index was built with, under the precision it was embedded with."""
    built = index.manifest.get("checkpoint") or {}
    path = checkpoint or Path(built.get("path", ""))
    if checkpoint is None and not path.exists():
        raise InferenceError(f"the index's checkpoint {path} is gone; pass --checkpoint with the same checkpoint")
    brain = load_brain(path, device, index.manifest.get("precision", "auto"))
    if brain.checkpoint_sha256 != built.get("sha256"):
        raise InferenceError(
            f"--checkpoint {path}: sha256 {brain.checkpoint_sha256[:12]} is not the checkpoint "
            f"the index was built with ({str(built.get('sha256'))[:12]}, {built.get('path')}); "
            f"search with that checkpoint, or rebuild the index with brain-trainer embed"
        )
    if brain.width != index.manifest.get("width"):
        raise InferenceError(
            f"the index holds {index.manifest.get('width')}-wide embeddings, the checkpoint makes "
            f"{brain.width}-wide ones; rebuild the index with brain-trainer embed"
        )
    return brain


def text_queries(texts: list[str], brain: Brain, where: str) -> Queries:
    for position, text in enumerate(texts):
        if not text.strip():
            raise InferenceError(f"{where}: query {position + 1} is empty; give some words to search for")
    rows = [
        brain.embed_texts(texts[start : start + brain.caption_batch])
        for start in range(0, len(texts), brain.caption_batch)
    ]
    return Queries(texts, torch.cat(rows), [None] * len(texts))


def image_queries(paths: list[Path], brain: Brain) -> Queries:
    pixels = []
    for path in paths:
        try:
            pixels.append(brain.preprocess.load(path))
        except UnreadableImage as error:
            raise InferenceError(
                f"--image {path}: cannot be read as an image ({str(error)[:100]}); pass a jpg, png or webp file"
            ) from None
    batch = int(brain.config.get("batch_size", 8))
    rows = [brain.embed_images(torch.stack(pixels[start : start + batch])) for start in range(0, len(pixels), batch)]
    return Queries([str(path) for path in paths], torch.cat(rows), list(paths))


def read_queries(path: Path, brain: Brain) -> Queries:
    if not path.is_file():
        raise InferenceError(f"--queries {path}: no such file; give a text file with one query per line")
    try:
        lines = read_text(path).splitlines()
    except DatasetError as error:
        raise InferenceError(f"--queries {error}") from None
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise InferenceError(f"--queries {path}: holds no queries; give one query per line")
    if blank := len(lines) - len(texts):  # on stderr: stdout stays the results, for pipes
        print(f"--queries {path}: skipped {blank} blank line{'s' * (blank > 1)}", file=sys.stderr)
    return text_queries(texts, brain, f"--queries {path}")


def results(index: Index, queries: Queries, scores: torch.Tensor, rows: torch.Tensor, captions: bool) -> list[dict]:
    """One dict per result, in query order, best first."""
    found = []
    for query_index, (label, query_scores, query_rows) in enumerate(
        zip(queries.labels, scores.tolist(), rows.tolist())
    ):
        for rank, (score, row) in enumerate(zip(query_scores, query_rows), start=1):
            target = (
                {"caption": index.captions[row]["text"], "image": _caption_image(index, row)}
                if captions
                else {"path": index.image_path(row)}
            )
            found.append({"query": label, "query_index": query_index, "rank": rank, "score": score, **target})
    return found


def _caption_image(index: Index, row: int) -> str | None:
    image = index.captions[row].get("image")
    return str(index.images_dir / image) if image else None


def print_results(found: list[dict], output_format: str) -> None:
    for position, result in enumerate(found):
        target = result.get("path", result.get("caption"))
        if output_format == "jsonl":
            print(json.dumps(result))
        elif output_format == "paths":
            print(target)
        else:
            if position and result["rank"] == 1:
                print()
            print(f"{result['score']:.4f}\t{target}")


def parse_args(argv: list[str], prog: str) -> argparse.Namespace:
    formats = "\n".join(
        textwrap.fill(f"{name:6} {text}", 100, initial_indent="  ", subsequent_indent=" " * 9)
        for name, text in FORMATS.items()
    )
    parser = Parser(
        prog=prog,
        description=__doc__,
        epilog=f"output formats (--format):\n{formats}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--index", type=Path, required=True, help="index folder written by brain-trainer embed")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", nargs="+", metavar="QUERY", help="text queries: text -> images (or -> captions)")
    query.add_argument(
        "--image",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="image queries: image -> images (or -> captions with --captions)",
    )
    query.add_argument(
        "--queries", type=Path, metavar="FILE", help="text queries, one a line (blank lines skipped), in one process"
    )
    parser.add_argument("-k", type=positive_int("-k"), default=10, help="results per query (default: 10)")
    parser.add_argument("--captions", action="store_true", help="search the index's captions instead of its images")
    parser.add_argument("--format", choices=tuple(FORMATS), default="tsv", help="output format (default: tsv; below)")
    parser.add_argument(
        "--grid",
        type=Path,
        metavar="OUT.png",
        help="also write a contact sheet: a row per query, its top-k images with their scores",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="the index's checkpoint where it is now, same sha256 (default: the path the index names)",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N (default: auto)"
    )
    return parser.parse_args(argv)


def search(args: argparse.Namespace) -> int:
    index = read_index(args.index)
    stored = index.text_embeddings if args.captions else index.image_embeddings
    if args.captions and not len(stored):
        raise InferenceError(
            f"--captions: the index {args.index} holds no captions; embed some with "
            f"brain-trainer embed --captions FILE --out {args.index}"
        )
    if not len(stored):
        raise InferenceError(
            f"--index {args.index}: holds no images (every file was unreadable); embed a folder of readable images"
        )
    if args.grid is not None and args.captions:
        raise InferenceError("--grid draws result images; it cannot be used with --captions")
    brain = load_model_of(index, args.checkpoint, resolve_device(args.device))
    if args.queries is not None:
        queries = read_queries(args.queries, brain)
    elif args.image is not None:
        queries = image_queries(args.image, brain)
    else:
        queries = text_queries(args.text, brain, "--text")
    scores, rows = top_k(queries.embeddings, stored, args.k, stored_first=not args.captions and args.image is None)
    found = results(index, queries, scores.cpu(), rows.cpu(), args.captions)
    print_results(found, args.format)
    if args.grid is not None:
        write_grid(
            args.grid,
            queries=queries.labels,
            query_images=queries.images,
            results=[
                [(r["score"], Path(r["path"])) for r in found if r["query_index"] == q]
                for q in range(len(queries.labels))
            ],
        )
    return 0


def main(argv: list[str], prog: str = "brain-trainer search") -> int:
    args = parse_args(argv, prog)
    return run_command(lambda: search(args))
