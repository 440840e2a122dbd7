"""Every file the program writes besides checkpoints (indexes, exports, sample data, a contact sheet) goes
through `write_file`: a temporary created exclusively beside the target and never through a link, written,
fsynced, then renamed over the name (a link planted there is replaced, never followed), so a file appears
whole or not at all and nothing outside the folder is ever written. `output_folder` checks an output folder
before anything is written into it: creatable, and holding no file the program did not write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO


class OutputError(Exception):
    """An output path that cannot be written: one line naming it, the reason and the fix."""


def pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs: a temporary named after a dead writer may be removed."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _reason(error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        return "No space left on device; free some space or choose another folder"
    if error.errno in (errno.ENOTDIR, errno.EEXIST) or isinstance(error, NotADirectoryError):
        return "a file is in the way of its folder; remove it or choose another path"
    return f"{error.strerror or error}; check the folder's permissions or choose another"


def describe(error: OSError, path: Path | str) -> str:
    """`path: what went wrong; the fix` for one line."""
    return f"{path}: cannot be written ({_reason(error)})"


def write_file(path: Path | str, write: Callable[[BinaryIO], object]) -> None:
    """Write `path` whole or not at all; raises OSError (nothing left behind) when it cannot.

    The new file gets the mode a plain `open` gives (0666 less the umask), not a temporary file's 0600."""
    path = Path(path)
    temporary = _temporary(path)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    fsync_folder(path.parent)


def write_bytes(path: Path | str, data: bytes) -> None:
    write_file(path, lambda handle: handle.write(data))


def fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def refuse_link(path: Path | str, flag: str) -> None:
    """A folder the program writes files into whose name a library chooses (TensorBoard's events): refused
    when it is a symbolic link, so that a planted link never redirects them."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISLNK(os.lstat(path).st_mode):
            raise OutputError(
                f"{flag} {path}: is a symbolic link; the program writes only into real folders "
                f"(pass the folder it points to, or another)"
            )


def output_folder(folder: Path, flag: str, *, ours: Callable[[str], bool], overwrite: bool) -> None:
    """Before any work, creating nothing: `folder` could be created and written (its nearest existing parent is a
    writable folder), and, where it exists, holds nothing that `ours` does not recognise as the program's own,
    unless `overwrite` (the user's consent to write beside such files, replacing the program's names)."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{flag} {folder}: {existing} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {folder}: {existing} is not writable by this user; choose another folder")
    if existing != folder.absolute():
        return  # a new folder: nothing of anyone's is there
    foreign = sorted(entry.name for entry in os.scandir(folder) if not ours(entry.name))
    if foreign and not overwrite:
        raise OutputError(
            f"{flag} {folder}: holds files this program did not write ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); choose an empty or new folder, or pass --overwrite "
            f"to write beside them (files of the same names are replaced)"
        )


def make_folder(folder: Path, flag: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{flag} {folder}: a file is in the way (not a folder); choose a folder path") from None
    except OSError as error:
        raise OutputError(f"{flag} {describe(error, folder)}") from None


@contextlib.contextmanager
def private_folder(parent: Path) -> Iterator[Path]:
    """A new folder inside `parent` that only this user can enter, removed afterwards: for files whose writing a
    library does itself (ONNX, a tokenizer's folder), so that no link can be planted at their names."""
    scratch = Path(tempfile.mkdtemp(prefix=".scratch-", dir=parent))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def publish(source: Path, target: Path) -> None:
    """Move a finished file or folder from a private folder to its name (a link or an older copy there is
    replaced, never followed)."""
    if source.is_dir() and (target.is_symlink() or target.is_dir()):
        remove_quietly([target])
    os.replace(source, target)
    fsync_folder(target.parent)


def remove_quietly(paths: Iterable[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
