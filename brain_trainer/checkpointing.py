"""Checkpoints: the schema (format 3), atomic saves, a background writer that never stalls training for
long, safe loads of new and legacy files, strict then non-strict weight loading, RNG capture and restore,
one run per folder (a lock), lineage-aware `--resume auto`, and an inspect/convert CLI.

Contract: every file written here loads with `torch.load(path, weights_only=True)` (plain containers,
numbers, strings and tensors only); every write is atomic (a crash at any instant leaves the previous
file); nothing here deletes or overwrites a good checkpoint except by an atomic replace with a new one of
the same run, or with the user's consent (`--overwrite`); a file that cannot be read is moved aside, never
replaced; user-facing failures raise `CheckpointError` with one line naming the file and the fix.

    python checkpointing.py inspect checkpoints_brain_v2/last_brain_v2.pt
    python checkpointing.py convert old_weights.pt converted_brain_v2.pt [--trust]
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import math
import os
import pickle
import random
import re
import shutil
import sys
import time
import warnings
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

FORMAT_VERSION = 3
READABLE_FORMATS = (2, 3)
LAST, BEST = "last_brain_v2.pt", "best_brain_v2.pt"
SNAPSHOT = re.compile(r"^epoch_(\d+)_brain_v2\.pt$")
TEMPORARY = re.compile(r"^\.(.+_brain_v2\.pt)\.tmp-(\d+)$")
LOCK_FILE = ".brain_run.lock"
WEIGHT_KEYS = ("model_state_dict", "state_dict", "model")
RULE = "=" * 60
Log = Callable[[str], None]


class CheckpointError(Exception):
    """A checkpoint the user pointed at cannot be used, or cannot be written: one line naming the file and
    what to do."""


def snapshot_name(epoch: int) -> str:
    return f"epoch_{epoch:03d}_brain_v2.pt"


def checkpoint_names(savedir: Path) -> list[Path]:
    """The checkpoint files in `savedir`: last, the kept epoch snapshots, best."""
    savedir = Path(savedir)
    if not savedir.is_dir():
        return []
    names = [LAST] + sorted(p.name for p in savedir.iterdir() if SNAPSHOT.match(p.name)) + [BEST]
    return [savedir / name for name in names if (savedir / name).is_file()]


# ----------------------------------------------------------------------------- RNG

def capture_rng_state() -> dict:
    """Python, numpy, torch CPU and every CUDA device's RNG, as tensors and plain numbers. Draws nothing."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": py_gauss},
        "numpy": {"bit_generator": np_name, "state": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict) -> None:
    python, numpy_state = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss_next"]))
    np.random.set_state((numpy_state["bit_generator"], numpy_state["state"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        devices = min(len(state["cuda"]), torch.cuda.device_count())
        torch.cuda.set_rng_state_all(state["cuda"][:devices])


def rng_states_of(checkpoint: dict) -> list[dict]:
    """Every process's RNG state: format 3 keeps a list, one per rank; format 2 one dict (one process)."""
    saved = checkpoint.get("rng_state")
    if isinstance(saved, dict):
        return [saved]
    return list(saved or [])


# ----------------------------------------------------------------------------- the schema

def make_checkpoint(*, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    train_state: dict, config: dict, tokenizer: str | None, rng_states: list[dict],
                    run: dict) -> dict:
    """The format-3 checkpoint of a run. `model` must be the unwrapped, uncompiled module; `train_state` is
    `TrainState.state_dict()` (epoch, global_step, best_val, val_loss, data_state); `rng_states` holds one
    state per process, in rank order; `run` is this run's lineage (id, parent, started_ns)."""
    import transformers

    checkpoint = {
        "format_version": FORMAT_VERSION,
        **train_state,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "config": dict(config),
        "rng_state": rng_states,
        "world_size": len(rng_states),
        "tokenizer": tokenizer,
        "run": dict(run),
        "versions": {"torch": str(torch.__version__), "transformers": str(transformers.__version__)},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if scaler.is_enabled():
        checkpoint["scaler_state_dict"] = scaler.state_dict()
    return checkpoint


def _fail(path: Path, field: str, value, expected: str) -> None:
    raise CheckpointError(f"{path}: field '{field}' is {value!r} (expected {expected}); the file is damaged: "
                          f"resume from another checkpoint")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_fields(checkpoint: dict, path: Path) -> None:
    """Refuse a full checkpoint whose fields have the wrong types or ranges, at startup, in one line."""
    version = checkpoint.get("format_version", 2)
    if not _is_int(version) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {version!r} was written by a newer brain-trainer (this one reads "
                              f"formats up to {FORMAT_VERSION}); upgrade brain-trainer to resume it")
    if not _is_int(checkpoint["epoch"]) or checkpoint["epoch"] < -1:
        _fail(path, "epoch", checkpoint["epoch"], "an integer >= -1")
    step = checkpoint.get("global_step", 0)
    if not _is_int(step) or step < 0:
        _fail(path, "global_step", step, "an integer >= 0")
    for name in ("best_val", "val_loss"):
        value = checkpoint.get(name)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)):
            _fail(path, name, value, "a finite number or None")
    data_state = checkpoint.get("data_state")
    if data_state is not None:
        if not isinstance(data_state, dict):
            _fail(path, "data_state", data_state, "a dict")
        for name in ("epoch", "samples_seen"):
            value = data_state.get(name)
            if not _is_int(value) or value < 0:
                _fail(path, f"data_state.{name}", value, "an integer >= 0")
    if checkpoint.get("config") is not None and not isinstance(checkpoint["config"], dict):
        _fail(path, "config", checkpoint["config"], "a dict")
    for index, state in enumerate(rng_states_of(checkpoint) if isinstance(checkpoint.get("rng_state"), (dict, list)) else []):
        if not (isinstance(state, dict) and isinstance(state.get("torch"), torch.Tensor) and isinstance(state.get("python"), dict)
                and isinstance(state.get("numpy"), dict) and isinstance(state.get("cuda"), list)):
            _fail(path, f"rng_state[{index}]", type(state).__name__, "a dict of python, numpy, torch and cuda states")
    if checkpoint.get("rng_state") is not None and not isinstance(checkpoint["rng_state"], (dict, list)):
        _fail(path, "rng_state", type(checkpoint["rng_state"]).__name__, "a dict or a list of dicts")
    if checkpoint.get("tokenizer") is not None and not isinstance(checkpoint["tokenizer"], str):
        _fail(path, "tokenizer", type(checkpoint["tokenizer"]).__name__, "the tokenizer's JSON text or None")


def nonfinite_tensors(weights: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, tensor in weights.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]


# ----------------------------------------------------------------------------- atomic writes

def _fsync_folder(folder: Path) -> None:
    _fsync_file(folder)


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)  # on Linux, fsync through any descriptor flushes the file's pages
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _write_error(path: Path, error: Exception) -> CheckpointError:
    if isinstance(error, OSError):
        reason = error.strerror or str(error)
    else:  # torch wraps a failed write (a full disk among them) in a RuntimeError
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else -1
        if 0 <= free < 64 * 2**20:
            reason = f"No space left on device ({reason})"
    return CheckpointError(f"could not write {path}: {reason}; the previous {path.name} is intact; "
                           f"free some space or choose another --savedir")


def save_checkpoint(checkpoint: dict, path: Path) -> None:
    """Write atomically: a temporary file in the same folder, flushed and fsynced, then `os.replace`d,
    then the folder fsynced. On any failure the temporary file is removed and the old `path` is intact."""
    path = Path(path)
    temporary = _temporary(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint, temporary)  # given a path, torch writes from C++, faster than through a Python file
        _fsync_file(temporary)
        os.replace(temporary, path)
        _fsync_folder(path.parent)
    except (OSError, RuntimeError) as error:
        _remove_quietly(temporary)
        raise _write_error(path, error) from None
    except BaseException:
        _remove_quietly(temporary)
        raise


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # the write error is what the user needs to hear about


def publish_copy(source: Path, target: Path) -> None:
    """Publish `target` as the same bytes as the durable `source`, atomically: a hard link (no second write),
    or a copy where the file system refuses links; then rename into place and fsync the folder."""
    temporary = _temporary(target)
    try:
        _remove_quietly(temporary)
        try:
            os.link(source, temporary)
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK, errno.EOPNOTSUPP):
                raise
            shutil.copyfile(source, temporary)
            _fsync_file(temporary)
        os.replace(temporary, target)
        _fsync_folder(target.parent)
    except OSError as error:
        _remove_quietly(temporary)
        raise _write_error(target, error) from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(savedir: Path) -> list[Path]:
    """Remove temporary files whose writer is gone (never a finished checkpoint, never a live writer's file)."""
    savedir = Path(savedir)
    stale = [path for path in savedir.iterdir() if (match := TEMPORARY.match(path.name))
             and int(match[2]) != os.getpid() and not _pid_alive(int(match[2]))] if savedir.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def rotate_snapshots(savedir: Path, keep_last: int, keep: Path | None = None) -> list[Path]:
    """Delete all but the `keep_last` most recently written epoch snapshots (by modification time, not by
    epoch number: after a resume from an older checkpoint, the abandoned run's higher numbers are older), and
    never `keep`, the one just written. last and best never match the pattern."""
    snapshots = sorted((p.stat().st_mtime_ns, p.name, p) for p in Path(savedir).iterdir() if SNAPSHOT.match(p.name))
    newest = {path for _, _, path in snapshots[-keep_last:]} if keep_last else set()
    doomed = [path for _, _, path in snapshots if path not in newest and path != keep]
    for path in doomed:
        path.unlink()
    return doomed


