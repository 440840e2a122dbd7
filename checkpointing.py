"""Checkpoints: the schema (format 2), atomic saves, safe loads of new and legacy files, strict then
non-strict weight loading, RNG capture and restore, `--resume auto`, and an inspect/convert CLI.

Contract: every file written here loads with `torch.load(path, weights_only=True)` (plain containers,
numbers, strings and tensors only); every write is atomic (a crash at any instant leaves the previous
file); no function here deletes or overwrites a good checkpoint except by an atomic replace with a new
one; user-facing failures raise `CheckpointError` with one line naming the file and the fix.

    python checkpointing.py inspect checkpoints_brain_v2/last_brain_v2.pt
    python checkpointing.py convert old_weights.pt converted_brain_v2.pt
"""
from __future__ import annotations

import argparse
import os
import pickle
import random
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

FORMAT_VERSION = 2
LAST, BEST = "last_brain_v2.pt", "best_brain_v2.pt"
SNAPSHOT = re.compile(r"^epoch_(\d+)_brain_v2\.pt$")
WEIGHT_KEYS = ("model_state_dict", "state_dict", "model")
RULE = "=" * 60
Log = Callable[[str], None]


class CheckpointError(Exception):
    """A checkpoint the user pointed at cannot be used: one line naming the file and what to do."""


def snapshot_name(epoch: int) -> str:
    return f"epoch_{epoch:03d}_brain_v2.pt"


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


# ----------------------------------------------------------------------------- saving

