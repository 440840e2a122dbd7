"""Training throughput at 1 and N processes, and the cost of the loss's gather with gradient.

Throughput: one epoch of the real program with the demo settings (global batch 32), started as a user starts it
(`python ...` for one process, `torchrun --standalone --nproc_per_node N ...` for more), read back from what it
logged to TensorBoard (train/samples_per_sec counts the global batch), windows after the first. Each process
gets cores / N threads. The gather: the runtime's `all_gather` of a (batch/N, d_shared) embedding forward and
backward, median of 200, under torchrun. Prints one JSON object.

    python bench/ddp_scaling.py [--device cpu|cuda] [--processes 2] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def launch(processes: int, argv: list[str], threads: int) -> subprocess.CompletedProcess:
    launcher = (
        [sys.executable]
        if processes == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([*launcher, *argv], capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{processes} process(es) failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done


def throughput(processes: int, root: Path, folder: Path, device: str, workers: int) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = folder / f"p{processes}"
    launch(
        processes,
        [
            "train_multimodal_brain_flickr8k.py",
            "--demo",
            "--root_dir",
            str(root),
            "--epochs",
            "1",
            "--log_every",
            "10",
            "--device",
            device,
            "--num_workers",
            str(workers),
            "--savedir",
            str(run / "ckpt"),
            "--logdir",
            str(run / "runs"),
        ],
        threads=max(1, (os.cpu_count() or 1) // processes),
    )
    events = EventAccumulator(str(run / "runs"), size_guidance={"scalars": 0})
    events.Reload()
    return statistics.mean(e.value for e in events.Scalars("train/samples_per_sec")[1:])


def gather_worker(device: str, local_batch: int, width: int) -> None:
    """Under torchrun: time the gather with gradient of one modality's embeddings, forward and backward."""
    from brain_trainer.runtime import Runtime

    runtime = Runtime.start(device)
    embeddings = torch.randn(local_batch, width, device=runtime.device, requires_grad=True)
    times = []
    for repeat in range(220):
        runtime.barrier()
        started = time.perf_counter()
        runtime.all_gather(embeddings).sum().backward()
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        if repeat >= 20:
            times.append(time.perf_counter() - started)
    if runtime.is_main:
        print(json.dumps({"gather_ms": round(1000 * statistics.median(times), 3)}))
    runtime.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="loader workers per process")
    parser.add_argument("--gather-worker", nargs=2, type=int, metavar=("LOCAL_BATCH", "WIDTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gather_worker:
        return gather_worker(args.device, *args.gather_worker)
    from brain_trainer.data.sample_data import write_sample_dataset

    with tempfile.TemporaryDirectory() as folder:
        root = write_sample_dataset(Path(folder) / "flickr8k")
        one = throughput(1, root, Path(folder), args.device, args.workers)
        many = throughput(args.processes, root, Path(folder), args.device, args.workers)
    local_batch, width = 32 // args.processes, 128  # the demo's global batch and d_shared
    gather = launch(
        args.processes,
        [str(Path(__file__).resolve()), "--device", args.device, "--gather-worker", str(local_batch), str(width)],
        threads=1,
    )
    print(
        json.dumps(
            {
                "bench": "ddp_scaling",
                "config": "demo",
                "device": args.device,
                "cores": os.cpu_count(),
                "samples_per_s_1": round(one, 1),
                f"samples_per_s_{args.processes}": round(many, 1),
                "speedup": round(many / one, 2),
                "gather_with_grad_ms": json.loads(gather.stdout.strip().splitlines()[-1])["gather_ms"],
                "gathered": f"{args.processes} x ({local_batch}, {width}) float32",
            }
        )
    )


if __name__ == "__main__":
    main()
