"""`brain-trainer ckpt inspect FILE` and `brain-trainer ckpt convert OLD NEW [--trust]`.

brain-trainer ckpt inspect checkpoints_brain_v2/last_brain_v2.pt
brain-trainer ckpt convert old_weights.pt converted_brain_v2.pt [--trust]
"""

from __future__ import annotations

import argparse
import sys

import torch

from brain_trainer.checkpointing.format import (
    FORMAT_VERSION,
    CheckpointError,
    is_full_checkpoint,
    model_weights,
    weights_only_checkpoint,
)
from brain_trainer.checkpointing.loading import load_checkpoint, load_for_resume
from brain_trainer.checkpointing.storage import locate
from brain_trainer.checkpointing.validate import check_settings_of
from brain_trainer.checkpointing.writer import save_checkpoint


def _tensor_stats(value, count: int = 0, size: int = 0) -> tuple[int, int]:
    if isinstance(value, torch.Tensor):
        return count + 1, size + value.numel() * value.element_size()
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else []
    for item in items:
        count, size = _tensor_stats(item, count, size)
    return count, size


def inspect(path: str) -> int:
    """Print what a checkpoint holds, then the verdict of `--resume` on it; 2 when `--resume` would refuse it."""
    checkpoint = load_checkpoint(path, mmap=True)
    count, size = _tensor_stats(checkpoint)
    full = is_full_checkpoint(checkpoint)
    config = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else {}
    print(f"file:       {path}")
    print(f"format:     {checkpoint.get('format_version', 1) if full else 'legacy (model weights only)'}")
    if full:
        data_state = checkpoint.get("data_state") if isinstance(checkpoint.get("data_state"), dict) else {}
        print(
            f"epoch:      {checkpoint['epoch']} (last completed; next {data_state.get('epoch', '?')}, "
            f"sample {data_state.get('samples_seen', 0)})"
        )
        print(f"step:       {checkpoint.get('global_step')}")
        print(f"best_val:   {checkpoint.get('best_val')}")
        print(f"val_loss:   {checkpoint.get('val_loss')}")
        print(f"precision:  {config.get('precision', 'fp16' if 'scaler_state_dict' in checkpoint else 'unknown')}")
        print(f"processes:  {checkpoint.get('world_size', 1)}")
        print(f"run:        {checkpoint.get('run')}")
        print(f"versions:   {checkpoint.get('versions')}  created {checkpoint.get('created')}")
        for key in sorted(config):
            print(f"  {key}: {config[key]}")
    print(f"tensors:    {count} ({size / 2**20:.1f} MiB)")
    try:
        check_settings_of(load_for_resume(path), path)
    except CheckpointError as error:
        print(f"verdict:    --resume refuses it: {str(error).removeprefix(f'{path}: ')}")
        return 2
    print("verdict:    --resume accepts it" + ("" if full else " (weights only: a fresh optimizer, epoch 0)"))
    return 0


def _trusted_load(source: str) -> dict:
    storage, name = locate(source)
    kind = storage.kind(name)
    if kind is None:
        raise CheckpointError(f"Checkpoint file not found: {source} (check the path: ls -lh {source})")
    if kind not in ("file", "link"):
        raise CheckpointError(f"{source}: not a file; pass the weights file to convert")
    print(
        f"⚠ Loading {source} with full unpickling (--trust): it runs any code the file holds; only for files you trust"
    )
    try:
        with storage.local_copy(name) as local:
            checkpoint = torch.load(local, map_location="cpu", weights_only=False)
    except Exception as error:  # a trusted file can still be truncated or foreign
        reason = (str(error).splitlines() or [type(error).__name__])[0][:160]
        raise CheckpointError(
            f"{source}: could not be loaded even with --trust ({reason}); it is not a PyTorch checkpoint"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{source}: holds a {type(checkpoint).__name__}, not a checkpoint dict or state_dict")
    return checkpoint


def convert(source: str, target: str, trust: bool = False) -> None:
    """Wrap a legacy weights file into the current format (no optimizer, epoch -1), keys normalised. `trust`
    unpickles a file that safe loading refuses: only for a file whose origin you trust."""
    target_storage, target_name = locate(target)
    target_storage.check_writable("convert's NEW")  # a parent that is a file or cannot be made: one line, first
    if target_storage.kind(target_name) is not None:
        raise CheckpointError(f"{target}: already exists; choose a new file name (nothing is overwritten)")
    checkpoint = _trusted_load(source) if trust else load_checkpoint(source)
    if is_full_checkpoint(checkpoint) and not trust:
        raise CheckpointError(
            f"{source}: is already a full training checkpoint (format "
            f"{checkpoint.get('format_version', 1)}); --resume takes it as it is, nothing to convert"
        )
    if is_full_checkpoint(checkpoint):
        print("⚠ Keeping the weights only: the optimizer state and the position are not carried over")
    converted = weights_only_checkpoint(model_weights(checkpoint, source), source)
    target_storage.prepare("convert's NEW")
    save_checkpoint(converted, target)
    print(f"Wrote {target} (format {FORMAT_VERSION}) from {source}")


def main(argv: list[str] | None = None, prog: str = "brain-trainer ckpt") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Inspect or convert brain-trainer checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspecting = "print what a checkpoint holds and whether --resume accepts it"
    commands.add_parser("inspect", help=inspecting, description=inspecting).add_argument(
        "path", help="checkpoint file, local or a URL (s3://bucket/run/last_brain_v2.pt)"
    )
    converting = "wrap a legacy weights file into the current format"
    converter = commands.add_parser("convert", help=converting, description=converting)
    converter.add_argument("source", help="the legacy weights file (a state_dict, {'state_dict': ...}, {'model': ...})")
    converter.add_argument("target", help="the new checkpoint file to write (never an existing one)")
    converter.add_argument(
        "--trust",
        action="store_true",
        help="unpickle a file that safe loading refuses (it runs the file's code: trusted files only)",
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            return inspect(args.path)
        convert(args.source, args.target, args.trust)
    except CheckpointError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    return 0
