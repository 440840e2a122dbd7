"""The process group: joining it (torchrun's or srun's variables), its collectives, each process's shard, and
agreeing on a stop. With one process every collective is the identity and nothing is initialised. Every process
calls every collective in the same order: none sits in a main-only branch."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as functional_collectives

from brain_trainer.runtime.signals import StopFlag

T = TypeVar("T")
LOST_CONTACT_WORDS = ("gloo", "nccl", "connection closed by peer", "connection reset", "broken pipe", "timed out")


class LaunchError(Exception):
    """The process environment cannot start a run (a variable missing under srun, no CUDA for a rank)."""


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
                    f"and MASTER_PORT in the batch script (see docs/scaling.md's SLURM example)"
                )
        return {
            "rank": int(os.environ["SLURM_PROCID"]),
            "world_size": int(os.environ["SLURM_NTASKS"]),
            "local_rank": int(os.environ.get("SLURM_LOCALID", 0)),
        }
    return None


def join_process_group(env: dict[str, int], use_cuda: bool) -> torch.device:
    """Join the group (NCCL on CUDA, gloo on the CPU); returns this process's device, cuda:LOCAL_RANK on GPUs."""
    if use_cuda:
        if env["local_rank"] >= torch.cuda.device_count():
            raise LaunchError(
                f"LOCAL_RANK {env['local_rank']} has no GPU: this node has "
                f"{torch.cuda.device_count()}; start at most that many processes per node"
            )
        torch.cuda.set_device(env["local_rank"])
    device = torch.device("cuda", env["local_rank"]) if use_cuda else torch.device("cpu")
    os.environ.setdefault("RANK", str(env["rank"]))  # env:// rendezvous under srun reads these
    os.environ.setdefault("WORLD_SIZE", str(env["world_size"]))
    dist.init_process_group(
        "nccl" if use_cuda else "gloo",
        rank=env["rank"],
        world_size=env["world_size"],
        timeout=timedelta(minutes=30),
        device_id=device if use_cuda else None,
    )
    return device


class ProcessGroup:
    """`rank`, `world_size`, `is_main` and the collectives, the identity with one process. `comm_device` is where
    reduced tensors live (gloo reduces CPU tensors, NCCL CUDA ones); `host_group`, on NCCL runs, a gloo group so
    the step's stop flags never wait for the GPU."""

    def __init__(self, *, rank: int, world_size: int, comm_device: torch.device, stop: StopFlag):
        self.rank, self.world_size, self.comm_device, self.stop = rank, world_size, comm_device, stop
        self.is_main = rank == 0
        self.distributed = world_size > 1
        self.host_group = None

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

    def average_in_place(self, tensors: list[torch.Tensor]) -> None:
        """Each tensor set to its mean over the processes (rank order, float64), unless every process already holds
        the same values: then nothing changes, so averaging twice is averaging once."""
        if not self.distributed or not tensors:
            return
        flat = torch.cat([tensor.detach().flatten().double() for tensor in tensors]).to(self.comm_device)
        gathered = [torch.empty_like(flat) for _ in range(self.world_size)]
        dist.all_gather(gathered, flat)
        if all(torch.equal(part, gathered[0]) for part in gathered[1:]):
            return
        mean = torch.stack(gathered).mean(dim=0)
        for tensor, part in zip(tensors, mean.split([tensor.numel() for tensor in tensors])):
            tensor.copy_(part.view_as(tensor))

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