# ----------------------------------------------------------------------------- the save policy

class Checkpointer:
    """The save policy of a run: which names, a snapshot at the step boundary, the persist behind it.

    `save` copies the whole state into CPU memory (buffers reused across saves; pinned when it lives on a
    GPU) and returns; a background writer then persists it exactly as `save_checkpoint` does (temporary
    file, fsync, rename, folder fsync), so training goes on while the bytes reach the disk. At most one
    persist is in flight: the next save waits for it. The first name is written once; the others (best, a
    kept epoch snapshot) are hard links to it, each published atomically, and rotation runs only after the
    new file is durable. A persist that fails is reported by `failed()` and raised by `wait()`.
    A silent Checkpointer (`enabled=False`) is what processes other than the main one hold.
    """

    def __init__(self, *, savedir: Path, keep_last: int = 0, background: bool = True, enabled: bool = True):
        self.savedir, self.keep_last, self.enabled = Path(savedir), keep_last, enabled
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer") if background and enabled else None
        self._pending: Future | None = None
        self._buffers: dict[tuple, torch.Tensor] = {}

    def save(self, checkpoint: dict, names: list[str]) -> float:
        """Snapshot `checkpoint` and persist it under `names`; returns how long the caller was blocked (s)."""
        if not self.enabled:
            return 0.0
        started = time.perf_counter()
        self.wait()
        snapshot = self._snapshot(checkpoint, ())
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the non-blocking copies into pinned memory have landed
        if self._executor is None:
            self._persist(snapshot, names)
        else:
            self._pending = self._executor.submit(self._persist, snapshot, names)
        return time.perf_counter() - started

    def _snapshot(self, value, key: tuple):
        if isinstance(value, torch.Tensor):
            buffer = self._buffers.get(key)
            if buffer is None or (buffer.shape, buffer.stride(), buffer.dtype) != (value.shape, value.stride(), value.dtype):
                # the same strides (channels-last weights stay channels-last in the file), in pinned memory on CUDA
                buffer = torch.empty_like(value, device="cpu", pin_memory=value.is_cuda)
                self._buffers[key] = buffer
            return buffer.copy_(value.detach(), non_blocking=value.is_cuda)
        if isinstance(value, dict):
            return {name: self._snapshot(item, (*key, name)) for name, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._snapshot(item, (*key, index)) for index, item in enumerate(value))
        return value  # numbers, strings, None: immutable

    def _persist(self, snapshot: dict, names: list[str]) -> None:
        first = self.savedir / names[0]
        save_checkpoint(snapshot, first)
        for name in names[1:]:
            publish_copy(first, self.savedir / name)
        kept = [self.savedir / name for name in names if SNAPSHOT.match(name)]
        if kept:
            rotate_snapshots(self.savedir, self.keep_last, keep=kept[0])

    def failed(self) -> bool:
        """Whether the persist in flight has failed (without waiting for it)."""
        return self._pending is not None and self._pending.done() and self._pending.exception() is not None

    def wait(self) -> None:
        """Block until the last save is durable; raises its CheckpointError if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the persist in flight and stop the writer thread (also on an exception's way out)."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)


# ----------------------------------------------------------------------------- one run per folder

def check_writable(folder: Path, flag: str) -> None:
    """Whether `folder` can be created and written, without creating it: its nearest existing ancestor must be a
    writable folder (a file in the way, or a read-only file system, is refused)."""
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        reason = "a file is in the way" if not existing.is_dir() else "not writable"
        raise CheckpointError(f"--{flag} {folder}: cannot be written ({existing}: {reason}); "
                              f"choose a folder this user can write")


def probe_folder(folder: Path, flag: str) -> None:
    """Create `folder` and write a file in it, so a folder that cannot hold the run's files fails at startup."""
    probe = Path(folder) / f".probe-{os.getpid()}"
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"probe")
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as error:
        raise CheckpointError(f"--{flag} {folder}: cannot be written ({error.strerror or error}); "
                              f"choose a folder this user can write") from None


