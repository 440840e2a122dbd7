"""The checkpoint file: its schema (format 3), names, field checks, RNG capture and restore, weight-key
normalisation, and the mapping between the file's fields and `TrainState`'s.

Every file loads with `torch.load(path, weights_only=True)`: plain dicts, lists, numbers, strings, None and
tensors, never pickled objects. The schema is documented once, in ARCHITECTURE.md.
"""

from __future__ import annotations

import random
import re
from datetime import datetime, timezone

import numpy as np
import torch

FORMAT_VERSION = 3
LAST, BEST = "last_brain_v2.pt", "best_brain_v2.pt"
SNAPSHOT = re.compile(r"^epoch_(\d+)_brain_v2\.pt$")
WEIGHT_KEYS = ("model_state_dict", "state_dict", "model")


class CheckpointError(Exception):
    """A checkpoint the user pointed at cannot be used, or cannot be written: one line naming the file and
    what to do."""


def snapshot_name(epoch: int) -> str:
    return f"epoch_{epoch:03d}_brain_v2.pt"


def is_checkpoint_name(name: str) -> bool:
    return name in (LAST, BEST) or bool(SNAPSHOT.match(name))


# ----------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict:
    """Python, numpy, torch CPU and every CUDA device's RNG, as tensors and plain numbers. Draws nothing."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": py_gauss},
        "numpy": {
            "bit_generator": np_name,
            "state": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict) -> None:
    python, numpy_state = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss_next"]))
    np.random.set_state(
        (
            numpy_state["bit_generator"],
            numpy_state["state"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
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


# ----------------------------------------------------------------------------- TrainState <-> the file


def train_state_fields(state: dict) -> dict:
    """The file's fields for `TrainState.state_dict()`: `epoch` is the last *completed* epoch (-1 if none),
    `data_state` where training stands in the epoch being trained."""
    return {
        "epoch": state["epoch"] - 1,
        "global_step": state["global_step"],
        "best_val": state["best_val"],
        "val_loss": state["val_loss"],
        "data_state": {
            "epoch": state["epoch"],
            "samples_seen": state["samples_seen"],
            "skipped_images": state["skipped_images"],
            "epoch_loss_sum": state["epoch_loss_sum"],
            "epoch_loss_steps": state["epoch_loss_steps"],
        },
    }


def train_state_of(checkpoint: dict) -> dict:
    """`TrainState.load_state_dict`'s input from a format-2 or format-3 file (format 2 may lack data_state:
    then the next epoch starts at its first sample)."""
    data_state = checkpoint.get("data_state") or {"epoch": checkpoint["epoch"] + 1, "samples_seen": 0}
    return {
        "epoch": data_state["epoch"],
        "samples_seen": data_state["samples_seen"],
        "global_step": checkpoint.get("global_step", 0),
        "best_val": checkpoint.get("best_val"),
        "val_loss": checkpoint.get("val_loss"),
        "skipped_images": int(data_state.get("skipped_images", 0)),
        "epoch_loss_sum": float(data_state.get("epoch_loss_sum", 0.0)),
        "epoch_loss_steps": int(data_state.get("epoch_loss_steps", 0)),
    }


# ----------------------------------------------------------------------------- the schema


def make_checkpoint(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    train_state: dict,
    config: dict,
    tokenizer: str | None,
    rng_states: list[dict],
    run: dict,
    fingerprint: dict | None = None,
    data: dict | None = None,
) -> dict:
    """The format-3 checkpoint of a run. `model` must be the unwrapped, uncompiled module; `train_state` is
    `TrainState.state_dict()`; `rng_states` holds one state per process, in rank order; `run` is this run's
    lineage (id, parent, started_ns); `fingerprint` that of the training data; `data` where it is."""
    import transformers

    fields = train_state_fields(train_state)
    if fingerprint is not None:
        fields["data_state"]["fingerprint"] = fingerprint
    checkpoint = {
        "format_version": FORMAT_VERSION,
        **fields,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "config": dict(config),
        "rng_state": rng_states,
        "world_size": len(rng_states),
        "tokenizer": tokenizer,
        "run": dict(run),
        "data": dict(data or {}),
        "versions": {"torch": str(torch.__version__), "transformers": str(transformers.__version__)},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if scaler.is_enabled():
        checkpoint["scaler_state_dict"] = scaler.state_dict()
    return checkpoint


def weights_only_checkpoint(weights: dict[str, torch.Tensor], source: str) -> dict:
    """A format-3 file holding weights alone (what `ckpt convert` writes): no optimizer, epoch -1."""
    return {
        "format_version": FORMAT_VERSION,
        "epoch": -1,
        "global_step": 0,
        "model_state_dict": {k: v.detach().clone() for k, v in weights.items()},
        "optimizer_state_dict": None,
        "best_val": None,
        "val_loss": None,
        "config": None,
        "data_state": None,
        "rng_state": None,
        "tokenizer": None,
        "converted_from": source,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def is_full_checkpoint(checkpoint: dict) -> bool:
    """Full training state (this format, or the guide's earlier one), as opposed to weights only."""
    return "model_state_dict" in checkpoint and "epoch" in checkpoint


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def global_step_or(checkpoint: dict, default: int) -> int:
    step = checkpoint.get("global_step")
    return step if _is_int(step) else default


def recency(checkpoint: dict, name: str) -> tuple[int, int, int]:
    """Newest run first (when it started), then the furthest step in it, then last > snapshot > best."""
    run = checkpoint.get("run") if isinstance(checkpoint.get("run"), dict) else {}
    started = run.get("started_ns") if _is_int(run.get("started_ns")) else -1
    preference = 2 if name == LAST else 1 if SNAPSHOT.match(name) else 0
    return started, global_step_or(checkpoint, -1), preference


def summary_of(checkpoint: dict) -> dict[str, str]:
    """What discovery needs of a checkpoint, as strings a store can keep beside the object (S3 user metadata),
    so `--resume auto` on a store reads a few headers instead of downloading every checkpoint."""
    run = checkpoint.get("run") if isinstance(checkpoint.get("run"), dict) else {}
    return {
        "brain-format": str(checkpoint.get("format_version", 2)),
        "brain-step": str(global_step_or(checkpoint, -1)),
        "brain-started-ns": str(run.get("started_ns") if _is_int(run.get("started_ns")) else -1),
    }


def summary_recency(summary: dict[str, str], name: str) -> tuple[int, int, int] | None:
    """`recency` from a summary, or None when it is not one of ours (then the file itself is read)."""
    try:
        started, step = int(summary["brain-started-ns"]), int(summary["brain-step"])
    except (KeyError, TypeError, ValueError):
        return None
    return recency({"run": {"started_ns": started}, "global_step": step}, name)


# ----------------------------------------------------------------------------- weights


def nonfinite_tensors(weights: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, tensor in weights.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]


def normalize_keys(state_dict: dict) -> dict:
    """Drop DataParallel/DDP `module.` and torch.compile `_orig_mod.` prefixes from weight names."""
    normalized = {}
    for key, value in state_dict.items():
        parts = [part for part in key.split(".") if part != "_orig_mod"]
        while parts and parts[0] == "module":
            parts = parts[1:]
        normalized[".".join(parts)] = value
    return normalized


def model_weights(checkpoint: dict, path: str) -> dict[str, torch.Tensor]:
    """The model's weights from any variant: format 2, the guide's format, {'state_dict'|'model': ...}, or bare."""
    for key in WEIGHT_KEYS:
        if isinstance(checkpoint.get(key), dict):
            return normalize_keys({k: v for k, v in checkpoint[key].items() if isinstance(v, torch.Tensor)})
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no model weights (keys: {', '.join(map(str, list(checkpoint)[:8]))})")
    return normalize_keys(tensors)


def first(names: list[str], count: int = 5) -> str:
    return ", ".join(names[:count]) + (f" (+{len(names) - count} more)" if len(names) > count else "")
