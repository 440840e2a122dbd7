"""Training throughput and the share of step time spent waiting for data, for the demo configuration.

Runs the real program (one epoch of `--demo` settings, cache on) and reads back what it logged to
TensorBoard: train/samples_per_sec and train/data_wait, averaged over the epoch's windows after the first.
Prints one JSON object.

    python bench/train_throughput.py [--device cpu|cuda] [--workers 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from brain_trainer import train as trainer
from brain_trainer.data.sample_data import write_sample_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = write_sample_dataset(Path(folder) / "flickr8k")
        argv = [
            "--demo",
            "--root_dir",
            str(root),
            "--epochs",
            "1",
            "--log_every",
            "10",
            "--device",
            args.device,
            "--num_workers",
            str(args.workers),
            "--savedir",
            f"{folder}/ckpt",
            "--logdir",
            f"{folder}/runs",
        ]
        with contextlib.redirect_stdout(io.StringIO()):
            status = trainer.main(argv)
        assert status == 0, f"the run failed with status {status}"
        events = EventAccumulator(f"{folder}/runs", size_guidance={"scalars": 0})
        events.Reload()
        throughput = [e.value for e in events.Scalars("train/samples_per_sec")][1:]  # the first window starts workers
        waiting = [e.value for e in events.Scalars("train/data_wait")][1:]
    print(
        json.dumps(
            {
                "bench": "train_throughput",
                "config": "demo",
                "device": args.device,
                "workers": args.workers,
                "samples_per_s": round(statistics.mean(throughput), 1),
                "data_wait_fraction": round(statistics.mean(waiting), 4),
            }
        )
    )


if __name__ == "__main__":
    main()