class RunLock:
    """An exclusive `flock` on a file in the checkpoint folder, held for the whole run and released by the
    kernel when the process dies, however it dies: a second run on the folder is refused, naming the first."""

    def __init__(self, savedir: Path):
        self.path = Path(savedir) / LOCK_FILE
        self._handle = open(self.path, "a+")
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.seek(0)
            holder = self._handle.read().strip() or "unknown"
            self._handle.close()
            raise CheckpointError(f"--savedir {savedir}: another run (PID {holder}) is using this folder; wait "
                                  f"for it to finish, stop it, or choose another --savedir") from None
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(f"{os.getpid()} on {os.uname().nodename}\n")
        self._handle.flush()

    def release(self) -> None:
        self._handle.close()  # closing the descriptor releases the flock


def set_aside(path: Path, reason: str, log: Log = print) -> Path:
    """Move a checkpoint that cannot be read out of the way under a name that says why; never delete it."""
    target = path.with_name(f"{path.name}.unreadable-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}")
    os.rename(path, target)
    log(f"⚠ Moved {path} aside to {target.name} ({reason}); it is kept, never overwritten")
    return target


def claim_savedir(savedir: Path, *, resume: Path | None, overwrite: bool, unreadable: list[tuple[Path, str]],
                  log: Log = print) -> RunLock:
    """Make `savedir` this run's: writable, locked, unreadable files set aside, stale temporaries removed, and
    another run's checkpoints replaced only with consent (--resume from this folder, or --overwrite)."""
    probe_folder(savedir, "savedir")
    lock = RunLock(savedir)
    try:
        for path, reason in unreadable:
            if path.exists():
                set_aside(path, reason, log)
        existing = checkpoint_names(savedir)
        foreign = resume is None or Path(resume).resolve().parent != Path(savedir).resolve()
        if existing and foreign and not overwrite:
            names = ", ".join(path.name for path in existing)
            if resume is None:
                raise CheckpointError(f"--savedir {savedir} already holds a run's checkpoints ({names}; newest at "
                                      f"step {_newest_step(existing)}); continue it with --resume auto, or pass "
                                      f"--overwrite to replace them, or choose another --savedir")
            raise CheckpointError(f"--savedir {savedir} holds another run's checkpoints ({names}), which this run "
                                  f"would replace as it saves; pass --overwrite to allow it, or choose another --savedir")
        remove_stale_temporaries(savedir)
    except BaseException:
        lock.release()
        raise
    return lock


