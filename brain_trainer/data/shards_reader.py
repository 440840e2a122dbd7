"""Reading samples out of shards by the index's offsets, and the training dataset over them.

Local shards are read in place (one `pread` of the image's bytes). Remote shards go through a bounded local
cache of whole shards (`--shard_cache_gb`): a shard is downloaded once per machine, under a file lock that
the loader workers and the processes sharing the cache folder respect, then read like a local one; the least
recently used shards are evicted past the bound, never those of the windows being read. When the dataset
starts a window it asks for the next window's shards ahead. With a cache of 0 GB each image is a ranged read
of its own bytes instead. A short read (a truncated shard) or an image that does not decode raises
`UnreadableImage`, which the dataset substitutes and counts like an unreadable file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from brain_trainer.data.annotations import DatasetError
from brain_trainer.data.augment import TrainAugment
from brain_trainer.data.images import UnreadableImage, decode_image
from brain_trainer.data.shards import ShardError, ShardIndex, ShardInfo, filesystem, is_remote, reason
from brain_trainer.data.shards_order import ShardOrder
from brain_trainer.runtime.seeding import derive_seed
from brain_trainer.safe_files import pid_alive

OPEN_FILES = 32  # local shard files kept open per reader
DOWNLOAD_THREADS = 2  # shards fetched ahead at once, per reader


def decode_sample(data: bytes, name: str) -> torch.Tensor:
    """The image bytes as uint8 RGB (3, H, W), EXIF-upright, by the files' decoder; UnreadableImage naming the
    sample when they do not decode."""
    try:
        return decode_image(io.BytesIO(data))
    except UnreadableImage as error:
        raise UnreadableImage(f"{name}: {error.__cause__}") from None


def minimum_cache_bytes(shards: list[ShardInfo], window: int) -> int:
    """The smallest cache that holds what the loader workers read at once: three windows of the largest shards
    (the window being read, the one fetched ahead, and a worker already one further)."""
    return 3 * window * max(shard.size for shard in shards)


class ShardCache:
    """A machine's bounded local copy of remote shards, shared by its processes and loader workers (file locks):
    least recently used shards are evicted, the windows being read (`keep`) never."""

    def __init__(self, folder: Path, capacity: int, shards: list[ShardInfo], *, get):
        self.folder, self.capacity, self.shards = folder, capacity, shards
        self.get = get  # (ShardInfo, partial path) -> None: the download itself, counted by the reader
        self.keep: set[int] = set()  # shards of the windows being read: never evicted

    def path(self, shard: int) -> Path:
        info = self.shards[shard]
        digest = hashlib.sha256(f"{info.url}\t{info.size}\t{info.version}".encode()).hexdigest()[:24]
        return self.folder / f"{digest}.tar"

    @contextlib.contextmanager
    def lock(self):
        """The cache folder's own lock: looking, reserving, publishing and evicting happen one at a time over every
        process and worker sharing the folder (a download itself runs outside it)."""
        with open(self.folder / ".cache.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def ensure(self, shard: int, open_it: bool) -> int | None:
        """Make sure the shard is in the cache (one download per machine: a second asker waits on the shard's
        lock, then finds it); an open descriptor of it when `open_it` (opened under the cache's lock, so an
        eviction cannot come between; a removed file stays readable through it)."""
        info, target = self.shards[shard], self.path(shard)
        partial = target.with_suffix(f".part-{os.getpid()}")
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(target.with_suffix(".lock"), "a") as shard_lock:
            fcntl.flock(shard_lock, fcntl.LOCK_EX)
            with self.lock():
                if target.exists():
                    os.utime(target)  # recently used
                    return os.open(target, os.O_RDONLY) if open_it else None
                self._make_room(partial, info.size)
            self.get(info, partial)
            with self.lock():
                os.replace(partial, target)
                return os.open(target, os.O_RDONLY) if open_it else None

    def _make_room(self, partial: Path, size: int) -> None:
        """Evict least recently used shards until `size` more bytes fit the bound and reserve them (`partial`, that
        long, counts in every other eviction); called under the cache's lock. The windows being read are kept."""
        keep = {self.path(shard).name for shard in self.keep}
        cached, total = [], 0
        for path in self.folder.iterdir():
            if ".part-" in path.name and not pid_alive(int(path.name.rpartition("-")[2])):
                path.unlink(missing_ok=True)  # a download whose process was killed
            elif path.suffix == ".tar" or ".part-" in path.name:
                stat = path.stat()
                total += stat.st_size
                cached += [(stat.st_mtime_ns, stat.st_size, path)] if path.suffix == ".tar" else []
        for _, cached_size, path in sorted(cached):
            if total + size <= self.capacity:
                break
            if path.name not in keep:
                path.unlink()
                total -= cached_size
        with open(partial, "wb") as reserved:
            reserved.truncate(size)


