"""The index folder `embed` writes and `search` reads (clip-retrieval's layout: embeddings as .npy beside
their metadata):

    manifest.json          checkpoint (path, sha256) and its config, width, dtype, normalized, counts,
                           the images folder, the captions file, the unreadable images, the program version
    image_embeddings.npy   (images, width) float32 or float16, L2-normalised rows
    images.jsonl           one line per row: path (relative to the images folder), size, mtime_ns
    text_embeddings.npy    (captions, width), rows as above
    captions.jsonl         one line per row: text, image (its file's path when known, else null)

Every file is written under a temporary name and renamed into place, the manifest last, so a reader never
sees a manifest that names rows which are not there.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brain_trainer.inference.load import InferenceError

INDEX_FORMAT, INDEX_VERSION = "brain-trainer-index", 1
MANIFEST, IMAGE_EMBEDDINGS, IMAGES, TEXT_EMBEDDINGS, CAPTIONS = (
    "manifest.json",
    "image_embeddings.npy",
    "images.jsonl",
    "text_embeddings.npy",
    "captions.jsonl",
)
DTYPES = ("float32", "float16")


@dataclass
class Index:
    manifest: dict
    images: list[dict]  # path, size, mtime_ns
    image_embeddings: np.ndarray
    captions: list[dict]  # text, image
    text_embeddings: np.ndarray

    @property
    def images_dir(self) -> Path:
        return Path(self.manifest["images_dir"])

    def image_path(self, row: int) -> str:
        return str(self.images_dir / self.images[row]["path"])


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def read_index(folder: Path, flag: str = "--index") -> Index:
    """The index in `folder`; one InferenceError line when it is missing, damaged or not an index."""
    if not (folder / MANIFEST).is_file():
        raise InferenceError(
            f"{flag} {folder}: no index there (no {MANIFEST}); build one with brain-trainer embed "
            f"--checkpoint CKPT --images DIR --out {folder}"
        )
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("format") != INDEX_FORMAT or manifest.get("index_version") != INDEX_VERSION:
            raise ValueError(f"format {manifest.get('format')} version {manifest.get('index_version')}")
        index = Index(
            manifest,
            _read_jsonl(folder / IMAGES),
            np.load(folder / IMAGE_EMBEDDINGS),
            _read_jsonl(folder / CAPTIONS),
            np.load(folder / TEXT_EMBEDDINGS),
        )
    except (OSError, ValueError, KeyError, AttributeError) as error:
        raise InferenceError(
            f"{flag} {folder}: damaged or not a brain-trainer index ({str(error)[:120]}); build it "
            f"again with brain-trainer embed"
        ) from None
    _check_shapes(index, folder, flag)
    return index


def _check_shapes(index: Index, folder: Path, flag: str) -> None:
    width = index.manifest.get("width")
    for name, rows, array in (
        ("images", index.images, index.image_embeddings),
        ("captions", index.captions, index.text_embeddings),
    ):
        if array.ndim != 2 or array.shape != (len(rows), width):
            raise InferenceError(
                f"{flag} {folder}: its {name} embeddings have shape {array.shape}, the manifest "
                f"says {len(rows)} rows of width {width}; build it again with brain-trainer embed"
            )


def _replace(path: Path, write) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as handle:
        write(handle)
    os.replace(temporary, path)


def write_index(folder: Path, index: Index) -> None:
    """Write every file of `index` into `folder` (made if missing), the manifest last."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, array in ((IMAGE_EMBEDDINGS, index.image_embeddings), (TEXT_EMBEDDINGS, index.text_embeddings)):
            _replace(folder / name, lambda handle, array=array: np.save(handle, array))
        for name, rows in ((IMAGES, index.images), (CAPTIONS, index.captions)):
            text = "".join(json.dumps(row) + "\n" for row in rows).encode()
            _replace(folder / name, lambda handle, text=text: handle.write(text))
        manifest = (json.dumps(index.manifest, indent=2) + "\n").encode()
        _replace(folder / MANIFEST, lambda handle: handle.write(manifest))
    except OSError as error:
        raise InferenceError(
            f"--out {folder}: cannot write the index ({error.strerror or error}); choose a writable folder"
        ) from None