def _newest_step(paths: list[Path]) -> str:
    steps = []
    for path in paths:
        try:
            steps.append(_global_step_or(load_checkpoint(path, mmap=True), -1))
        except CheckpointError:
            continue
    return str(max(steps)) if steps else "unknown"


# ----------------------------------------------------------------------------- loading

def _unsafe_globals(path: Path, error: Exception) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip checkpoint: read the globals from the refusal itself
        return re.findall(r"GLOBAL (\S+)", str(error))


def load_checkpoint(path: Path, mmap: bool = False) -> dict:
    """Load a checkpoint file to CPU with `weights_only=True`, or raise CheckpointError saying why not.

    `mmap` maps the tensors instead of reading them (cheap for looking at a file's fields); it applies to
    zip files only, so an old-serialisation file loads the same way an explicit --resume loads it. Never falls
    back to unsafe unpickling: a file that asks for arbitrary globals is refused and the globals are named.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Checkpoint file not found: {path} (check the path: ls -lh {path})")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; pass a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint; point --resume at another file")
    try:
        with warnings.catch_warnings():  # torch's remarks on foreign pickles: the refusal below says what matters
            warnings.simplefilter("ignore", UserWarning)
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        unsafe = _unsafe_globals(path, error)
        if unsafe:
            raise CheckpointError(f"{path}: refused: loading it would need unsafe unpickling of "
                                  f"{', '.join(unsafe)}; only a file you trust should ever be loaded that way "
                                  f"(python checkpointing.py convert --trust {path} NEW.pt)") from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint that loads safely (a plain pickle or a foreign "
                              f"file); point --resume at another file") from None
    except Exception as error:  # torch reports truncation and foreign files as RuntimeError, EOFError, ...
        reason = (str(error).splitlines() or [type(error).__name__])[0].split(". ")[0]
        raise CheckpointError(f"{path}: truncated or not a PyTorch checkpoint ({reason}); "
                              f"point --resume at another file") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: holds a {type(checkpoint).__name__}, not a checkpoint dict or state_dict")
    return checkpoint


def load_for_resume(path: Path, allow_nonfinite: bool = False) -> dict:
    """`load_checkpoint`, then the startup checks: field types and ranges, and no NaN or inf in the weights."""
    checkpoint = load_checkpoint(path)
    if is_full_checkpoint(checkpoint):
        check_fields(checkpoint, path)
    broken = nonfinite_tensors(model_weights(checkpoint, path))
    if broken and not allow_nonfinite:
        raise CheckpointError(f"{path}: {len(broken)} weight tensors hold NaN or inf (e.g. {_first(broken, 2)}); "
                              f"it is not a model to train or evaluate; resume from an earlier checkpoint "
                              f"(--allow_nonfinite loads it anyway, for forensics)")
    return checkpoint


def _global_step_or(checkpoint: dict, default: int) -> int:
    step = checkpoint.get("global_step")
    return step if _is_int(step) else default


def _recency(checkpoint: dict, path: Path) -> tuple[int, int, int]:
    """Newest run first (when it started), then the furthest step in it, then last > snapshot > best."""
    run = checkpoint.get("run") if isinstance(checkpoint.get("run"), dict) else {}
    started = run.get("started_ns") if _is_int(run.get("started_ns")) else -1
    preference = 2 if path.name == LAST else 1 if SNAPSHOT.match(path.name) else 0
    return started, _global_step_or(checkpoint, -1), preference


@dataclass
class Discovery:
    path: Path | None  # the checkpoint to resume, if any
    unreadable: list[tuple[Path, str]]  # files that could not be read, with why: set aside, never overwritten


def find_latest_checkpoint(savedir: Path, log: Log = print) -> Discovery:
    """`--resume auto`: the newest checkpoint of the newest run in `savedir` (its lineage, see `_recency`).
    Files that fail to load are named in a ⚠ line and returned as unreadable."""
    newest, newest_key, unreadable = None, None, []
    for path in checkpoint_names(savedir):
        try:
            key = _recency(load_checkpoint(path, mmap=True), path)
        except CheckpointError as error:
            log(f"⚠ Skipping {error}")
            unreadable.append((path, str(error).removeprefix(f"{path}: ")))
            continue
        if newest_key is None or key > newest_key:
            newest, newest_key = path, key
    return Discovery(newest, unreadable)


def checkpoint_in_folder(folder: Path) -> Path:
    """`--resume FOLDER`: its newest checkpoint (as `--resume auto` chooses), or an error naming the folder."""
    found = find_latest_checkpoint(folder, log=lambda line: None)
    if found.path is None:
        detail = f" it can read ({found.unreadable[0][1]})" if found.unreadable else ""
        raise CheckpointError(f"{folder}: folder holds no {LAST}, {BEST} or epoch snapshot{detail}; "
                              f"pass a checkpoint file to --resume")
    return found.path


def is_full_checkpoint(checkpoint: dict) -> bool:
    """Full training state (this format, or the guide's earlier one), as opposed to weights only."""
    return "model_state_dict" in checkpoint and "epoch" in checkpoint


def normalize_keys(state_dict: dict) -> dict:
    """Drop DataParallel/DDP `module.` and torch.compile `_orig_mod.` prefixes from weight names."""
    normalized = {}
    for key, value in state_dict.items():
        parts = [part for part in key.split(".") if part != "_orig_mod"]
        while parts and parts[0] == "module":
            parts = parts[1:]
        normalized[".".join(parts)] = value
    return normalized


def model_weights(checkpoint: dict, path: Path) -> dict[str, torch.Tensor]:
    """The model's weights from any variant: format 2, the guide's format, {'state_dict'|'model': ...}, or bare."""
    for key in WEIGHT_KEYS:
        if isinstance(checkpoint.get(key), dict):
            return normalize_keys({k: v for k, v in checkpoint[key].items() if isinstance(v, torch.Tensor)})
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no model weights (keys: {', '.join(map(str, list(checkpoint)[:8]))})")
    return normalize_keys(tensors)


@dataclass
class WeightsReport:
    strict: bool
    loaded: int
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]
    loaded_fraction: float  # of the model's parameter elements


