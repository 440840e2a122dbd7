"""What every storage of checkpoints is: the `Storage` and `Lock` protocols (string names, never `Path`s, so a
URL is never mangled), `is_url`, the lock's name, and `ReadError` (every storage and the loader raise it). It
imports no storage; the local folder (`checkpointing/local.py`) and object stores (`checkpointing/object_store.py`)
implement it, and `checkpointing/storage.py` picks one for a path or URL.

What every storage promises:
- `write` makes a name appear whole or not at all: a crash at any instant leaves the previous object;
- `publish` gives another name the same bytes, atomically, and only from a complete object;
- `names` lists regular files only (a folder, a link or a special file with a checkpoint's name is not one);
- nothing is written through a name someone planted: temporaries are created exclusively, never followed;
- `lock` makes the folder this run's until `release` (or the process's death, or the lock's expiry).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import BinaryIO, Protocol

from brain_trainer.checkpointing.format import CheckpointError

LOCK_NAME = ".brain_run.lock"
Save = Callable[[BinaryIO], None]


class ReadError(CheckpointError):
    """The bytes could not be read (an I/O error, no memory for them, a store that did not answer, a download
    that could not be kept): nothing is known about the file itself, so nothing is set aside for this; the run
    stops with the line (exit 2). Both the local folder and object stores raise it."""


class Lock(Protocol):
    def release(self) -> None: ...


class Storage(Protocol):
    """A checkpoint folder: `url` as the user gave it, entries by name."""

    url: str
    notes: list[str]  # lines for the run log (a lock taken over)

    def location(self, name: str) -> str: ...  # the entry's path or URL, for messages and loading
    def check_writable(self, flag: str) -> None: ...  # could the folder be created and written? creates nothing
    def prepare(self, flag: str) -> None: ...  # create the folder and prove it can be written
    def names(self) -> list[str]: ...  # regular files in the folder
    def kind(self, name: str) -> str | None: ...  # "file", "folder", "link", "other" or None (absent)
    def write(self, name: str, save: Save, summary: dict[str, str] | None = None) -> None: ...  # whole or not at all
    def summary(self, name: str) -> dict[str, str] | None: ...  # what `write` kept beside it, where it can
    def publish(self, source: str, target: str) -> None: ...  # target = source's bytes, atomically
    def remove(self, name: str) -> None: ...
    def move_aside(self, name: str, new_name: str) -> None: ...
    def modified_ns(self, name: str) -> int: ...
    def local_copy(self, name: str) -> contextlib.AbstractContextManager[str]: ...  # a local file to torch.load
    def lock(self, holder: str) -> Lock: ...
    def clean_up(self) -> list[str]: ...  # leftovers of writers that are gone


def is_url(location: str) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")