def make_checkpoint(*, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    epoch: int, global_step: int, best_val: float | None, val_loss: float | None, config: dict,
                    data_state: dict, tokenizer: str | None) -> dict:
    """The format-2 checkpoint of a run. `model` must be the unwrapped, uncompiled module."""
    import transformers

    checkpoint = {
        "format_version": FORMAT_VERSION,
        "epoch": epoch,
        "global_step": global_step,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "best_val": best_val,
        "val_loss": val_loss,
        "config": dict(config),
        "data_state": dict(data_state),
        "rng_state": capture_rng_state(),
        "tokenizer": tokenizer,
        "versions": {"torch": str(torch.__version__), "transformers": str(transformers.__version__)},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if scaler.is_enabled():
        checkpoint["scaler_state_dict"] = scaler.state_dict()
    return checkpoint


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_checkpoint(checkpoint: dict, path: Path) -> None:
    """Write atomically: a temporary file in the same folder, flushed and fsynced, then `os.replace`d,
    then the folder fsynced. On any failure the temporary file is removed and the old `path` is intact."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        _fsync_folder(path.parent)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise CheckpointError(f"could not write {path}: {error.strerror or error}; the previous {path.name} is "
                              f"intact; free some space or choose another --savedir") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def remove_stale_temporaries(savedir: Path) -> list[Path]:
    """Remove temporary files left by a save that crashed (never a finished checkpoint)."""
    stale = [p for p in Path(savedir).glob(".*_brain_v2.pt.tmp-*") if p.is_file()] if Path(savedir).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def rotate_snapshots(savedir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` epoch snapshots; last and best never match the pattern."""
    snapshots = sorted((int(m[1]), p) for p in Path(savedir).iterdir() if (m := SNAPSHOT.match(p.name)))
    doomed = [path for _, path in snapshots[:max(0, len(snapshots) - keep_last)]]
    for path in doomed:
        path.unlink()
    return doomed


# ----------------------------------------------------------------------------- loading

def _unsafe_globals(path: Path, error: Exception) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip checkpoint: read the globals from the refusal itself
        return re.findall(r"GLOBAL (\S+)", str(error))


def load_checkpoint(path: Path, mmap: bool = False) -> dict:
    """Load a checkpoint file to CPU with `weights_only=True`, or raise CheckpointError saying why not.

    Never falls back to unsafe unpickling: a file that asks for arbitrary globals is refused and the
    globals are named.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Checkpoint file not found: {path} (check the path: ls -lh {path})")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint; point --resume at another file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        unsafe = _unsafe_globals(path, error)
        if unsafe:
            raise CheckpointError(f"{path}: refused: loading it would need unsafe unpickling of "
                                  f"{', '.join(unsafe)}; only a file you trust should ever be loaded that way") from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({str(error).splitlines()[0]})") from None
    except Exception as error:  # torch reports truncation and foreign files as RuntimeError, EOFError, ...
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{path}: truncated or not a PyTorch checkpoint ({reason}); "
                              f"point --resume at another file") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: holds a {type(checkpoint).__name__}, not a checkpoint dict or state_dict")
    return checkpoint


def checkpoint_in_folder(folder: Path) -> Path:
    """`--resume FOLDER`: its newer of last and best (by global step), or an error naming the folder."""
    candidates = [folder / name for name in (LAST, BEST) if (folder / name).is_file()]
    if not candidates:
        raise CheckpointError(f"{folder}: folder holds no {LAST} or {BEST}; pass a checkpoint file to --resume")
    return max(candidates, key=lambda path: _global_step_or(load_checkpoint(path, mmap=True), -1))


def _global_step_or(checkpoint: dict, default: int) -> int:
    step = checkpoint.get("global_step")
    return step if isinstance(step, int) else default


def find_latest_checkpoint(savedir: Path, log: Log = print) -> Path | None:
    """`--resume auto`: the loadable checkpoint in `savedir` with the highest global step (last, best or
    a kept snapshot; on a tie, last). Files that fail to load are named in a ⚠ line and skipped."""
    savedir = Path(savedir)
    if not savedir.is_dir():
        return None
    names = [LAST] + sorted(p.name for p in savedir.iterdir() if SNAPSHOT.match(p.name)) + [BEST]
    best_path, best_step = None, -2
    for path in (savedir / name for name in names if (savedir / name).is_file()):
        try:
            step = _global_step_or(load_checkpoint(path, mmap=True), -1)
        except CheckpointError as error:
            log(f"⚠ Skipping {error}")
            continue
        if step > best_step:
            best_path, best_step = path, step
    return best_path


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


@dataclass
class ResumePoint:
    epoch: int  # the epoch to train next (0-based)
    samples_seen: int  # samples of that epoch already trained on
    global_step: int
    best_val: float | None


def restore_training_state(checkpoint: dict, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           scaler: torch.amp.GradScaler, precision: str, architecture: dict,
                           log: Log = print) -> ResumePoint:
    """Load what `checkpoint` holds into the run, printing the resume guide's block, and say where to go on.

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
        return ResumePoint(epoch=0, samples_seen=0, global_step=0, best_val=None)

    optimizer_state = checkpoint.get("optimizer_state_dict")
    if not optimizer_state:
        log("⚠ Optimizer state not in checkpoint (starting fresh)")
    elif report.mismatched or report.missing or report.unexpected:
        log("⚠ Optimizer state not loaded: the model's parameters differ from the checkpoint's (starting fresh)")
    else:
        try:
            optimizer.load_state_dict(optimizer_state)
            log("✓ Optimizer state loaded")
        except (ValueError, KeyError, RuntimeError) as error:
            log(f"⚠ Optimizer state not loaded ({str(error).splitlines()[0]}); starting fresh")

    epoch, global_step = checkpoint["epoch"], checkpoint.get("global_step", 0)
    data_state = checkpoint.get("data_state") or {"epoch": epoch + 1, "samples_seen": 0}
    point = ResumePoint(data_state["epoch"], data_state["samples_seen"], global_step, checkpoint.get("best_val"))
    where = f", sample {point.samples_seen} (mid-epoch)" if point.samples_seen else ""
    log(f"✓ Starting from epoch {point.epoch}{where}")
    log(f"✓ Global step restored to {global_step}")
    if point.best_val is not None:
        log(f"✓ Best validation loss: {point.best_val:.4f}")

    scaler_state = checkpoint.get("scaler_state_dict")
    saved_precision = saved_config.get("precision", "fp16" if scaler_state else "fp32")
    if scaler_state and scaler.is_enabled():
        scaler.load_state_dict(scaler_state)
        log("✓ GradScaler state loaded")
    elif scaler_state:
        log(f"⚠ GradScaler state dropped: this run uses {precision}, which needs no loss scaling")
    elif scaler.is_enabled():
        log(f"⚠ Fresh GradScaler: the checkpoint was trained in {saved_precision}")
    return point


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
        print(f"versions:   {checkpoint.get('versions')}  created {checkpoint.get('created')}")
        for key in sorted(config):
            print(f"  {key}: {config[key]}")
    print(f"tensors:    {count} ({size / 2**20:.1f} MiB)")


def convert(source: Path, target: Path) -> None:
    """Wrap a legacy weights file into format 2 (no optimizer, epoch -1), keys normalised."""
    if Path(target).exists():
        raise CheckpointError(f"{target}: already exists; choose a new file name (nothing is overwritten)")
    checkpoint = load_checkpoint(source)
    save_checkpoint({"format_version": FORMAT_VERSION, "epoch": -1, "global_step": 0,
                     "model_state_dict": model_weights(checkpoint, source), "optimizer_state_dict": None,
                     "best_val": None, "val_loss": None, "config": None, "data_state": None, "rng_state": None,
                     "tokenizer": None, "converted_from": str(source),
                     "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}, target)
    print(f"Wrote {target} (format {FORMAT_VERSION}) from {source}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Inspect or convert brain-trainer checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("inspect", help="print what a checkpoint holds").add_argument("path", type=Path)
    converter = commands.add_parser("convert", help="wrap a legacy weights file into the current format")
    converter.add_argument("source", type=Path)
    converter.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    try:
        inspect(args.path) if args.command == "inspect" else convert(args.source, args.target)
    except CheckpointError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