def _first(names: list[str], count: int = 5) -> str:
    return ", ".join(names[:count]) + (f" (+{len(names) - count} more)" if len(names) > count else "")


def load_model_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path,
                       log: Log = print) -> WeightsReport:
    """Load strictly when the names and shapes match exactly; otherwise say why, drop the tensors whose shape
    differs (`load_state_dict(strict=False)` raises on them) and load the rest. Nothing matching is an error."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    mismatched = [k for k in weights if k in own and weights[k].shape != own[k].shape]
    usable = {k: v for k, v in weights.items() if k in own and k not in mismatched}
    if not usable:
        raise CheckpointError(f"{path}: none of its {len(weights)} tensors match this model (e.g. {_first(list(weights), 3)}); "
                              f"it is not a checkpoint of this architecture")
    strict = not (missing or unexpected or mismatched)
    if strict:
        model.load_state_dict(usable, strict=True)
        log("✓ Model state loaded (strict)")
    else:
        reasons = [f"{len(names)} {what}" for what, names in
                   (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)) if names]
        log(f"⚠ Strict loading failed: {', '.join(reasons)}")
        log("  Attempting to load with strict=False...")
        model.load_state_dict(usable, strict=False)
        log("✓ Model state loaded (partial - may need fine-tuning)")
    total = sum(v.numel() for v in own.values())
    fraction = sum(v.numel() for v in usable.values()) / max(total, 1)
    if not strict:
        log(f"  loaded {len(usable)}/{len(own)} tensors ({100 * fraction:.1f}% of the model's values)")
        for what, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if names:
                log(f"  {what}: {_first(names)}")
    return WeightsReport(strict, len(usable), missing, unexpected, mismatched, fraction)




def restore_training_state(checkpoint: dict, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           scaler: torch.amp.GradScaler, precision: str, architecture: dict, state,
                           log: Log = print) -> None:
    """Load what `checkpoint` holds into the run (weights, optimizer, scaler, and `state` through its
    `load_state_dict`), printing the resume guide's block.

    `architecture` is this run's model config; differences from the checkpoint's are listed and load
    non-strictly. The optimizer state is skipped (fresh optimizer) when parameter shapes differ.
    """
    log(RULE)
    log(f"Resuming from checkpoint: {path}")
    log(RULE)
    full = is_full_checkpoint(checkpoint)
    log("✓ New format checkpoint with full training state" if full else "✓ Old format checkpoint (model weights only)")
    saved_config = checkpoint.get("config") or {}
    differences = [f"{key} {saved_config[key]} -> {value}" for key, value in architecture.items()
                   if key in saved_config and saved_config[key] != value]
    if differences:
        log(f"⚠ Architecture differs from the checkpoint: {'; '.join(differences)}")
    report = load_model_weights(model, model_weights(checkpoint, path), path, log)
    if not full:
        log("⚠ Optimizer state not in checkpoint (starting fresh)")
        log("⚠ Epoch unknown (starting from epoch 0)")
        return

    optimizer_state = checkpoint.get("optimizer_state_dict")
    if not optimizer_state:
        log("⚠ Optimizer state not in checkpoint (starting fresh)")
    elif report.mismatched or report.missing or report.unexpected:
        log("⚠ Optimizer state not loaded: the model's parameters differ from the checkpoint's (starting fresh)")
    else:
        try:
            optimizer.load_state_dict(optimizer_state)
            match_parameter_layout(optimizer)
            log("✓ Optimizer state loaded")
        except (ValueError, KeyError, RuntimeError, TypeError) as error:
            log(f"⚠ Optimizer state not loaded ({str(error).splitlines()[0]}); starting fresh")

    state.load_state_dict(checkpoint)
    where = f", sample {state.samples_seen} (mid-epoch)" if state.samples_seen else ""
    log(f"✓ Starting from epoch {state.epoch}{where}")
    log(f"✓ Global step restored to {state.global_step}")
    if state.best_val is not None:
        log(f"✓ Best validation loss: {state.best_val:.4f}")

    _restore_scaler(checkpoint, scaler, precision, log)


def match_parameter_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give each state tensor its parameter's strides: a checkpoint written from contiguous tensors (a CPU run)
    resumed where the weights are channels-last (CUDA) would otherwise stop fused AdamW ("same layout")."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _restore_scaler(checkpoint: dict, scaler: torch.amp.GradScaler, precision: str, log: Log) -> None:
    scaler_state = checkpoint.get("scaler_state_dict")
    saved_precision = (checkpoint.get("config") or {}).get("precision", "fp16" if scaler_state else "fp32")
    if scaler_state and scaler.is_enabled():
        scaler.load_state_dict(scaler_state)
        log("✓ GradScaler state loaded")
    elif scaler_state:
        log(f"⚠ GradScaler state dropped: this run uses {precision}, which needs no loss scaling")
    elif scaler.is_enabled():
        log(f"⚠ Fresh GradScaler: the checkpoint was trained in {saved_precision}")


# ----------------------------------------------------------------------------- CLI

def _tensor_stats(value, count: int = 0, size: int = 0) -> tuple[int, int]:
    if isinstance(value, torch.Tensor):
        return count + 1, size + value.numel() * value.element_size()
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else []
    for item in items:
        count, size = _tensor_stats(item, count, size)
    return count, size


def inspect(path: Path) -> None:
    checkpoint = load_checkpoint(path, mmap=True)
    count, size = _tensor_stats(checkpoint)
    full = is_full_checkpoint(checkpoint)
    config = checkpoint.get("config") or {}
    print(f"file:       {path}")
    print(f"format:     {checkpoint.get('format_version', 1) if full else 'legacy (model weights only)'}")
    if full:
        data_state = checkpoint.get("data_state") or {}
        print(f"epoch:      {checkpoint['epoch']} (last completed; next {data_state.get('epoch', '?')}, "
              f"sample {data_state.get('samples_seen', 0)})")
        print(f"step:       {checkpoint.get('global_step')}")
        print(f"best_val:   {checkpoint.get('best_val')}")
        print(f"val_loss:   {checkpoint.get('val_loss')}")
        print(f"precision:  {config.get('precision', 'fp16' if 'scaler_state_dict' in checkpoint else 'unknown')}")
        print(f"processes:  {checkpoint.get('world_size', 1)}")
        print(f"run:        {checkpoint.get('run')}")
        print(f"versions:   {checkpoint.get('versions')}  created {checkpoint.get('created')}")
        for key in sorted(config):
            print(f"  {key}: {config[key]}")
    print(f"tensors:    {count} ({size / 2**20:.1f} MiB)")


def convert(source: Path, target: Path, trust: bool = False) -> None:
    """Wrap a legacy weights file into the current format (no optimizer, epoch -1), keys normalised. `trust`
    unpickles a file that safe loading refuses: only for a file whose origin you trust."""
    if Path(target).exists():
        raise CheckpointError(f"{target}: already exists; choose a new file name (nothing is overwritten)")
    if trust:
        print(f"⚠ Loading {source} with full unpickling (--trust): it can run code; only for files you trust")
        checkpoint = torch.load(source, map_location="cpu", weights_only=False)
        if not isinstance(checkpoint, dict):
            raise CheckpointError(f"{source}: holds a {type(checkpoint).__name__}, not a checkpoint dict or state_dict")
    else:
        checkpoint = load_checkpoint(source)
    if is_full_checkpoint(checkpoint) and not trust:
        raise CheckpointError(f"{source}: is already a full training checkpoint (format "
                              f"{checkpoint.get('format_version', 1)}); --resume takes it as it is, nothing to convert")
    if is_full_checkpoint(checkpoint):
        print("⚠ Keeping the weights only: the optimizer state and the position are not carried over")
    save_checkpoint({"format_version": FORMAT_VERSION, "epoch": -1, "global_step": 0,
                     "model_state_dict": {k: v.detach().clone() for k, v in model_weights(checkpoint, source).items()},
                     "optimizer_state_dict": None, "best_val": None, "val_loss": None, "config": None,
                     "data_state": None, "rng_state": None, "tokenizer": None, "converted_from": str(source),
                     "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}, target)
    print(f"Wrote {target} (format {FORMAT_VERSION}) from {source}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Inspect or convert brain-trainer checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("inspect", help="print what a checkpoint holds").add_argument("path", type=Path)
    converter = commands.add_parser("convert", help="wrap a legacy weights file into the current format")
    converter.add_argument("source", type=Path)
    converter.add_argument("target", type=Path)
    converter.add_argument("--trust", action="store_true",
                           help="unpickle a file that safe loading refuses (it can run code: trusted files only)")
    args = parser.parse_args(argv)
    try:
        inspect(args.path) if args.command == "inspect" else convert(args.source, args.target, args.trust)
    except CheckpointError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
