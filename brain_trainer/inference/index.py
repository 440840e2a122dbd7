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
import math
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


# What each row of a .jsonl file holds: its keys and their types (an index is data from outside: checked whole)
ROW_TYPES = {
    IMAGES: {"path": (str,), "size": (int,), "mtime_ns": (int,)},
    CAPTIONS: {"text": (str,), "image": (str, type(None))},
}
MANIFEST_TYPES = {
    "width": int,
    "images_dir": str,
    "dtype": str,
    "checkpoint": dict,
    "config": dict,
    "precision": str,
    "counts": dict,
}


def _read_jsonl(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or any(
            not isinstance(row.get(key), kinds) or isinstance(row.get(key), bool)
            for key, kinds in ROW_TYPES[path.name].items()
        ):
            raise ValueError(f"{path.name} line {number} is not a row of {', '.join(ROW_TYPES[path.name])}")
    return rows


def _check_manifest(manifest) -> None:
    if not isinstance(manifest, dict):
        raise ValueError(f"{MANIFEST} holds a {type(manifest).__name__}, not an object")
    if manifest.get("format") != INDEX_FORMAT or manifest.get("index_version") != INDEX_VERSION:
        raise ValueError(f"format {manifest.get('format')} version {manifest.get('index_version')}")
    for key, kind in MANIFEST_TYPES.items():
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise ValueError(f"{MANIFEST}'s {key} is {str(manifest.get(key))[:40]!r}, not a {kind.__name__}")
    checkpoint = manifest["checkpoint"]
    if (
        manifest["width"] < 1
        or manifest["dtype"] not in DTYPES
        or not all(isinstance(checkpoint.get(key), str) for key in ("path", "sha256"))
    ):
        raise ValueError(f"{MANIFEST}'s width, dtype or checkpoint is not one embed writes")


HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _load_array(path: Path, rows: int, width: int) -> np.ndarray:
    """The .npy file, once its header says (rows, width) of float32/float16 and the file holds exactly that."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = HEADER_READERS.get(version)
        if read_header is None:
            raise ValueError(f"{path.name} is .npy version {version}, which embed does not write")
        shape, fortran, dtype = read_header(handle)
        expected = handle.tell() + math.prod(shape) * dtype.itemsize
    if dtype.name not in DTYPES or fortran or shape != (rows, width):
        raise ValueError(f"{path.name} holds {dtype} {shape}, not {rows} rows of width {width} (float32/float16)")
    if os.path.getsize(path) != expected:
        raise ValueError(f"{path.name} is {os.path.getsize(path)} bytes, its header says {expected}")
    return np.load(path, allow_pickle=False)


def read_index(folder: Path, flag: str = "--index") -> Index:
    """The index in `folder`; one InferenceError line when it is missing, damaged or not an index."""
    if not (folder / MANIFEST).is_file():
        raise InferenceError(
            f"{flag} {folder}: no index there (no {MANIFEST}); build one with brain-trainer embed "
            f"--checkpoint CKPT --images DIR --out {folder}"
        )
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        _check_manifest(manifest)
        images, captions = _read_jsonl(folder / IMAGES), _read_jsonl(folder / CAPTIONS)
        counts = {"images": len(images), "captions": len(captions)}
        if {key: manifest.get("counts", {}).get(key) for key in counts} != counts:
            raise ValueError(f"{MANIFEST} counts {str(manifest.get('counts'))[:60]}, the rows {counts}")
        index = Index(
            manifest,
            images,
            _load_array(folder / IMAGE_EMBEDDINGS, len(images), manifest["width"]),
            captions,
            _load_array(folder / TEXT_EMBEDDINGS, len(captions), manifest["width"]),
        )
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as error:
        raise InferenceError(
            f"{flag} {folder}: damaged or not a brain-trainer index ({str(error)[:120]}); build it "
            f"again with brain-trainer embed"
        ) from None
    return index


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
