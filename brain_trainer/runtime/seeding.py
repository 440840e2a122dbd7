"""Seeds: the global generators seeded once, and seeds derived from integer keys, e.g. (seed, epoch, index), so
that randomness is a function of where the run is rather than a stream (the rule exact resume rests on). Capturing
and restoring the generators' states is the checkpoint's business: `checkpointing/format.py`."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys, e.g. (seed, epoch, index)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0]
    return int(state) >> 1  # a Python int first: numpy 1.26 cannot shift a uint64 by a Python int


def seed_everything(seed: int, deterministic: bool) -> None:
    """Python's, numpy's and torch's global generators; `deterministic` also asks for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic matmuls
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not deterministic  # autotuning picks kernels nondeterministically


def rng_state_note(saved_world_size: int, world_size: int) -> str | None:
    """The ⚠ line when the RNG cannot come back per process (another world size), else None."""
    if saved_world_size == world_size:
        return None
    return (
        f"⚠ RNG derived from (seed, step, rank): the checkpoint was written by {saved_world_size} "
        f"process(es), this run has {world_size}; the resume is not bitwise exact"
    )
