"""`brain-trainer embed`: every image under a folder (and, when given, every caption of a file) embedded by a
checkpoint, with its evaluation's preprocessing, into an index folder (see `index.py`).

    brain-trainer embed --checkpoint checkpoints_brain_v2/best_brain_v2.pt --images photos/ --out photos.index

Run again on the same folder, it embeds only new or changed files (by path, size and mtime) and drops deleted
ones; another checkpoint, dtype or folder rebuilds the whole index (one line says so).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from brain_trainer import __version__
from brain_trainer.data.images import UnreadableImage
from brain_trainer.data.loaders import make_loader
from brain_trainer.inference.captions import read_captions
from brain_trainer.inference.common import Parser, positive_int, resolve_device, run_command
from brain_trainer.inference.index import (
    DTYPES,
    INDEX_FORMAT,
    INDEX_VERSION,
    MANIFEST,
    Index,
    prepare_out,
    read_index,
    write_index,
)
from brain_trainer.inference.load import Brain, InferenceError, Preprocess, file_sha256, load_brain

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def list_images(folder: Path) -> list[dict]:
    """Every image file under `folder` (recursively; hidden files and folders are not images), sorted by path."""
    if not folder.is_dir():
        raise InferenceError(f"--images {folder}: no such folder; point --images at a folder of images")
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if (
            path.suffix.lower() in IMAGE_SUFFIXES
            and path.is_file()
            and not any(part.startswith(".") for part in relative.parts)
        ):
            stat = path.stat()
            found.append({"path": relative.as_posix(), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    if not found:
        raise InferenceError(
            f"--images {folder}: no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images under it; "
            f"point --images at a folder of images"
        )
    return sorted(found, key=lambda row: row["path"])


class ImageFiles(Dataset):
    """(pixels, why unreadable or '') per file; an unreadable file gives black pixels, dropped afterwards."""

    def __init__(self, paths: list[Path], preprocess: Preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        try:
            return self.preprocess.load(self.paths[index]), ""
        except UnreadableImage as error:
            side = self.preprocess.image_size
            return torch.zeros(3, side, side, dtype=torch.uint8), (str(error).splitlines() or ["unreadable"])[0][:120]


def embed_files(brain: Brain, paths: list[Path], *, batch_size: int, num_workers: int) -> tuple[np.ndarray, list[str]]:
    """(len(paths), d) float32 embeddings, and per file why it could not be read ('' when it could)."""
    loader = make_loader(
        ImageFiles(paths, brain.preprocess), batch_size=batch_size, num_workers=num_workers, device=brain.device, seed=0
    )  # the evaluation's loader settings (prefetch, pinning)
    rows, reasons = [np.zeros((0, brain.width), np.float32)], []
    for pixels, why in tqdm(loader, desc="Embedding images", unit="batch", disable=None):
        rows.append(brain.embed_images(pixels).cpu().numpy())
        reasons += list(why)
    return np.concatenate(rows), reasons


def embed_texts(brain: Brain, texts: list[str]) -> np.ndarray:
    """(len(texts), d) float32, in the evaluation's caption batches."""
    rows = [np.zeros((0, brain.width), np.float32)]
    starts = range(0, len(texts), brain.caption_batch)
    for start in tqdm(starts, desc="Embedding captions", unit="batch", disable=None if len(starts) > 1 else True):
        rows.append(brain.embed_texts(texts[start : start + brain.caption_batch]).cpu().numpy())
    return np.concatenate(rows)


def previous_index(out: Path, brain: Brain, *, images_dir: Path, dtype: str) -> Index | None:
    """The index already in `out` when it can be updated; None (with one line saying why) when it must be rebuilt."""
    if not (out / MANIFEST).is_file():
        return None
    try:
        old = read_index(out, "--out")
    except InferenceError as error:
        print(f"⚠ {error}: rebuilding it")
        return None
    built = old.manifest.get("checkpoint", {})
    if built.get("sha256") != brain.checkpoint_sha256:
        print(
            f"{out} was built with another checkpoint ({built.get('path')}, sha256 {str(built.get('sha256'))[:12]}); "
            f"re-embedding everything with {brain.source} (sha256 {brain.checkpoint_sha256[:12]})"
        )
        return None
    for what, was, now in (
        ("images folder", old.manifest.get("images_dir"), str(images_dir)),
        ("dtype", old.manifest.get("dtype"), dtype),
    ):
        if was != now:
            print(f"{out} was built with {what} {was}; re-embedding everything for {now}")
            return None
    return old


def update_images(
    brain: Brain, images_dir: Path, old: Index | None, *, batch_size: int, num_workers: int
) -> tuple[list[dict], np.ndarray, dict, list[str]]:
    """Rows and embeddings of every readable image now under `images_dir`, re-using the old index's rows of
    unchanged files; the counts (embedded, unchanged, dropped, unreadable) and the unreadable paths."""
    old_rows = {row["path"]: (position, row) for position, row in enumerate(old.images)} if old else {}
    found = list_images(images_dir)
    # unchanged: the same path, size and mtime as a row of the old index
    unchanged = [(row, old_rows[row["path"]][0]) for row in found if old_rows.get(row["path"], (None, None))[1] == row]
    unchanged_paths = {row["path"] for row, _ in unchanged}
    todo = [row for row in found if row["path"] not in unchanged_paths]
    fresh, reasons = embed_files(
        brain, [images_dir / row["path"] for row in todo], batch_size=batch_size, num_workers=num_workers
    )
    unreadable = []
    for row, why in zip(todo, reasons):
        if why:
            print(f"⚠ {images_dir / row['path']}: cannot be read ({why}); left out of the index", file=sys.stderr)
            unreadable.append(row["path"])
    readable = [position for position, why in enumerate(reasons) if not why]
    rows = [row for row, _ in unchanged] + [todo[position] for position in readable]
    kept = old.image_embeddings[[position for _, position in unchanged]].astype(np.float32) if old else fresh[:0]
    embeddings = np.concatenate([kept, fresh[readable]])
    order = sorted(range(len(rows)), key=lambda position: rows[position]["path"])
    present = {row["path"] for row in found}
    counts = {
        "embedded": len(readable),
        "unchanged": len(unchanged),
        "unreadable": len(unreadable),
        "dropped": sum(path not in present for path in old_rows),
    }
    return [rows[position] for position in order], embeddings[order], counts, unreadable


