"""WebDataset shards: the URL list (brace patterns joined with `::`, local paths or fsspec URLs such as `s3://`),
each shard's identity (size and mtime or ETag) and the index, built once.

A sample is the members of a shard sharing a key (webdataset's rule: the name up to the first dot of its base
name): an image (`jpg`, `jpeg`, `png`, `webp`) and captions, from `json`'s `captions` list, else the `txt`
member, else `json`'s `caption`. A sample with several captions is one sample per caption, as for Flickr8k.

The index of a shard (each sample's key, image offset and size, captions) is one JSON file in the index folder,
named by a hash of the shard's URL and valid while the shard's size and version (mtime or ETag) are those it
records; a changed shard is indexed again. The epoch length, the steps per epoch and the skip to a mid-epoch
position are then known without reading the data.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from brain_trainer.data.annotations import DatasetError

INDEX_FORMAT = 1
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
INDEX_THREADS = 8  # shards indexed at once: a store's latency, not the CPU, bounds indexing


class ShardError(DatasetError):
    """A user mistake or an unreachable store with the shards: one line naming the URL and the fix."""

    def __init__(self, line: str):
        # Raised in a loader worker, it comes back as ShardError("Caught ShardError in DataLoader worker ...
        # Original Traceback ... ShardError: LINE") (torch's ExceptionWrapper): keep the one line.
        if line.startswith("Caught ShardError"):
            line = line.rstrip().rpartition("ShardError: ")[2]
        super().__init__(line)


@dataclass(frozen=True)
class ShardInfo:
    url: str
    size: int
    version: str  # the mtime in ns of a local file, the ETag of an object

    @property
    def name(self) -> str:
        return posixpath.basename(self.url)


def expand_pattern(pattern: str, flag: str = "--train_shards") -> list[str]:
    """The shard URLs of `pattern`: brace ranges (`{00000..00099}`) and lists, several patterns joined by `::`."""
    try:
        from webdataset.shardlists import expand_urls
    except ImportError:
        raise ShardError(f"{flag}: reading shards needs webdataset: pip install 'brain-trainer[shards]'") from None
    try:
        urls = [url for url in expand_urls(pattern) if url]
    except ValueError as error:  # braceexpand's UnbalancedBracesError and a range it cannot read
        raise ShardError(f"{flag} {pattern!r}: {error}; give e.g. 'data/cc/{{00000..00099}}.tar'") from None
    if not urls:
        raise ShardError(f"{flag} {pattern!r}: names no shard; give e.g. 'data/cc/{{00000..00099}}.tar'")
    return urls


def where(flag: str, url: str) -> str:
    """How a line names a shard: after the flag that gave it, if one did."""
    return f"{flag} {url}" if flag else url


def is_remote(url: str) -> bool:
    """Whether a shard is read through a store's client (and the shard cache) rather than from a local file."""
    return "://" in url and not url.startswith("file://")


def reason(error: BaseException) -> str:
    """What went wrong with a store, in words a user can act on (the checkpoints' wording)."""
    from brain_trainer.checkpointing.object_store import _reason

    return _reason(error)


