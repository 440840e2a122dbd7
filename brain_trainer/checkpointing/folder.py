"""The checkpoint folder's policy, over any storage: one run per folder (the lock), consent before replacing
another run's checkpoints, lineage-aware discovery for `--resume auto`, unreadable files moved aside (never
overwritten or deleted), and rotation of the epoch snapshots."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone

from brain_trainer.checkpointing.base import Lock, ReadError, Storage, is_url
from brain_trainer.checkpointing.format import (
    BEST,
    LAST,
    SNAPSHOT,
    CheckpointError,
    global_step_or,
    recency,
    summary_recency,
)
from brain_trainer.checkpointing.loading import read_checkpoint
from brain_trainer.checkpointing.storage import locate

Log = Callable[[str], None]


def checkpoint_names(storage: Storage) -> list[str]:
    """The checkpoint files in the folder: last, the kept epoch snapshots, best (regular files only)."""
    present = set(storage.names())
    snapshots = sorted(name for name in present if SNAPSHOT.match(name))
    return [name for name in [LAST, *snapshots, BEST] if name in present]


def check_names(storage: Storage) -> None:
    """A checkpoint's name taken by something that is not a file (a folder, a link, a device) would fail the
    first save after a whole epoch: refuse it at startup."""
    for name in (LAST, BEST):
        kind = storage.kind(name)
        if kind not in (None, "file"):
            what = {"folder": "a folder", "link": "a link"}.get(kind, "a special file (a pipe, socket or device)")
            raise CheckpointError(
                f"--savedir {storage.url}: {name} is {what}, not a checkpoint file; move it "
                f"away, or choose another --savedir"
            )


@dataclass
class Discovery:
    location: str | None  # the checkpoint to resume (path or URL), if any
    unreadable: list[tuple[str, str]]  # names that could not be read, with why: set aside, never overwritten


def find_latest_checkpoint(storage: Storage, log: Log = print) -> Discovery:
    """`--resume auto`: the newest checkpoint of the newest run in the folder (its lineage, see `recency`).
    Files that fail to load are named in a ⚠ line and returned as unreadable."""
    newest, newest_key, unreadable = None, None, []
    for name in checkpoint_names(storage):
        try:
            key = summary_recency(storage.summary(name) or {}, name) or recency(
                read_checkpoint(storage, name, mmap=True), name
            )
        except ReadError:
            raise  # the reading or the store failed, not the file: nothing is moved aside, the run stops with the line
        except CheckpointError as error:
            log(f"⚠ Skipping {error}")
            unreadable.append((name, str(error).removeprefix(f"{storage.location(name)}: ")))
            continue
        if newest_key is None or key > newest_key:
            newest, newest_key = name, key
    return Discovery(storage.location(newest) if newest else None, unreadable)


def checkpoint_in_folder(storage: Storage) -> str:
    """`--resume FOLDER`: its newest checkpoint (as `--resume auto` chooses), or an error naming the folder."""
    found = find_latest_checkpoint(storage, log=lambda line: None)
    if found.location is None:
        detail = f" it can read ({found.unreadable[0][1]})" if found.unreadable else ""
        raise CheckpointError(
            f"{storage.url}: folder holds no {LAST}, {BEST} or epoch snapshot{detail}; "
            f"pass a checkpoint file to --resume"
        )
    return found.location


def set_aside(storage: Storage, name: str, reason: str, log: Log = print) -> str:
    """Move a checkpoint that cannot be read out of the way under a name that says why; never delete it."""
    target = f"{name}.unreadable-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}"
    storage.move_aside(name, target)
    log(f"⚠ Moved {storage.location(name)} aside to {target} ({reason}); it is kept, never overwritten")
    return target


def _same_folder(resume: str, storage: Storage) -> bool:
    resumed_from, _ = locate(resume)
    if is_url(resume) or is_url(storage.url):
        return resumed_from.url.rstrip("/") == storage.url.rstrip("/")
    return os.path.realpath(resumed_from.url) == os.path.realpath(storage.url)


def _newest_step(storage: Storage, names: list[str]) -> str:
    steps = []
    for name in names:
        try:
            summary = summary_recency(storage.summary(name) or {}, name)
            steps.append(summary[1] if summary else global_step_or(read_checkpoint(storage, name, mmap=True), -1))
        except CheckpointError:
            continue
    return str(max(steps)) if steps else "unknown"


def _check_consent(storage: Storage, resume: str | None, overwrite: bool) -> None:
    """Another run's checkpoints are replaced only with consent: --resume from this folder, or --overwrite."""
    existing = checkpoint_names(storage)
    foreign = resume is None or not _same_folder(resume, storage)
    if not existing or not foreign or overwrite:
        return
    names = ", ".join(existing)
    if resume is None:
        raise CheckpointError(
            f"--savedir {storage.url} already holds a run's checkpoints ({names}; newest "
            f"at step {_newest_step(storage, existing)}); continue it with --resume auto "
            f"(and a larger --epochs if it has finished), or pass --overwrite to replace "
            f"them, or choose another --savedir"
        )
    raise CheckpointError(
        f"--savedir {storage.url} holds another run's checkpoints ({names}), which this "
        f"run would replace as it saves; pass --overwrite to allow it, or choose another "
        f"--savedir"
    )


def claim_savedir(
    storage: Storage, *, resume: str | None, overwrite: bool, unreadable: list[tuple[str, str]], log: Log = print
) -> Lock:
    """Make the folder this run's: writable, locked, unreadable files set aside, stale temporaries removed, and
    another run's checkpoints replaced only with consent (--resume from this folder, or --overwrite). The lock
    is released if any of that fails."""
    storage.prepare("savedir")
    lock = storage.lock(f"{os.getpid()} on {socket.gethostname()}")
    with ExitStack() as until_claimed:
        until_claimed.callback(lock.release)
        for note in storage.notes:
            log(note)
        check_names(storage)
        for name, reason in unreadable:
            if storage.kind(name) == "file":
                set_aside(storage, name, reason, log)
        _check_consent(storage, resume, overwrite)
        storage.clean_up()
        until_claimed.pop_all()  # claimed: the run holds the lock from here
    return lock


def rotate_snapshots(storage: Storage, keep_last: int, keep: str | None = None) -> list[str]:
    """Delete all but the `keep_last` most recently written epoch snapshots (by modification time, not by epoch
    number: after a resume from an older checkpoint, the abandoned run's higher numbers are older), and never
    delete `keep`, the one just written. last and best never match the pattern; only regular files count."""
    if keep_last <= 0:
        return []  # no rotation asked for: nothing is deleted
    snapshots = sorted((storage.modified_ns(name), name) for name in storage.names() if SNAPSHOT.match(name))
    newest = {name for _, name in snapshots[-keep_last:]}
    doomed = [name for _, name in snapshots if name not in newest and name != keep]
    for name in doomed:
        storage.remove(name)
    return doomed