def update_captions(
    brain: Brain, captions_file: Path | None, old: Index | None, image_paths: list[str]
) -> tuple[list[dict], np.ndarray, dict | None, int]:
    """Caption rows (text, image) and embeddings, the caption file's record, and how many were embedded now.
    Without --captions the old index's captions stay; the same file (by sha256) is not embedded again."""
    if captions_file is None:
        if old is None:
            return [], np.zeros((0, brain.width), np.float32), None, 0
        return old.captions, old.text_embeddings.astype(np.float32), old.manifest.get("captions_file"), 0
    captions = read_captions(captions_file)
    by_name = {}
    for path in image_paths:  # a caption file names an image by its file name; the index by its path
        by_name[path] = path
        by_name.setdefault(path.rsplit("/", 1)[-1], path)
    rows = [{"text": text, "image": by_name.get(image, image) if image else None} for text, image in captions]
    source = {"path": str(captions_file.resolve()), "sha256": file_sha256(captions_file)}
    if old is not None and old.manifest.get("captions_file") == source and len(old.captions) == len(rows):
        return rows, old.text_embeddings.astype(np.float32), source, 0
    return rows, embed_texts(brain, [row["text"] for row in rows]), source, len(rows)


def make_manifest(
    brain: Brain, *, images_dir: Path, dtype: str, index: Index, captions_file: dict | None, unreadable: list[str]
) -> dict:
    return {
        "format": INDEX_FORMAT,
        "index_version": INDEX_VERSION,
        "program_version": __version__,
        "checkpoint": {"path": str(Path(brain.source).resolve()), "sha256": brain.checkpoint_sha256},
        "config": brain.config,
        "width": brain.width,
        "dtype": dtype,
        "normalized": True,
        "precision": brain.precision,
        "images_dir": str(images_dir),
        "captions_file": captions_file,
        "counts": {"images": len(index.images), "captions": len(index.captions), "unreadable": len(unreadable)},
        "unreadable": unreadable,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }


def parse_args(argv: list[str], prog: str) -> argparse.Namespace:
    parser = Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint file, or a folder from export")
    parser.add_argument("--images", type=Path, required=True, help="folder of jpg/jpeg/png/webp images (recursive)")
    parser.add_argument(
        "--captions",
        type=Path,
        help="captions to embed: a Flickr8k caption file (token, Karpathy "
        "or Kaggle layout) or one caption per line (default: keep the index's)",
    )
    parser.add_argument("--out", type=Path, required=True, help="index folder to write (updated when it exists)")
    parser.add_argument(
        "--batch_size",
        type=positive_int("--batch_size"),
        help="images per forward pass (default: the run's, as its evaluation)",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N (default: auto)"
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "fp16", "bf16"),
        help="autocast precision (default auto: the run's, what its evaluation uses)",
    )
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="stored embeddings (default: float32)")
    parser.add_argument(
        "--num_workers", type=positive_int("--num_workers", 0), default=2, help="image decoding processes (default: 2)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --out folder that holds files this program did not write (an index's names are replaced)",
    )
    return parser.parse_args(argv)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def embed(args: argparse.Namespace) -> int:
    prepare_out(args.out, overwrite=args.overwrite)  # before any work: a folder the index cannot go into
    brain = load_brain(args.checkpoint, resolve_device(args.device), args.precision)
    images_dir, out = args.images.resolve(), args.out
    old = previous_index(out, brain, images_dir=images_dir, dtype=args.dtype)
    rows, image_embeddings, counts, unreadable = update_images(
        brain,
        images_dir,
        old,
        batch_size=args.batch_size or int(brain.config.get("batch_size", 8)),
        num_workers=args.num_workers,
    )
    captions, text_embeddings, captions_file, embedded_captions = update_captions(
        brain, args.captions, old, [row["path"] for row in rows]
    )
    index = Index({}, rows, image_embeddings.astype(args.dtype), captions, text_embeddings.astype(args.dtype))
    index.manifest = make_manifest(
        brain, images_dir=images_dir, dtype=args.dtype, index=index, captions_file=captions_file, unreadable=unreadable
    )
    write_index(out, index)
    print(
        f"Embedded {plural(counts['embedded'], 'image')} ({counts['unchanged']} unchanged, "
        f"{counts['dropped']} dropped, {counts['unreadable']} unreadable) and {plural(embedded_captions, 'caption')} "
        f"with {brain.source} on {brain.device} ({brain.precision})"
    )
    print(f"Index {out}: {len(rows)} images, {len(captions)} captions, {brain.width}-wide {args.dtype} embeddings")
    return 0


def main(argv: list[str], prog: str = "brain-trainer embed") -> int:
    args = parse_args(argv, prog)
    return run_command(lambda: embed(args))