class ShardReader:
    """Image bytes by (shard, offset, size); counts the bytes it read from the shards' storage."""

    def __init__(self, shards: list[ShardInfo], *, storage_options: dict, cache_dir: Path, cache_bytes: int):
        self.shards, self.storage_options = shards, storage_options
        self.remote = is_remote(shards[0].url)
        self.cache_bytes = cache_bytes
        self.cache = ShardCache(Path(cache_dir), cache_bytes, shards, get=self._get)
        self.bytes_read = 0  # from the shards' storage: a disk's reads, a store's downloads or ranges
        self._counting = threading.Lock()  # fetching threads add to it too
        self._files: OrderedDict[int, int] = OrderedDict()  # shard -> open descriptor
        self._fs = None  # opened lazily: each loader worker makes its own client
        self._pool: ThreadPoolExecutor | None = None
        self._fetching: dict[int, Future] = {}

    def __getstate__(self) -> dict:  # loader workers get no open files, client or threads
        return {
            **self.__dict__,
            "_files": OrderedDict(),
            "_counting": threading.Lock(),
            "_fs": None,
            "_pool": None,
            "_fetching": {},
        }

    def _count(self, size: int) -> None:
        with self._counting:
            self.bytes_read += size

    def fs(self):
        if self._fs is None:
            self._fs = filesystem(self.shards[0].url, self.storage_options)[0]
        return self._fs

    def read(self, shard: int, offset: int, size: int) -> bytes:
        if self.remote and not self.cache_bytes:
            data = self._ranged(shard, offset, size)
        else:
            data = os.pread(self._descriptor(shard), size, offset)
            self._count(0 if self.remote else len(data))  # a cached shard's bytes are counted when downloaded
        if len(data) < size:
            raise UnreadableImage(f"{self.shards[shard].name}: ends at byte {offset + len(data)} inside a sample")
        return data

    def _ranged(self, shard: int, offset: int, size: int) -> bytes:
        info = self.shards[shard]
        try:
            data = self.fs().cat_file(self.fs()._strip_protocol(info.url), start=offset, end=offset + size)
        except Exception as error:
            raise ShardError(f"{info.url}: cannot be read ({reason(error)})") from None
        self._count(len(data))
        return data

    def _descriptor(self, shard: int) -> int:
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard]
        if self.remote:
            self._files[shard] = self.fetch(shard)
        else:
            try:
                self._files[shard] = os.open(self.shards[shard].url.removeprefix("file://"), os.O_RDONLY)
            except FileNotFoundError:
                raise ShardError(f"{self.shards[shard].url}: no such shard (it disappeared during the run)") from None
        if len(self._files) > OPEN_FILES:
            os.close(self._files.popitem(last=False)[1])
        return self._files[shard]

    def prefetch(self, shards) -> None:
        """Start downloading `shards` into the cache without waiting (remote shards with a cache only)."""
        if not (self.remote and self.cache_bytes):
            return
        self._pool = self._pool or ThreadPoolExecutor(DOWNLOAD_THREADS, thread_name_prefix="shard-fetch")
        for shard in shards:
            if shard not in self._fetching or self._fetching[shard].done():
                self._fetching[shard] = self._pool.submit(self.cache.ensure, int(shard), False)

    def fetch(self, shard: int) -> int:
        """An open descriptor of the shard's local copy, downloaded now unless it is cached (or fetched ahead)."""
        pending = self._fetching.pop(shard, None)
        if pending is not None:
            pending.result()  # its error, if the download failed
        return self.cache.ensure(shard, True)

    def _get(self, info: ShardInfo, partial: Path) -> None:
        try:
            self.fs().get_file(self.fs()._strip_protocol(info.url), str(partial))
        except Exception as error:
            partial.unlink(missing_ok=True)
            raise ShardError(f"{info.url}: cannot be downloaded ({reason(error)})") from None
        size = partial.stat().st_size
        self._count(size)
        if size != info.size:
            partial.unlink()
            raise ShardError(
                f"{info.url}: is {info.size} bytes in the index but {size} now; the shard changed during the "
                f"run: restart it (the index is rebuilt) or restore the shard"
            )

    def close(self) -> None:
        """Close the files and join the fetching threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._fetching = None, {}
        while self._files:
            os.close(self._files.popitem()[1])


class ShardImages:
    """The images of an index, each once: an image source for evaluation (image i is that of its first sample)."""

    def __init__(self, index: ShardIndex, reader: ShardReader):
        self.index, self.reader = index, reader
        self.first = self.first_samples(index.image_of())

    @staticmethod
    def first_samples(image_of: np.ndarray) -> np.ndarray:
        """The first sample of each image, given each sample's image number."""
        return np.flatnonzero(np.diff(image_of, prepend=-1))

    def __len__(self) -> int:
        return len(self.first)

    def load(self, image_index: int) -> torch.Tensor:
        sample = int(self.first[image_index])
        index = self.index
        data = self.reader.read(int(index.shard_of[sample]), int(index.offset[sample]), int(index.size[sample]))
        return decode_sample(data, index.sample_name(sample))


