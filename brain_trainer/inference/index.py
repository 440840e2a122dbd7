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
        files = build_files(manifest)
        index = Index(
            manifest,
            _read_jsonl(folder / files[IMAGES]),
            np.load(folder / files[IMAGE_EMBEDDINGS]),
            _read_jsonl(folder / files[CAPTIONS]),
            np.load(folder / files[TEXT_EMBEDDINGS]),
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
