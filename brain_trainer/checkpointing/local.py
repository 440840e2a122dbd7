"""Checkpoints in a folder on the local disk: `LocalStorage`, the only code that calls rename, link, fsync and
flock (`LocalLock`). Writes go to an exclusively created temporary, fsynced, renamed over the name, and the
folder fsynced."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from brain_trainer.checkpointing.base import LOCK_NAME, Save
from brain_trainer.checkpointing.format import CheckpointError
from brain_trainer.safe_files import pid_alive

TEMPORARY = re.compile(r"^\.(.+_brain_v2\.pt)\.tmp-(\d+)$")


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)  # on Linux, fsync through any descriptor flushes the file's pages
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # the write error is what the user needs to hear about


def _create_exclusively(path: Path) -> int:
    """A new file at `path`, never through a link or over an existing name (a planted symlink is removed first,
    and if one is planted again the create fails instead of writing through it)."""
    _remove_quietly(path)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)


class LocalLock:
    """An exclusive `flock` on `.brain_run.lock`, held for the whole run and released by the kernel when the
    process dies, however it dies. It remembers the file it locked, so a folder deleted or replaced under the
    run is noticed at the next write instead of silently recreated."""

    def __init__(self, folder: Path, holder: str):
        self.path = folder / LOCK_NAME
        try:
            self._descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as error:
            what = (
                "a symbolic link"
                if error.errno == errno.ELOOP
                else "a folder"
                if error.errno == errno.EISDIR
                else f"unusable ({error.strerror})"
            )
            raise CheckpointError(
                f"--savedir {folder}: {LOCK_NAME} is {what}; remove it, or choose another --savedir"
            ) from None
        info = os.fstat(self._descriptor)
        if not stat.S_ISREG(info.st_mode):
            os.close(self._descriptor)
            raise CheckpointError(
                f"--savedir {folder}: {LOCK_NAME} is not a regular file; remove it, or choose another --savedir"
            )
        self.identity = (info.st_dev, info.st_ino)
        try:
            fcntl.flock(self._descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder_seen = os.pread(self._descriptor, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._descriptor)
            raise CheckpointError(
                f"--savedir {folder}: another run (PID {holder_seen}) is using this folder; wait "
                f"for it to finish, stop it, or choose another --savedir"
            ) from None
        os.ftruncate(self._descriptor, 0)
        os.pwrite(self._descriptor, f"{holder}\n".encode(), 0)

    def intact(self) -> bool:
        try:
            info = os.lstat(self.path)
        except OSError:
            return False
        return (info.st_dev, info.st_ino) == self.identity

    def release(self) -> None:
        os.close(self._descriptor)  # closing the descriptor releases the flock


class LocalStorage:
    def __init__(self, folder: str):
        self.url, self.folder = str(folder), Path(folder)
        self.notes: list[str] = []
        self._lock: LocalLock | None = None

    def location(self, name: str) -> str:
        return str(self.folder / name)

    def check_writable(self, flag: str) -> None:
        existing = self.folder.absolute()
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            reason = "a file is in the way" if not existing.is_dir() else "not writable"
            raise CheckpointError(
                f"--{flag} {self.url}: cannot be written ({existing}: {reason}); choose a folder this user can write"
            )

    def prepare(self, flag: str) -> None:
        probe = self.folder / f".probe-{os.getpid()}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            descriptor = _create_exclusively(probe)
            try:
                os.write(descriptor, b"probe")
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            probe.unlink()
        except OSError as error:
            raise CheckpointError(
                f"--{flag} {self.url}: cannot be written ({error.strerror or error}); "
                f"choose a folder this user can write"
            ) from None

    def names(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted(entry.name for entry in os.scandir(self.folder) if entry.is_file(follow_symlinks=False))

    def kind(self, name: str) -> str | None:
        try:
            mode = os.lstat(self.folder / name).st_mode
        except FileNotFoundError:
            return None
        return (
            "file"
            if stat.S_ISREG(mode)
            else "link"
            if stat.S_ISLNK(mode)
            else "folder"
            if stat.S_ISDIR(mode)
            else "other"
        )

    def _temporary(self, name: str) -> Path:
        return self.folder / f".{name}.tmp-{os.getpid()}"

    def _check_lock(self) -> None:
        if self._lock is not None and not self._lock.intact():
            raise CheckpointError(
                f"--savedir {self.url}: the folder was deleted or replaced while this run held "
                f"it; nothing more is written there; resume with --resume auto once the folder "
                f"is back, or into another --savedir"
            )

    def write(self, name: str, save: Save, summary: dict[str, str] | None = None) -> None:
        """A temporary file created exclusively in the folder, written, fsynced, renamed over `name`, then the
        folder fsynced. On any failure the temporary is removed and the old `name` is intact. (A local file
        keeps no summary: reading its fields through a memory map costs next to nothing.)"""
        self._check_lock()
        temporary = self._temporary(name)
        try:
            with os.fdopen(_create_exclusively(temporary), "wb") as handle:
                save(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.folder / name)  # replaces a link at `name`, never writes through it
            _fsync(self.folder)
        except (OSError, RuntimeError) as error:
            _remove_quietly(temporary)
            raise _write_error(self, name, error) from None
        except BaseException:
            _remove_quietly(temporary)
            raise

    def publish(self, source: str, target: str) -> None:
        """A hard link to the durable `source` (no second write), or a copy where the file system refuses
        links; then renamed into place and the folder fsynced."""
        self._check_lock()
        temporary = self._temporary(target)
        try:
            _remove_quietly(temporary)
            try:
                os.link(self.folder / source, temporary, follow_symlinks=False)
            except OSError as error:
                if error.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK, errno.EOPNOTSUPP):
                    raise
                with (
                    open(self.folder / source, "rb") as reader,
                    os.fdopen(_create_exclusively(temporary), "wb") as writer,
                ):
                    shutil.copyfileobj(reader, writer, 2**22)
                    writer.flush()
                    os.fsync(writer.fileno())
            os.replace(temporary, self.folder / target)
            _fsync(self.folder)
        except OSError as error:
            _remove_quietly(temporary)
            raise _write_error(self, target, error) from None

    def summary(self, name: str) -> dict[str, str] | None:
        return None

    def remove(self, name: str) -> None:
        os.unlink(self.folder / name)

    def move_aside(self, name: str, new_name: str) -> None:
        os.link(self.folder / name, self.folder / new_name, follow_symlinks=False)  # fails rather than overwrite
        os.unlink(self.folder / name)

    def modified_ns(self, name: str) -> int:
        return os.lstat(self.folder / name).st_mtime_ns

    @contextlib.contextmanager
    def local_copy(self, name: str) -> Iterator[str]:
        yield str(self.folder / name)

    def lock(self, holder: str) -> LocalLock:
        self._lock = LocalLock(self.folder, holder)
        return self._lock

    def clean_up(self) -> list[str]:
        """Remove temporary files whose writer is gone (never a finished checkpoint, never a live writer's)."""
        stale = [
            name
            for name in self.names()
            if (match := TEMPORARY.match(name)) and int(match[2]) != os.getpid() and not pid_alive(int(match[2]))
        ]
        for name in stale:
            _remove_quietly(self.folder / name)
        return stale


def _write_error(storage: LocalStorage, name: str, error: Exception) -> CheckpointError:
    path = storage.folder / name
    if isinstance(error, OSError):
        reason = error.strerror or str(error)
    else:  # torch wraps a failed write (a full disk among them) in a RuntimeError
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        free = shutil.disk_usage(storage.folder).free if storage.folder.is_dir() else -1
        if 0 <= free < 64 * 2**20:
            reason = f"No space left on device ({reason})"
    kept = f"the previous {name} is intact" if storage.kind(name) == "file" else f"no {name} was there before"
    fix = (
        "free some space or choose another --savedir"
        if "space" in reason.lower()
        else "check the folder's permissions and file system, or choose another --savedir"
    )
    return CheckpointError(f"could not write {path}: {reason}; {kept}; {fix}")
