"""The index folder `embed` writes and `search` reads (clip-retrieval's layout: embeddings as .npy beside
their metadata):

    manifest.json          checkpoint (path, sha256) and its config, width, dtype, normalized, counts,
                           the images folder, the captions file, the unreadable images, the program version
    image_embeddings.npy   (images, width) float32 or float16, L2-normalised rows
    images.jsonl           one line per row: path (relative to the images folder), size, mtime_ns
    text_embeddings.npy    (captions, width), rows as above
    captions.jsonl         one line per row: text, image (its file's path when known, else null)

Each build writes its arrays and rows under new names (`image_embeddings-GEN.npy`, ...), each whole or not at
all (brain_trainer.safe_files), and publishes them with one rename of the manifest that names them; the old
build's files are removed only after. A reader sees the old index or the new one, never a mix (a full disk
mid-build leaves the old one answering), and nothing is written through a link planted in the folder.
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brain_trainer.inference.load import InferenceError
from brain_trainer.safe_files import describe, make_folder, output_folder, remove_quietly, write_bytes, write_file

INDEX_FORMAT, INDEX_VERSION = "brain-trainer-index", 1
MANIFEST, IMAGE_EMBEDDINGS, IMAGES, TEXT_EMBEDDINGS, CAPTIONS = (
    "manifest.json",
    "image_embeddings.npy",
    "images.jsonl",
    "text_embeddings.npy",
    "captions.jsonl",
)
DTYPES = ("float32", "float16")
FILES = (IMAGE_EMBEDDINGS, IMAGES, TEXT_EMBEDDINGS, CAPTIONS)  # the manifest's "files" maps each to this build's
# what the program writes in an index folder: the manifest, a build's files (or an older index's fixed names),
# and the temporaries of a write in progress (brain_trainer.safe_files)
OURS = re.compile(
    r"^(manifest\.json|(image_embeddings|text_embeddings)(-[0-9a-f]{12})?\.npy|(images|captions)(-[0-9a-f]{12})?"
    r"\.jsonl|\..+\.tmp-\d+(-[0-9a-f]{8})?)$"
)


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


def _read_jsonl(path: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or any(
            not isinstance(row.get(key), kinds) or isinstance(row.get(key), bool)
            for key, kinds in ROW_TYPES[kind].items()
        ):
            raise ValueError(f"{kind} line {number} is not a row of {', '.join(ROW_TYPES[kind])}")
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
        files = build_files(manifest)
        images = _read_jsonl(folder / files[IMAGES], IMAGES)
        captions = _read_jsonl(folder / files[CAPTIONS], CAPTIONS)
        counts = {"images": len(images), "captions": len(captions)}
        if {key: manifest.get("counts", {}).get(key) for key in counts} != counts:
            raise ValueError(f"{MANIFEST} counts {str(manifest.get('counts'))[:60]}, the rows {counts}")
        index = Index(
            manifest,
            images,
            _load_array(folder / files[IMAGE_EMBEDDINGS], len(images), manifest["width"]),
            captions,
            _load_array(folder / files[TEXT_EMBEDDINGS], len(captions), manifest["width"]),
        )
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as error:
        raise InferenceError(
            f"{flag} {folder}: damaged or not a brain-trainer index ({str(error)[:120]}); build it "
            f"again with brain-trainer embed"
        ) from None
    return index


def build_files(manifest: dict) -> dict[str, str]:
    """The file of each part that the manifest publishes (an index from before builds had names: the fixed ones)."""
    files = manifest.get("files", {name: name for name in FILES})
    if not isinstance(files, dict) or any(not OURS.match(str(files.get(name))) for name in FILES):
        raise ValueError(f"its files are not this program's: {str(files)[:80]}")
    return files


def is_index_manifest(path: Path) -> bool:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == INDEX_FORMAT


def prepare_out(folder: Path, *, overwrite: bool) -> None:
    """Before any work: `--out` can be created and written, and holds only what this program writes there."""
    output_folder(folder, "--out", ours=lambda name: bool(OURS.match(name)), overwrite=overwrite)
    if (folder / MANIFEST).exists() and not is_index_manifest(folder / MANIFEST) and not overwrite:
        raise InferenceError(
            f"--out {folder}: its {MANIFEST} is not a brain-trainer index; choose an empty or new folder, or pass "
            f"--overwrite to replace it"
        )


def write_index(folder: Path, index: Index) -> None:
    """Write this build's files into `folder` under new names, then publish them with one manifest rename, then
    remove the previous build's files. On a failure the new files are removed and the old index is intact."""
    generation = uuid.uuid4().hex[:12]
    files = {name: name.replace(".", f"-{generation}.", 1) for name in FILES}
    parts = {
        IMAGE_EMBEDDINGS: lambda handle: np.save(handle, index.image_embeddings),
        TEXT_EMBEDDINGS: lambda handle: np.save(handle, index.text_embeddings),
        IMAGES: lambda handle: handle.write("".join(json.dumps(row) + "\n" for row in index.images).encode()),
        CAPTIONS: lambda handle: handle.write("".join(json.dumps(row) + "\n" for row in index.captions).encode()),
    }
    make_folder(folder, "--out")
    written = []
    try:
        for name, write in parts.items():
            written.append(folder / files[name])
            write_file(folder / files[name], write)
        index.manifest["files"] = files
        write_bytes(folder / MANIFEST, (json.dumps(index.manifest, indent=2) + "\n").encode())
    except OSError as error:
        remove_quietly(written)
        raise InferenceError(
            f"--out {describe(error, folder)}; the index there (if any) is unchanged and still answers"
        ) from None
    remove_quietly(folder / name for name in _old_builds(folder) if name not in files.values() and OURS.match(name))


def _old_builds(folder: Path) -> list[str]:
    return [path.name for path in folder.iterdir() if path.name != MANIFEST and not path.name.startswith(".")]
