"""Checkpoint save and load time against a bare torch.save / torch.load of the same state, same disk.

The state is a full training checkpoint of the default architecture's size (resnet50 and a 6-layer,
768-wide text encoder: ~90M parameters, with AdamW moments), built offline. Our save is atomic (temporary
file, fsync, rename, folder fsync); the bare save is not. Median of --repeats, alternating order.
Prints one JSON object.

    python bench/checkpoint_io.py [--repeats 3] [--dir /path/on/the/disk/to/measure]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpointing  # noqa: E402
from brain_model import BrainConfig, BrainModel  # noqa: E402
from trainer import TrainState  # noqa: E402


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--device", default="cpu", help="ignored: checkpoints are saved from and loaded to CPU")
    args = parser.parse_args()
    config = BrainConfig(image_encoder="resnet50", image_weights="none", text_encoder="scratch", text_vocab_size=30522,
                         scratch_text_width=768, scratch_text_layers=6)
    model = BrainModel(config, pretrained=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()  # allocates the AdamW moments, as in a real run
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = checkpointing.make_checkpoint(model=model, optimizer=optimizer, scaler=scaler,
                                          train_state=TrainState(global_step=1).state_dict(), config=config.to_dict(),
                                          tokenizer=None, rng_states=[checkpointing.capture_rng_state()],
                                          run={"id": "bench", "parent": None, "started_ns": 0})
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        ours, bare = Path(folder) / "ours.pt", Path(folder) / "bare.pt"
        times = {"save": [], "bare_save": [], "load": [], "bare_load": []}
        for repeat in range(args.repeats):
            pairs = [("save", lambda: checkpointing.save_checkpoint(state, ours)),
                     ("bare_save", lambda: torch.save(state, bare))]
            for name, action in pairs if repeat % 2 == 0 else pairs[::-1]:
                times[name].append(timed(action))
            loads = [("load", lambda: checkpointing.load_checkpoint(ours)),
                     ("bare_load", lambda: torch.load(bare, map_location="cpu", weights_only=True))]
            for name, action in loads if repeat % 2 == 0 else loads[::-1]:
                times[name].append(timed(action))
        size_mb = ours.stat().st_size / 2**20
    median = {name: statistics.median(values) for name, values in times.items()}
    print(json.dumps({"bench": "checkpoint_io", "size_mb": round(size_mb), "repeats": args.repeats,
                      **{f"{name}_s": round(value, 3) for name, value in median.items()},
                      "save_over_bare": round(median["save"] / median["bare_save"], 3),
                      "load_over_bare": round(median["load"] / median["bare_load"], 3)}))


if __name__ == "__main__":
    main()
