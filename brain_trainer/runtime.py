"""Everything that differs between one process and many, in one object: the device, the process group and its
collectives, seeding, precision, model wrapping, and stop signals.

With one process every collective is the identity and nothing is initialised. Under torchrun (RANK,
WORLD_SIZE, LOCAL_RANK) or SLURM's srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, with MASTER_ADDR and
MASTER_PORT set by the batch script) the process joins the group: NCCL on CUDA, gloo on the CPU. Each process
uses cuda:LOCAL_RANK. Every process calls every collective in the same order: none sits in a main-only branch.
"""

from __future__ import annotations

import os
import random
import re
import signal
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from functools import partial
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as functional_collectives

T = TypeVar("T")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
LOST_CONTACT_WORDS = ("gloo", "nccl", "connection closed by peer", "connection reset", "broken pipe", "timed out")


class LaunchError(Exception):
    """The process environment cannot start a run (a variable missing under srun, no CUDA for a rank)."""


class StopFlag:
    """SIGINT, SIGTERM and SIGUSR1 ask the run to stop at the next step boundary; a second SIGINT exits at once
    (atomic saves mean even that never leaves a half-written checkpoint), saying so. Under torchrun, the death of
    its agent (this process's parent) asks for a stop as SIGTERM does; `poll()` looks."""

    def __init__(self, announce: bool = True):
        self.signum: int | None = None
        self.announce = announce
        self.last_good: str | None = (
            None  # where a completed save is (path or URL; set by the program), for the quit line
        )
        # Under torchrun the parent is its agent: a signal it does not handle (SIGUSR1 without --signals-to-handle)
        # kills it and leaves the workers training with no launcher. Its death counts as a SIGTERM.
        self.parent = os.getppid() if "LOCAL_RANK" in os.environ else None
        self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}

    def quit_line(self) -> str:
        """What a second Ctrl-C says: which checkpoint survives it (saves are atomic renames: the last completed
        one)."""
        if self.last_good is not None and ("://" in self.last_good or os.path.isfile(self.last_good)):
            return (
                f"\nSIGINT again: quitting without saving; {self.last_good} (the last completed save) is intact: "
                f"inspect it with `python -m brain_trainer ckpt inspect {self.last_good}`, "
                "continue with --resume auto\n"
            )
        return "\nSIGINT again: quitting without saving; no checkpoint of this run was completed yet\n"

    def _handle(self, signum: int, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            if self.announce:
                os.write(2, self.quit_line().encode())  # not print(): a signal handler may interrupt a print
            os._exit(128 + signum)
        self.signum = self.signum or signum
        if self.announce:
            print(
                f"\n{signal.Signals(signum).name} received: stopping at the next step boundary "
                f"(Ctrl-C again to quit without saving)",
                flush=True,
            )

    def poll(self) -> int | None:
        """The stop signal, if any; a launcher that has died since the start (another parent) is a SIGTERM."""
        if self.signum is None and self.parent is not None and os.getppid() != self.parent:
            self.signum = signal.SIGTERM
            if self.announce:
                print(
                    f"\nThe launcher (process {self.parent}) is gone: stopping at the next step boundary as on SIGTERM",
                    flush=True,
                )
        return self.signum

    def __bool__(self) -> bool:
        return self.poll() is not None

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def process_group_env() -> dict[str, int] | None:
    """rank, world_size and local_rank from torchrun's variables, else from SLURM's; None for a plain process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return {
            "rank": int(os.environ["RANK"]),
            "world_size": int(os.environ["WORLD_SIZE"]),
            "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
        }
    if int(os.environ.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in os.environ:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise LaunchError(
                    f"{name} is not set: under srun, export MASTER_ADDR (the first node's host name) "
                    f"and MASTER_PORT in the batch script (see the README's SLURM example)"
                )
        return {
            "rank": int(os.environ["SLURM_PROCID"]),
            "world_size": int(os.environ["SLURM_NTASKS"]),
            "local_rank": int(os.environ.get("SLURM_LOCALID", 0)),
        }
    return None


class Runtime:
    """The run's device and process group. `rank`, `world_size`, `is_main`; collectives that are the identity
    with one process; the stop flag; precision and model wrapping."""

    def __init__(self, *, device: torch.device, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        self.device, self.rank, self.world_size, self.local_rank = device, rank, world_size, local_rank
        self.is_main = rank == 0
        self.distributed = world_size > 1
        # gloo reduces CPU tensors, NCCL CUDA ones
        self.comm_device = device if self.distributed and device.type == "cuda" else torch.device("cpu")
        self.stop = StopFlag(announce=self.is_main)
        self.host_group = None  # NCCL runs: a gloo group, so the step's stop flags never wait for the GPU

    @classmethod
    def start(cls, device: str = "auto") -> Runtime:
        """The runtime of this process: joins the process group when launched by torchrun or srun."""
        env = process_group_env()
        if env is None or env["world_size"] == 1:
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            return cls(device=torch.device(device))
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if use_cuda:
            if env["local_rank"] >= torch.cuda.device_count():
                raise LaunchError(
                    f"LOCAL_RANK {env['local_rank']} has no GPU: this node has "
                    f"{torch.cuda.device_count()}; start at most that many processes per node"
                )
            torch.cuda.set_device(env["local_rank"])
        run_device = torch.device("cuda", env["local_rank"]) if use_cuda else torch.device("cpu")
        os.environ.setdefault("RANK", str(env["rank"]))  # env:// rendezvous under srun reads these
        os.environ.setdefault("WORLD_SIZE", str(env["world_size"]))
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            rank=env["rank"],
            world_size=env["world_size"],
            timeout=timedelta(minutes=30),
            device_id=run_device if use_cuda else None,
        )
        runtime = cls(device=run_device, **env)
        if use_cuda:
            runtime.host_group = dist.new_group(backend="gloo")
        return runtime

    def close(self) -> None:
        self.stop.close()
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    # -- collectives: the identity with one process
    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _reduce(self, values: list[float], op, host: bool = False) -> list[float]:
        """`host`: over CPU tensors (the gloo group of an NCCL run): no device synchronisation."""
        if not self.distributed:
            return values
        device = torch.device("cpu") if host else self.comm_device
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=op, group=self.host_group if host else None)
        return tensor.tolist()

    def sum(self, value: float) -> float:
        return self._reduce([value], dist.ReduceOp.SUM)[0]

    def mean(self, value: float) -> float:
        return self.sum(value) / self.world_size

    def mean_each(self, values: list[float]) -> list[float]:
        """The mean over processes of each value, in one all-reduce (each equals `mean` of it)."""
        return [total / self.world_size for total in self._reduce(values, dist.ReduceOp.SUM)]

    def max(self, values: list[int], host: bool = False) -> list[int]:
        return [int(v) for v in self._reduce(values, dist.ReduceOp.MAX, host)]

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's `tensor` concatenated in rank order, with gradient: the backward pass sums every
        process's gradient of this process's rows (torch's functional all_gather with autograd)."""
        if not self.distributed:
            return tensor
        return functional_collectives.all_gather_single_autograd(
            tensor.contiguous(), gather_dim=0, group=dist.group.WORLD
        )

    def no_sync(self, module: torch.nn.Module) -> Callable[[], AbstractContextManager]:
        """DDP's `no_sync` of the module the step calls (compiled or not): a backward under it keeps its gradient
        local, to be all-reduced with the next synchronised one. A no-op context with one process."""
        ddp = getattr(module, "_orig_mod", module)
        return ddp.no_sync if isinstance(ddp, torch.nn.parallel.DistributedDataParallel) else nullcontext

    def shard(self, total: int) -> range:
        """This process's contiguous share of `total` items (the last may be shorter or empty)."""
        chunk = -(-total // self.world_size)
        return range(min(total, self.rank * chunk), min(total, (self.rank + 1) * chunk))

    def gather_shards(self, local: torch.Tensor, total: int) -> torch.Tensor:
        """The rows of every process's `shard(total)`, in order: padding for sets that do not divide removed."""
        if not self.distributed:
            return local
        chunk = -(-total // self.world_size)
        padded = torch.zeros(chunk, *local.shape[1:], dtype=local.dtype, device=local.device)
        padded[: len(local)] = local
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded.to(self.comm_device) if self.comm_device != local.device else padded)
        return torch.cat([part.to(local.device) for part in gathered])[:total]

    def gather_objects(self, value: T) -> list[T]:
        if not self.distributed:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast(self, value: T) -> T:
        """The main process's `value`, on every process."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, action: Callable[[], T]) -> T:
        """Run `action` on the main process only (file writes, choices); every process gets its result, or
        raises the same error, so no process waits for one that has failed."""
        outcome: tuple[bool, object] = (True, None)
        if self.is_main:
            try:
                outcome = (True, action())
            except Exception as error:  # handed to every process, raised there, reported once by the main one
                outcome = (False, error)
        ok, value = self.broadcast(outcome)
        if not ok:
            raise value
        return value

    def main_only(self, action: Callable[[], T]) -> T | None:
        """Run `action` on the main process and keep its result there (a lock, a handle: nothing to send);
        the other processes get None. An error is raised on every process, as with `on_main`."""
        kept: list[T] = []
        self.on_main(lambda: kept.append(action()))
        return kept[0] if kept else None

    def per_process(self, global_batch: int) -> int:
        """This process's rows of each global batch (`--batch_size` divides by the world size: checked at startup)."""
        return global_batch // self.world_size

    def resolve_precision(self, precision: str) -> str:
        """`auto`: fp16 on CUDA, fp32 on the CPU; the resolved value is what the checkpoint records."""
        if precision != "auto":
            return precision
        return "fp16" if self.device.type == "cuda" else "fp32"

    def stop_seen_alone(self) -> bool:
        """A stop signal this process can act on by itself, between collectives (one process only: with several,
        stopping is agreed at step boundaries, or a process would wait for the others in a collective)."""
        return bool(self.stop) and not self.distributed

    def agree_to_stop(self, failed: bool = False) -> tuple[int | None, bool]:
        """At a step boundary: (a stop signal any process got, whether any process failed), the same everywhere,
        so every process stops at the same step (one process alone would hang in the next all-reduce)."""
        signum, any_failed = self.max([self.stop.poll() or 0, int(failed)], host=True)
        return (signum or None), bool(any_failed)

    def lost_contact(self, error: BaseException) -> str | None:
        """The one line for a collective that failed because another process is gone (killed, its machine lost),
        else None. Said by every process that survives, since the main one may be the one that died."""
        lines = str(error).strip().splitlines() or [type(error).__name__]
        text = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]).split(". ")[0][:160]  # no source location, one sentence
        network = isinstance(error, dist.DistError) or any(word in text.lower() for word in LOST_CONTACT_WORDS)
        if not self.distributed or not isinstance(error, RuntimeError) or not network:
            return None
        return f"Error: process {self.rank} lost contact with the others ({text}); resume with --resume auto"

    # -- seeding, precision, the model
    def seed(self, seed: int, deterministic: bool) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic matmuls
            torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = not deterministic  # autotuning picks kernels nondeterministically

    def precision(self, precision: str) -> tuple[Callable, torch.amp.GradScaler]:
        """(autocast context factory, GradScaler), so the loop has no branches: fp32 autocasts nothing and its
        scaler is a no-op; only fp16 scales the loss."""
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        autocast = partial(torch.autocast, self.device.type, dtype=dtype) if dtype else nullcontext
        return autocast, torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")

    def uses_sync_batchnorm(self, model: torch.nn.Module) -> bool:
        return self.distributed and self.device.type == "cuda" and _has_batchnorm(model)

    def batchnorm_note(self, model: torch.nn.Module) -> str | None:
        """The ⚠ line when BatchNorm stays per process (several CPU processes), else None."""
        if self.distributed and self.device.type != "cuda" and _has_batchnorm(model):
            return (
                "⚠ BatchNorm statistics stay per process on the CPU (torch's SyncBatchNorm needs GPUs): "
                "this run is close to, not the same as, the one-process run"
            )
        return None

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on the device; BatchNorm synchronised over the processes on GPUs (torch's SyncBatchNorm
        refuses CPU tensors). Returns the plain module that checkpoints save."""
        if self.uses_sync_batchnorm(model):
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(self.device)
        if self.device.type == "cuda":
            model.image_encoder.to(memory_format=torch.channels_last)
        return model

    def wrap(self, model: torch.nn.Module, compile: bool) -> torch.nn.Module:
        """The module the training step calls: DDP with several processes, then torch.compile if asked."""
        if self.distributed:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        return torch.compile(model) if compile else model

    def rng_state_note(self, saved_world_size: int) -> str | None:
        """The ⚠ line when the RNG cannot come back per process (another world size), else None."""
        if saved_world_size == self.world_size:
            return None
        return (
            f"⚠ RNG derived from (seed, step, rank): the checkpoint was written by {saved_world_size} "
            f"process(es), this run has {self.world_size}; the resume is not bitwise exact"
        )


def _has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(module, torch.nn.modules.batchnorm._BatchNorm) for module in model.modules())
