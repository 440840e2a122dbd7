"""The demo's epoch time at several intra-op thread counts: one epoch of `brain-trainer train --demo` in a
fresh process per trial, at OMP_NUM_THREADS=1, =2 and with the program's own rule (no OMP_NUM_THREADS, no
--threads), interleaved so that a change in the machine's load falls on every count alike. Prints one JSON
line: the load average before and after, and per count the epoch times (the epoch line's seconds: training
and the epoch end's evaluation) and the process's wall time.

    python bench/threads.py                     # --repeats 2 --workers 2 --counts 1,2,rule
    python bench/threads.py --workers 0         # the loader in the training process
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one_epoch(work: Path, count: str, workers: int, trial: int) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    if count != "rule":
        env["OMP_NUM_THREADS"] = count
    run = work / f"run-{count}-{trial}"
    command = [sys.executable, "-m", "brain_trainer", "train", "--demo", "--root_dir", str(work / "data")]
    command += ["--epochs", "1", "--num_workers", str(workers), "--cache_dir", str(work / "cache")]
    command += ["--savedir", str(run / "ckpt"), "--logdir", str(run / "runs")]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the demo failed at {count} threads:\n{done.stdout}\n{done.stderr}")
    epoch = re.search(r"^Epoch 0/1: .*, (\d+) s$", done.stdout, re.M)
    threads = re.search(r"^Threads: (.*)$", done.stdout, re.M)
    return {"epoch_s": int(epoch[1]), "wall_s": round(wall, 1), "threads": threads[1] if threads else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--counts", default="1,2,rule", help="comma-separated thread counts; rule: the program's")
    args = parser.parse_args()
    counts = args.counts.split(",")
    results = {count: [] for count in counts}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        one_epoch(work, "1", args.workers, -1)  # writes the demo data and the image cache: not counted
        for trial in range(args.repeats):
            for count in counts:
                results[count].append(one_epoch(work, count, args.workers, trial))
    summary = {
        "cores": len(os.sched_getaffinity(0)),
        "workers": args.workers,
        "load_before": [round(value, 2) for value in load_before],
        "load_after": [round(value, 2) for value in os.getloadavg()],
        "epoch_s": {count: [trial["epoch_s"] for trial in trials] for count, trials in results.items()},
        "wall_s": {count: [trial["wall_s"] for trial in trials] for count, trials in results.items()},
        "threads_line": {count: trials[0]["threads"] for count, trials in results.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
