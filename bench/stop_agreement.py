"""The cost of agreeing on a stop at every step boundary: `Runtime.agree_to_stop` (an all-reduce of two flags over
the host: gloo on CPU runs, a gloo group beside NCCL on GPU runs, so it never waits for the device) timed on N
processes. Prints one JSON line (from the main process): microseconds per call.

    python -m torch.distributed.run --standalone --nproc_per_node 2 bench/stop_agreement.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from brain_trainer.runtime import Runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    runtime = Runtime.start(args.device)
    rounds = []
    for _ in range(5):
        runtime.barrier()
        started = time.perf_counter()
        for _ in range(args.calls):
            runtime.agree_to_stop(False)
        rounds.append((time.perf_counter() - started) / args.calls)
    if runtime.is_main:
        print(
            json.dumps(
                {
                    "bench": "stop_agreement",
                    "device": args.device,
                    "processes": runtime.world_size,
                    "us_per_step_median": round(1e6 * statistics.median(rounds[1:]), 1),
                    "us_per_step_min": round(1e6 * min(rounds[1:]), 1),
                }
            )
        )
    runtime.close()


if __name__ == "__main__":
    main()
