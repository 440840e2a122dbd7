"""Resume latency: seconds from process start to the first training step, resuming at 90% of an epoch
against a fresh start, with the demo configuration (data and image cache already on disk for both).

Resume skips to the sample offset by index, never by iterating the loader, so the two should match.
Prints one JSON object.

    python bench/resume_latency.py [--device cpu|cuda] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from brain_trainer.data.sample_data import write_sample_dataset

ROOT = Path(__file__).resolve().parents[1]


def start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train_multimodal_brain_flickr8k.py"), *argv],
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def seconds_to_step(argv: list[str], step: int | None = None) -> tuple[float, int]:
    """Start the run, wait for its first logged step (or `step`), stop it with SIGTERM; (seconds, step seen)."""
    started = time.perf_counter()
    process = start(argv)
    for line in process.stdout:
        match = re.match(r"epoch \d+ step (\d+) ", line)
        if match and (step is None or int(match[1]) >= step):
            elapsed = time.perf_counter() - started
            process.send_signal(signal.SIGTERM)
            process.communicate()
            return elapsed, int(match[1])
    raise RuntimeError(f"the run ended before a training step (exit {process.wait()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = write_sample_dataset(Path(folder) / "flickr8k")
        common = [
            "--demo",
            "--root_dir",
            str(root),
            "--device",
            args.device,
            "--log_every",
            "1",
            "--logdir",
            f"{folder}/runs",
        ]
        steps_per_epoch = 2250 // 32
        # One run to 90% of the first epoch leaves the checkpoint to resume from (and builds the image cache).
        seconds_to_step(common + ["--savedir", f"{folder}/resume_from"], step=int(0.9 * steps_per_epoch))
        checkpoint = f"{folder}/resume_from/last_brain_v2.pt"
        fresh, resumed = [], []
        for repeat in range(args.repeats):
            fresh.append(seconds_to_step(common + ["--savedir", f"{folder}/fresh{repeat}"])[0])
            seconds, first_step = seconds_to_step(
                common + ["--savedir", f"{folder}/resumed{repeat}", "--resume", checkpoint]
            )
            resumed.append(seconds)
    print(
        json.dumps(
            {
                "bench": "resume_latency",
                "config": "demo",
                "device": args.device,
                "repeats": args.repeats,
                "resumed_at_step": first_step - 1,
                "steps_per_epoch": steps_per_epoch,
                "fresh_start_s": round(statistics.median(fresh), 2),
                "resume_at_90pct_s": round(statistics.median(resumed), 2),
                "resume_over_fresh": round(statistics.median(resumed) / statistics.median(fresh), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
