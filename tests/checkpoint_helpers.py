"""Helpers shared by the checkpointing tests: a tiny model trained a few steps, a full checkpoint of it, files
with chosen modification times, the ckpt CLI and the child programs in tests/workers/."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import torch
from helpers import DATA, ROOT, WORKERS, assert_bitwise_equal  # noqa: F401  (re-exported for these tests)
from torch import nn

from brain_trainer import checkpointing as ck
from brain_trainer.checkpointing import save_checkpoint
from brain_trainer.trainer import TrainState


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def train_briefly(model: nn.Module) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler]:
    """Three fp16-scaled AdamW steps: moments in the optimizer, a scale that is no longer the default."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)
    for _ in range(3):
        loss = model(torch.randn(5, 4)).square().mean()
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return optimizer, scaler


def checkpoint_of(
    model: nn.Module,
    optimizer,
    scaler,
    epoch: int = 4,
    global_step: int = 123,
    best_val=0.75,
    samples_seen: int = 0,
    **changes,
) -> dict:
    """A format-3 checkpoint as the trainer makes it; `epoch` is the last completed one."""
    state = TrainState(
        epoch=epoch + 1, samples_seen=samples_seen, global_step=global_step, best_val=best_val, val_loss=0.8
    )
    fields = dict(
        model=model,
        optimizer=optimizer,
        scaler=scaler,
        train_state=state.state_dict(),
        config={"lr": 1e-2, "precision": "fp16", "d_shared": 8},
        tokenizer=None,
        rng_states=[ck.capture_rng_state()],
        run={"id": "a", "parent": None, "started_ns": 1},
    )
    return ck.make_checkpoint(**{**fields, **changes})


def a_full_checkpoint(epoch: int = 4, global_step: int = 123, **changes) -> dict:
    model = small_model()
    optimizer, scaler = train_briefly(model)
    return checkpoint_of(model, optimizer, scaler, epoch=epoch, global_step=global_step, **changes)


def restore(
    checkpoint: dict, model: nn.Module, precision: str = "fp16", architecture=None, scaler_enabled: bool = True
) -> tuple[list[str], TrainState]:
    """restore_training_state into `model`, a fresh AdamW and GradScaler: the guide's lines and the position."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=scaler_enabled)
    state = TrainState()
    lines = ck.restore_training_state(
        checkpoint=checkpoint,
        path="x.pt",
        model=model,
        optimizer=optimizer,
        scaler=scaler,
        precision=precision,
        architecture=architecture or {"d_shared": 8},
        state=state,
    )
    return lines, state


def full(step: int, started_ns: int = 1) -> dict:
    """The smallest file discovery ranks: a step and the run that wrote it."""
    return {
        "global_step": step,
        "epoch": 0,
        "model_state_dict": {},
        "run": {"id": str(started_ns), "started_ns": started_ns},
    }


def write_at(path: Path, seconds: int, content: bytes = b"x") -> None:
    path.write_bytes(content)
    os.utime(path, ns=(seconds * 10**9, seconds * 10**9))


def listing(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir())


def worker(name: str, *args: str, **popen) -> subprocess.Popen:
    """A child program of tests/workers/, started as a user would start a Python file."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(WORKERS / name), *map(str, args)], env=env, **popen)


def run_worker(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    process = worker(name, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def broken_sources(folder: Path) -> dict:
    """Files `ckpt inspect` and `--resume` must refuse: missing, truncated, random bytes, a folder."""
    save_checkpoint({"state_dict": small_model().state_dict()}, str(folder / "whole.pt"))
    (folder / "truncated.pt").write_bytes((folder / "whole.pt").read_bytes()[:300])
    (folder / "random.pt").write_bytes(random.Random(0).randbytes(4096))
    (folder / "a_folder").mkdir()
    return {
        "missing": folder / "missing.pt",
        "truncated": folder / "truncated.pt",
        "random": folder / "random.pt",
        "folder": folder / "a_folder",
    }
