"""Checkpoint saves and loads against bare torch.save / torch.load of the same state, on the same disk.

The state is a full training checkpoint of the default architecture's size (resnet50 and a 6-layer, 768-wide text
encoder: ~90M parameters, with AdamW moments), built offline, on --device. Measured, as medians of --repeats
(alternating order):
  stall    how long `CheckpointWriter.save` blocks the caller (the snapshot into reused CPU buffers), against a bare
           `torch.save` of the same state: what the training loop waits for;
  durable  from the call until the file is durable (`wait()`: temporary file, fsync, rename, folder fsync),
           against a bare `torch.save` + fsync;
  load     `load_checkpoint` (weights-only) against a bare `torch.load(weights_only=True)`.
Prints one JSON object.

    python bench/checkpoint_io.py [--repeats 5] [--dir /path/on/the/disk/to/measure] [--device cpu|cuda]
    python bench/checkpoint_io.py --dir local-s3 --repeats 3     # also through S3 (moto's server on 127.0.0.1)
    python bench/checkpoint_io.py --dir s3://bucket/prefix       # also through a real store (AWS_* variables)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from brain_trainer import checkpointing
from brain_trainer.brain_model import BrainConfig, BrainModel
from brain_trainer.testing import local_s3_server
from brain_trainer.trainer import TrainState


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def full_state(device: str) -> dict:
    config = BrainConfig(
        image_encoder="resnet50",
        image_weights="none",
        text_encoder="scratch",
        text_vocab_size=30522,
        scratch_text_width=768,
        scratch_text_layers=6,
    )
    model = BrainModel(config, pretrained=False).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()  # allocates the AdamW moments, as in a real run
    scaler = torch.amp.GradScaler(device, enabled=False)
    return checkpointing.make_checkpoint(
        model=model,
        optimizer=optimizer,
        scaler=scaler,
        train_state=TrainState(global_step=1).state_dict(),
        config=config.to_dict(),
        tokenizer=None,
        rng_states=[checkpointing.capture_rng_state()],
        run={"id": "bench", "parent": None, "started_ns": 0},
    )


def bare_save_and_fsync(state: dict, path: Path) -> None:
    with open(path, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())


def measure(state: dict, storage, repeats: int, scratch: Path) -> dict[str, float]:
    """Medians of stall, durable and load through `storage`, beside bare torch.save/fsync/load in `scratch`."""
    checkpointer = checkpointing.CheckpointWriter(storage=storage, background=True)
    bare, synced = scratch / "bare.pt", scratch / "synced.pt"
    times = {name: [] for name in ("stall", "bare_save", "durable", "bare_save_fsync", "load", "bare_load")}
    checkpointer.save(state, [checkpointing.LAST])  # allocates the snapshot buffers, as a run's first save does
    checkpointer.wait()
    for repeat in range(repeats):

        def ours_save() -> None:
            started = time.perf_counter()
            times["stall"].append(timed(lambda: checkpointer.save(state, [checkpointing.LAST])))
            checkpointer.wait()
            times["durable"].append(time.perf_counter() - started)

        actions = [
            ("ours", ours_save),
            ("bare_save", lambda: torch.save(state, bare)),
            ("bare_save_fsync", lambda: bare_save_and_fsync(state, synced)),
        ]
        for name, action in actions if repeat % 2 == 0 else actions[::-1]:
            if name == "ours":
                action()
            else:
                times[name].append(timed(action))
        loads = [
            ("load", lambda: checkpointing.load_checkpoint(checkpointer.location(checkpointing.LAST))),
            ("bare_load", lambda: torch.load(bare, map_location="cpu", weights_only=True)),
        ]
        for name, action in loads if repeat % 2 == 0 else loads[::-1]:
            times[name].append(timed(action))
    checkpointer.close()
    return {name: statistics.median(values) for name, values in times.items()}


def figures(median: dict[str, float], prefix: str = "") -> dict:
    return {
        **{f"{prefix}{name}_s": round(value, 3) for name, value in median.items()},
        f"{prefix}stall_over_bare_save": round(median["stall"] / median["bare_save"], 3),
        f"{prefix}durable_over_bare_save_fsync": round(median["durable"] / median["bare_save_fsync"], 3),
        f"{prefix}load_over_bare": round(median["load"] / median["bare_load"], 3),
    }


@contextlib.contextmanager
def local_s3_bucket() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (brain_trainer.testing, as the tests start it) with a bucket `bench`."""
    with local_s3_server() as server:
        os.environ.update(server.env)
        server.bucket("bench")
        yield "s3://bench/checkpoints"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--dir",
        default=None,
        help="a folder on the disk to measure (default: a temporary folder), or an s3:// URL, "
        "measured beside the local figures; `local-s3` starts moto's server on 127.0.0.1",
    )
    parser.add_argument("--device", default="cpu", help="where the state lives (cuda: snapshot into pinned memory)")
    args = parser.parse_args()
    state = full_state(args.device)
    remote = args.dir if args.dir and "://" in args.dir or args.dir == "local-s3" else None
    local_dir = None if remote else args.dir
    with tempfile.TemporaryDirectory(dir=local_dir) as folder:
        local = measure(state, checkpointing.LocalStorage(folder), args.repeats, Path(folder))
        size_mb = (Path(folder) / checkpointing.LAST).stat().st_size / 2**20
        result = {
            "bench": "checkpoint_io",
            "device": args.device,
            "size_mb": round(size_mb),
            "repeats": args.repeats,
            **figures(local),
        }
        if remote:
            with local_s3_bucket() if remote == "local-s3" else contextlib.nullcontext(remote) as url:
                store = measure(state, checkpointing.open_storage(url), args.repeats, Path(folder))
            result.update(
                {
                    "store": "moto on 127.0.0.1" if remote == "local-s3" else url,
                    **figures(store, "store_"),
                    "store_stall_over_local_stall": round(store["stall"] / local["stall"], 3),
                }
            )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
