"""Resident memory of a resumed run at the default model size (resnet50 and a 6-layer, 768-wide text encoder,
~90M parameters with AdamW moments), after `build`, with the checkpoint dict dropped (what the run does) and
kept (what it did before): the difference is the second CPU copy of the weights and moments each process held
for the whole run.

    python bench/resume_memory.py     # each measurement in a fresh process
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from brain_trainer import build
from brain_trainer.checkpointing import capture_rng_state, make_checkpoint, save_checkpoint
from brain_trainer.config import parse_args
from brain_trainer.data.sample_data import write_sample_dataset
from brain_trainer.run_log import RunLog
from brain_trainer.runtime import Runtime
from brain_trainer.trainer import TrainState

DEFAULT_SIZE = [
    "--image_encoder",
    "resnet50",
    "--image_weights",
    "none",
    "--text_encoder",
    "scratch",
    "--scratch_text_width",
    "768",
    "--scratch_text_layers",
    "6",
    "--num_workers",
    "0",
    "--batch_size",
    "8",
]


def resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def write_checkpoint(folder: Path, root: Path) -> Path:
    """A checkpoint of the default size, written by the project's own build and save code."""
    command = parse_args(["--root_dir", str(root), "--savedir", str(folder / "ckpt"), *DEFAULT_SIZE])
    runtime, log = Runtime.start("cpu"), RunLog(enabled=False)
    run = build.build_run(command, build.Resume(None, None, []), runtime, log)
    for parameter in run.model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    run.optimizer.step()  # the AdamW moments, as in a real run
    path = folder / "last_brain_v2.pt"
    save_checkpoint(
        make_checkpoint(
            model=run.model,
            optimizer=run.optimizer,
            scaler=run.scaler,
            train_state=TrainState(epoch=0, global_step=1).state_dict(),
            config={},
            tokenizer=run.data.tokenizer_json,
            rng_states=[capture_rng_state()],
            run={"id": "bench", "parent": None, "started_ns": 0},
        ),
        str(path),
    )
    runtime.close()
    return path


def measure(path: Path, root: Path, keep: bool) -> float:
    """Resident MiB after `build` restored `path` (in a process that did nothing else)."""
    command = parse_args(
        ["--root_dir", str(root), "--savedir", str(path.parent / "ckpt"), "--resume", str(path), *DEFAULT_SIZE]
    )
    runtime, log = Runtime.start("cpu"), RunLog(enabled=False)
    resume = build.choose_checkpoint(command.options, runtime, log)
    held = [resume.checkpoint] if keep else []  # the whole file, referenced for the run, as before
    build.build_run(command, resume, runtime, log)
    gc.collect()
    assert len(held) == keep
    return resident_mib()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", nargs=2, metavar=("CHECKPOINT", "ROOT"), help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(measure(Path(args.measure[0]), Path(args.measure[1]), args.keep))
        return
    with tempfile.TemporaryDirectory() as folder:
        root = write_sample_dataset(Path(folder) / "flickr8k", images=40, val=10, test=5)
        path = write_checkpoint(Path(folder), root)
        resident = {}
        for keep in (True, False):  # each in a fresh process: nothing else in its memory
            answer = subprocess.run(
                [sys.executable, __file__, "--measure", str(path), str(root)] + ["--keep"] * keep,
                capture_output=True,
                text=True,
                check=True,
            )
            resident[keep] = float(answer.stdout.split()[-1])
        print(
            json.dumps(
                {
                    "bench": "resume_memory",
                    "checkpoint_mib": round(path.stat().st_size / 2**20),
                    "resident_checkpoint_kept_mib": round(resident[True]),
                    "resident_checkpoint_dropped_mib": round(resident[False]),
                    "saved_mib": round(resident[True] - resident[False]),
                }
            )
        )


if __name__ == "__main__":
    main()