class ShardDataset(Dataset):
    """Training samples from shards. A key is (epoch, sample id, window) from `ShardSampler`: the augmentation of
    sample i in epoch e is seeded by (seed, e, i) alone, as for files. A sample that cannot be read is replaced
    by the next readable sample id (image and caption together) and reported in `bad_files`."""

    def __init__(self, index: ShardIndex, reader: ShardReader, order: ShardOrder, augment: TrainAugment, seed: int):
        self.index, self.reader, self.order, self.augment, self.seed = index, reader, order, augment, seed
        self._window: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.index)

    def _entering(self, epoch: int, window: int) -> None:
        windows = self.order.windows(epoch)
        ahead = windows[window + 1] if window + 1 < len(windows) else []
        self.reader.cache.keep = {int(s) for s in [*windows[window], *ahead]}
        self.reader.prefetch(ahead)
        self._window = (epoch, window)

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        epoch, index, window = key
        if self._window != (epoch, window):
            self._entering(epoch, window)
        bad_files = []
        for candidate in range(index, index + len(self)):
            sample = candidate % len(self)
            name = self.index.sample_name(sample)
            if name in bad_files:
                continue  # the same unreadable image under its next caption
            try:
                shard, offset, size = (
                    int(self.index.shard_of[sample]),
                    int(self.index.offset[sample]),
                    int(self.index.size[sample]),
                )
                data = self.reader.read(shard, offset, size)
                pixels = decode_sample(data, name)
                break
            except UnreadableImage:
                bad_files.append(name)
        else:
            raise DatasetError("no image of the training shards can be read")
        return {
            "image": self.augment(pixels, derive_seed(self.seed, epoch, index)),
            "caption": self.index.captions[sample],
            "bad_files": bad_files,
        }