def filesystem(url: str, storage_options: dict):
    """(fsspec filesystem, path) of a URL or local path, with a client of its own, as the checkpoints open it."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, skip_instance_cache=True, **(storage_options if "://" in url else {}))
    except ImportError:
        package = "s3fs" if url.startswith("s3://") else "the fsspec backend for this URL"
        raise ShardError(f"{url}: needs {package}: pip install 'brain-trainer[shards,s3]'") from None
    except (ValueError, TypeError) as error:
        raise ShardError(f"{url}: {error}; check the URL and --storage_options") from None


def _version(entry: dict, path: str, local: bool) -> str:
    if local:
        return str(os.stat(path).st_mtime_ns)  # ns, not fsspec's float seconds: a rewrite within a second shows
    return str(entry.get("ETag") or entry.get("etag") or entry.get("mtime") or entry.get("LastModified"))


def stat_shards(urls: list[str], *, storage_options: dict, flag: str = "--train_shards") -> list[ShardInfo]:
    """Each shard's size and version, from one listing per folder (not one request per shard). A missing shard
    or an unreachable store is one ShardError naming the URL."""
    fs, _ = filesystem(urls[0], storage_options)
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    listings: dict[str, dict[str, dict]] = {}
    shards = []
    for url in urls:
        path = fs._strip_protocol(url)
        parent = posixpath.dirname(path)
        if parent not in listings:
            try:
                listings[parent] = {fs._strip_protocol(e["name"]): e for e in fs.ls(parent, detail=True, refresh=True)}
            except FileNotFoundError:
                listings[parent] = {}
            except Exception as error:
                raise ShardError(f"{where(flag, url)}: cannot be reached ({reason(error)})") from None
        entry = listings[parent].get(path)
        if entry is None or entry.get("type") != "file":
            raise ShardError(
                f"{where(flag, url)}: no such shard; check the pattern (and the bucket) or write the shards"
            )
        shards.append(ShardInfo(url, int(entry["size"]), _version(entry, path, local)))
    return shards


# ----------------------------------------------------------------------------- one shard's index


def _captions(members: dict[str, bytes]) -> list[str]:
    meta = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8", "replace"))
        except ValueError:
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
    if isinstance(meta.get("captions"), list):
        found = [c for c in meta["captions"] if isinstance(c, str)]
    elif "txt" in members:
        found = [members["txt"].decode("utf-8", "replace")]
    else:
        found = [meta["caption"]] if isinstance(meta.get("caption"), str) else []
    return [caption.strip() for caption in found if caption.strip()]


def _scan_tar(handle) -> tuple[dict[str, dict], bool]:
    """Members by key, in order: the image's (offset, size, extension), the text members' bytes. A tar that ends
    early (a truncated shard) keeps what came before, and says it is incomplete."""
    from webdataset.tariterators import base_plus_ext

    samples: dict[str, dict] = {}
    try:
        with tarfile.open(fileobj=handle, mode="r|") as tar:
            for member in tar:
                key, extension = base_plus_ext(member.name) if member.isfile() else (None, None)
                if key is None:
                    continue
                extension = extension.lower()
                sample = samples.setdefault(key, {})
                if extension in IMAGE_EXTENSIONS and "image" not in sample:
                    sample["image"] = (member.offset_data, member.size, extension)
                elif extension in ("txt", "json"):
                    sample[extension] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError):
        return samples, False
    return samples, True


def index_shard(shard: ShardInfo, *, storage_options: dict) -> dict:
    """Read one shard through once: its samples ([key, image offset, image size, captions]) and what was skipped."""
    fs, path = filesystem(shard.url, storage_options)
    try:
        with fs.open(path, "rb", block_size=8 * 2**20) as handle:
            members, complete = _scan_tar(handle)
    except FileNotFoundError:
        raise ShardError(f"{shard.url}: no such shard (it disappeared while being indexed)") from None
    except OSError as error:
        raise ShardError(f"{shard.url}: cannot be read ({reason(error)})") from None
    samples, skipped = [], Counter()
    for key, sample in members.items():
        captions = _captions(sample)
        if "image" not in sample:
            skipped["keys without an image"] += 1
        elif not captions:
            skipped["images without a caption"] += 1
        else:
            offset, size, _ = sample["image"]
            samples.append([key, offset, size, captions])
    return {
        "format": INDEX_FORMAT,
        "url": shard.url,
        "size": shard.size,
        "version": shard.version,
        "complete": complete,
        "skipped": dict(skipped),
        "samples": samples,
    }


def index_path(index_dir: Path, url: str) -> Path:
    return Path(index_dir) / f"{hashlib.sha256(url.encode()).hexdigest()[:24]}.json"


def _saved_index(path: Path, shard: ShardInfo) -> dict | None:
    """The saved index of `shard`, if it is of this format and of the shard as it is now."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    identity = {"format": INDEX_FORMAT, "url": shard.url, "size": shard.size, "version": shard.version}
    return saved if all(saved.get(key) == value for key, value in identity.items()) else None


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)  # a reader finds the old index or the whole new one, never half


# ----------------------------------------------------------------------------- the index of a shard list

TOKENIZER_CAPTIONS = 200_000  # the scratch tokenizer's sample of the training captions, at most


