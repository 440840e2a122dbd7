"""Which storage a path or URL names: `open_storage` (a folder, or a prefix of an object store) and `locate`
(a file's storage and its name there). The interface is `checkpointing/base.py`; the local folder is
`checkpointing/local.py`, object stores `checkpointing/object_store.py`. Everything above (the writer, the
folder's policy, loading) says what to do with a name, never how a storage does it."""

from __future__ import annotations

import os
from pathlib import Path

from brain_trainer.checkpointing.base import LOCK_NAME, Lock, Save, Storage, is_url
from brain_trainer.checkpointing.local import LocalLock, LocalStorage
from brain_trainer.checkpointing.object_store import LOCK_EXPIRY_S, ObjectStorage

__all__ = [
    "LOCK_NAME",
    "LocalLock",
    "LocalStorage",
    "Lock",
    "ObjectStorage",
    "Save",
    "Storage",
    "is_url",
    "locate",
    "open_storage",
]


def open_storage(
    url: str | os.PathLike, storage_options: dict | None = None, lock_expiry: float | None = None
) -> Storage:
    """The storage of a folder or prefix: `s3://...` (and other fsspec URLs) or a local path (`file://` too).
    `lock_expiry` (seconds) applies to object stores, whose lock cannot die with the process."""
    url = str(url)
    if is_url(url):
        return ObjectStorage(url, storage_options or {}, lock_expiry or LOCK_EXPIRY_S)
    return LocalStorage(url.removeprefix("file://"))


def locate(location: str | os.PathLike, storage_options: dict | None = None) -> tuple[Storage, str]:
    """A file's storage (its folder) and its name there."""
    location = str(location)
    if is_url(location):
        parent, _, name = location.rstrip("/").rpartition("/")
        return open_storage(parent, storage_options), name
    path = Path(location.removeprefix("file://"))
    return LocalStorage(str(path.parent)), path.name
