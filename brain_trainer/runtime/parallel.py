"""The model on several processes: on the device (SyncBatchNorm on GPUs), wrapped in DDP and torch.compile for
the step, DDP's `no_sync` for accumulation, and the BatchNorm statistics each process keeps on the CPU."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch


def has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(module, torch.nn.modules.batchnorm._BatchNorm) for module in model.modules())


def batchnorm_statistics(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every BatchNorm's running mean and variance (what evaluation normalises by), in the module order."""
    return [
        statistic
        for module in model.modules()
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats
        for statistic in (module.running_mean, module.running_var)
    ]


def prepare(model: torch.nn.Module, device: torch.device, sync_batchnorm: bool) -> torch.nn.Module:
    """The model on the device; BatchNorm synchronised over the processes when asked (torch's SyncBatchNorm
    refuses CPU tensors). Returns the plain module that checkpoints save."""
    if sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if device.type == "cuda":
        model.image_encoder.to(memory_format=torch.channels_last)
    return model


def wrap(model: torch.nn.Module, device: torch.device, distributed: bool, compile: bool) -> torch.nn.Module:
    """The module the training step calls: DDP with several processes, then torch.compile if asked."""
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return torch.compile(model) if compile else model


def no_sync(module: torch.nn.Module) -> Callable[[], AbstractContextManager]:
    """DDP's `no_sync` of the module the step calls (compiled or not): a backward under it keeps its gradient
    local, to be all-reduced with the next synchronised one. A no-op context with one process."""
    ddp = getattr(module, "_orig_mod", module)
    return ddp.no_sync if isinstance(ddp, torch.nn.parallel.DistributedDataParallel) else nullcontext