@dataclass
class ShardIndex:
    """Every sample of a shard list, one per caption, in shard order: shard `shard_of[i]`, image bytes at
    `offset[i]` (`size[i]` long), caption `captions[i]`. Global sample ids run through each shard contiguously."""

    shards: list[ShardInfo]
    shard_of: np.ndarray  # int32
    offset: np.ndarray  # int64
    size: np.ndarray  # int64
    keys: list[str]
    captions: list[str]
    built: int = 0  # shards indexed by this call (the others' index was reused)
    problems: list[str] = field(default_factory=list)  # truncated shards, skipped members

    def __len__(self) -> int:
        return len(self.captions)

    def samples_per_shard(self) -> np.ndarray:
        return np.bincount(self.shard_of, minlength=len(self.shards)).astype(np.int64)

    def image_of(self) -> np.ndarray:
        """Each sample's image number: the samples of one image (one per caption) are consecutive."""
        new = np.ones(len(self), dtype=bool)
        new[1:] = (np.diff(self.offset) != 0) | (np.diff(self.shard_of) != 0)
        return np.cumsum(new) - 1

    def sample_name(self, sample: int) -> str:
        return f"{self.shards[int(self.shard_of[sample])].name}/{self.keys[sample]}"

    def tokenizer_captions(self, limit: int = TOKENIZER_CAPTIONS) -> list[str]:
        """A bounded, deterministic sample of the captions for the scratch tokenizer: every k-th in shard order,
        k the smallest step that keeps at most `limit` (a function of the index alone)."""
        return self.captions[:: max(1, -(-len(self.captions) // limit))]

    def fingerprint(self) -> dict:
        """Sample count and a hash of each shard's name, size and version: tells whether a resume sees the same data."""
        digest = hashlib.sha256()
        for shard in self.shards:
            digest.update(f"{shard.name}\t{shard.size}\t{shard.version}\n".encode())
        return {"samples": len(self), "sha256": digest.hexdigest()[:16]}


def _problems(indexes: list[dict]) -> list[str]:
    lines = []
    for index in indexes:
        if not index["complete"]:
            lines.append(f"{index['url']}: truncated (the tar ends early); its last sample may be substituted")
        if index["skipped"]:
            details = ", ".join(f"{count} {what}" for what, count in sorted(index["skipped"].items()))
            lines.append(f"{index['url']}: skipped {details}")
    return lines


def load_index(
    pattern: str,
    *,
    index_dir: Path,
    storage_options: dict | None = None,
    flag: str = "--train_shards",
    progress: bool = False,
) -> ShardIndex:
    """The index of the shards of `pattern`: each shard's saved index where it matches the shard, the others
    indexed now (in parallel, with a progress bar) and saved. Raises ShardError for a missing or unreadable shard."""
    storage_options = storage_options or {}
    shards = stat_shards(expand_pattern(pattern, flag), storage_options=storage_options, flag=flag)
    indexes: list[dict | None] = [_saved_index(index_path(index_dir, shard.url), shard) for shard in shards]
    missing = [n for n, index in enumerate(indexes) if index is None]
    if missing:
        build = lambda n: index_shard(shards[n], storage_options=storage_options)
        with ThreadPoolExecutor(min(INDEX_THREADS, len(missing))) as pool:
            bar = tqdm(total=len(missing), desc="Indexing shards", unit="shard", disable=not progress)
            for n, index in zip(missing, pool.map(build, missing)):
                _write_atomic(index_path(index_dir, shards[n].url), json.dumps(index))
                indexes[n] = index
                bar.update()
            bar.close()
    rows = [(n, row) for n, index in enumerate(indexes) for row in index["samples"] for _ in row[3]]
    captions = [caption for index in indexes for row in index["samples"] for caption in row[3]]
    return ShardIndex(
        shards=shards,
        shard_of=np.array([n for n, _ in rows], dtype=np.int32),
        offset=np.array([row[1] for _, row in rows], dtype=np.int64),
        size=np.array([row[2] for _, row in rows], dtype=np.int64),
        keys=[row[0] for _, row in rows],
        captions=captions,
        built=len(missing),
        problems=_problems(indexes),
    )
