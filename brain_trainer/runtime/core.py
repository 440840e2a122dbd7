"""The runtime: everything that differs between one process and many, in the one object a run holds. It is the
process group (collectives, shards, the stop agreement: `distributed.py`) with this process's device, stop flag
(`signals.py`), threads (`threads.py`), seeding (`seeding.py`), precision (`precision.py`) and model wrapping
(`parallel.py`); with one process it is the identity.

Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or SLURM's srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, with
MASTER_ADDR and MASTER_PORT set by the batch script) the process joins the group: NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.distributed as dist

from brain_trainer.runtime import parallel, seeding
from brain_trainer.runtime.distributed import ProcessGroup, join_process_group, process_group_env
from brain_trainer.runtime.precision import autocast, choose_device, grad_scaler, resolve_precision
from brain_trainer.runtime.signals import StopFlag
from brain_trainer.runtime.threads import Threads, choose_threads, threads_note


class Runtime(ProcessGroup):
    """The run's device and process group. `rank`, `world_size`, `is_main`; collectives that are the identity
    with one process; the stop flag; threads, seeding, precision and model wrapping."""

    def __init__(self, *, device: torch.device, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        comm_device = device if world_size > 1 and device.type == "cuda" else torch.device("cpu")
        super().__init__(rank=rank, world_size=world_size, comm_device=comm_device, stop=StopFlag(rank == 0))
        self.device, self.local_rank = device, local_rank
        self.threads = Threads(torch.get_num_threads(), "as started")
        self._threads_before = torch.get_num_threads()  # given back by close: in-process runs leave it as found

    @classmethod
    def start(cls, device: str = "auto") -> Runtime:
        """The runtime of this process: joins the process group when launched by torchrun or srun."""
        env = process_group_env()
        if env is None or env["world_size"] == 1:
            return cls(device=choose_device(device))
        use_cuda = choose_device(device).type == "cuda"
        runtime = cls(device=join_process_group(env, use_cuda), **env)
        if use_cuda:
            runtime.host_group = dist.new_group(backend="gloo")
        return runtime

    def close(self) -> None:
        self.stop.close()
        torch.set_num_threads(self._threads_before)
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def per_process(self, global_batch: int) -> int:
        """This process's rows of each global batch (`--batch_size` divides by the world size: checked at startup)."""
        return global_batch // self.world_size

    # -- threads and seeding
    def set_threads(self, *, given: int | None, workers: int) -> Threads:
        """The intra-op threads of this process (see `threads.py`): `--threads`, else OMP_NUM_THREADS, else the
        rule, with the processes of this node (torchrun's LOCAL_WORLD_SIZE) sharing its cores."""
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if self.distributed else 1
        self.threads = choose_threads(given=given, workers=workers, processes=processes)
        torch.set_num_threads(self.threads.count)
        return self.threads

    def threads_note(self, saved_threads: object) -> str | None:
        return threads_note(saved_threads, self.threads.count)

    def seed(self, seed: int, deterministic: bool) -> None:
        seeding.seed_everything(seed, deterministic)

    def rng_state_note(self, saved_world_size: int) -> str | None:
        return seeding.rng_state_note(saved_world_size, self.world_size)

    # -- precision
    def resolve_precision(self, name: str) -> str:
        """`auto`: fp16 on CUDA, fp32 on the CPU; the resolved value is what the checkpoint records."""
        return resolve_precision(name, self.device)

    def precision(self, name: str) -> tuple[Callable, torch.amp.GradScaler]:
        """(autocast context factory, GradScaler), so the loop has no branches: fp32 autocasts nothing and its
        scaler is a no-op; only fp16 scales the loss."""
        return autocast(name, self.device), grad_scaler(name, self.device)

    # -- the model
    def uses_sync_batchnorm(self, model: torch.nn.Module) -> bool:
        return self.distributed and self.device.type == "cuda" and parallel.has_batchnorm(model)

    def batchnorm_note(self, model: torch.nn.Module) -> str | None:
        """The ⚠ line when BatchNorm stays per process (several CPU processes), else None."""
        if self.distributed and self.device.type != "cuda" and parallel.has_batchnorm(model):
            return (
                "⚠ BatchNorm statistics stay per process on the CPU while training (torch's SyncBatchNorm needs "
                "GPUs) and are averaged over the processes at each epoch's end, before its evaluation and save: "
                "this run is close to, not the same as, the one-process run"
            )
        return None

    def average_batchnorm(self, model: torch.nn.Module) -> None:
        """Every process's BatchNorm running statistics set to their mean over the processes, so the evaluation and
        the saved file use one set (the main process's alone would drop the others' batches). Nothing changes with
        one process or with SyncBatchNorm, whose statistics are the same everywhere already."""
        if not self.uses_sync_batchnorm(model):
            self.average_in_place(parallel.batchnorm_statistics(model))

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on the device; SyncBatchNorm on several GPUs. Returns the plain module checkpoints save."""
        return parallel.prepare(model, self.device, sync_batchnorm=self.uses_sync_batchnorm(model))

    def wrap(self, model: torch.nn.Module, compile: bool) -> torch.nn.Module:
        """The module the training step calls: DDP with several processes, then torch.compile if asked."""
        return parallel.wrap(model, self.device, self.distributed, compile)

    def no_sync(self, module: torch.nn.Module) -> Callable[[], AbstractContextManager]:
        return parallel.no_sync(module)
