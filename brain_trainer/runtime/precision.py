"""The device and the precision a process computes in, for training and inference alike: one device choice,
one map from a precision's name to its autocast dtype, one GradScaler rule."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial

import torch

PRECISIONS = ("fp32", "fp16", "bf16")
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # fp32 autocasts nothing


def choose_device(name: str) -> torch.device:
    """`auto`: the GPU when there is one, else the CPU; any other name as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: fp16 on CUDA, fp32 on the CPU; the resolved value is what a checkpoint records."""
    if precision != "auto":
        return precision
    return "fp16" if device.type == "cuda" else "fp32"


def autocast(precision: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    """A factory of the context a forward runs under: torch's autocast to the precision's dtype, or nothing."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return partial(torch.autocast, device.type, dtype=dtype) if dtype else nullcontext


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Only fp16 scales the loss; the other precisions get a scaler that does nothing, so the loop has no branch."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
