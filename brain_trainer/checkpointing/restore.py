"""Restoring a run from a checkpoint: weights (strict, then non-strict), optimizer state in the weights' layout,
GradScaler, and where the run stands. Prints nothing: each step adds a ✓ or ⚠ line to the report, which the
run log prints as the resume guide's block."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from brain_trainer.checkpointing.format import CheckpointError, first, is_full_checkpoint, model_weights, train_state_of


@dataclass
class WeightsReport:
    strict: bool
    loaded: int
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]
    loaded_fraction: float  # of the model's parameter elements
    lines: list[str] = field(default_factory=list)


def load_model_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: str) -> WeightsReport:
    """Load strictly when the names and shapes match exactly; otherwise say why, drop the tensors whose shape
    differs (`load_state_dict(strict=False)` raises on them) and load the rest. Nothing matching is an error."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    mismatched = [k for k in weights if k in own and weights[k].shape != own[k].shape]
    usable = {k: v for k, v in weights.items() if k in own and k not in mismatched}
    if not usable:
        raise CheckpointError(
            f"{path}: none of its {len(weights)} tensors match this model (e.g. {first(list(weights), 3)}); "
            f"it is not a checkpoint of this architecture"
        )
    strict = not (missing or unexpected or mismatched)
    model.load_state_dict(usable, strict=strict)
    total = sum(v.numel() for v in own.values())
    fraction = sum(v.numel() for v in usable.values()) / max(total, 1)
    report = WeightsReport(strict, len(usable), missing, unexpected, mismatched, fraction)
    if strict:
        report.lines.append("✓ Model state loaded (strict)")
        return report
    reasons = [
        f"{len(names)} {what}"
        for what, names in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if names
    ]
    report.lines += [
        f"⚠ Strict loading failed: {', '.join(reasons)}",
        "  Attempting to load with strict=False...",
        "✓ Model state loaded (partial - may need fine-tuning)",
        f"  loaded {len(usable)}/{len(own)} tensors ({100 * fraction:.1f}% of the model's values)",
    ]
    report.lines += [
        f"  {what}: {first(names)}"
        for what, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        if names
    ]
    return report


def match_parameter_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give each state tensor its parameter's strides: a checkpoint written from contiguous tensors (a CPU run)
    resumed where the weights are channels-last (CUDA) would otherwise stop fused AdamW ("same layout")."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _restore_optimizer(checkpoint: dict, optimizer: torch.optim.Optimizer, weights: WeightsReport) -> str:
    optimizer_state = checkpoint.get("optimizer_state_dict")
    if not optimizer_state:
        return "⚠ Optimizer state not in checkpoint (starting fresh)"
    if weights.mismatched or weights.missing or weights.unexpected:
        return "⚠ Optimizer state not loaded: the model's parameters differ from the checkpoint's (starting fresh)"
    fresh = optimizer.state_dict()
    try:
        optimizer.load_state_dict(optimizer_state)
        match_parameter_layout(optimizer)
        _check_moment_shapes(optimizer)
    except (ValueError, KeyError, RuntimeError, TypeError) as error:
        optimizer.load_state_dict(fresh)  # nothing half-restored: the fresh optimizer, as the line says
        return f"⚠ Optimizer state not loaded ({str(error).splitlines()[0]}); starting fresh"
    return "✓ Optimizer state loaded"


def _check_moment_shapes(optimizer: torch.optim.Optimizer) -> None:
    """A moment of another shape than its weight would fail the first step, after the folder was claimed."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(f"its '{key}' has shape {tuple(value.shape)} for a weight of {tuple(param.shape)}")


def _restore_scaler(checkpoint: dict, scaler: torch.amp.GradScaler, precision: str) -> list[str]:
    scaler_state = checkpoint.get("scaler_state_dict")
    saved_precision = (checkpoint.get("config") or {}).get("precision", "fp16" if scaler_state else "fp32")
    if scaler_state and scaler.is_enabled():
        scaler.load_state_dict(scaler_state)
        return ["✓ GradScaler state loaded"]
    if scaler_state:
        return [f"⚠ GradScaler state dropped: this run uses {precision}, which needs no loss scaling"]
    if scaler.is_enabled():
        return [f"⚠ Fresh GradScaler: the checkpoint was trained in {saved_precision}"]
    return []


def restore_training_state(
    *,
    checkpoint: dict,
    path: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    precision: str,
    architecture: dict,
    state,
) -> list[str]:
    """Load what `checkpoint` holds into the run (weights, optimizer, scaler, and `state` through its
    `load_state_dict`); returns the resume guide's ✓/⚠ lines.

    `architecture` is this run's model config; differences from the checkpoint's are listed and load
    non-strictly. The optimizer state is skipped (fresh optimizer) when parameter shapes differ.
    """
    full = is_full_checkpoint(checkpoint)
    lines = [
        "✓ New format checkpoint with full training state" if full else "✓ Old format checkpoint (model weights only)"
    ]
    saved_config = checkpoint.get("config") or {}
    differences = [
        f"{key} {saved_config[key]} -> {value}"
        for key, value in architecture.items()
        if key in saved_config and saved_config[key] != value
    ]
    if differences:
        lines.append(f"⚠ Architecture differs from the checkpoint: {'; '.join(differences)}")
    weights = load_model_weights(model, model_weights(checkpoint, path), path)
    lines += weights.lines
    if not full:
        return lines + [
            "⚠ Optimizer state not in checkpoint (starting fresh)",
            "⚠ Epoch unknown (starting from epoch 0)",
        ]
    lines.append(_restore_optimizer(checkpoint, optimizer, weights))
    state.load_state_dict(train_state_of(checkpoint))
    where = f", sample {state.samples_seen} (mid-epoch)" if state.samples_seen else ""
    lines += [f"✓ Starting from epoch {state.epoch}{where}", f"✓ Global step restored to {state.global_step}"]
    if state.best_val is not None:
        lines.append(f"✓ Best validation loss: {state.best_val:.4f}")
    return lines + _restore_scaler(checkpoint, scaler, precision)
