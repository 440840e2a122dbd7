"""What the training loop costs against its model: the same model, optimiser, precision and batch, (a) driven by
the project's real `Trainer` (`train_epoch`: a real loader over generated data with the decode-once cache, the
stop agreement, the loss bookkeeping, the progress bar, log steps) and (b) by a bare loop (forward, loss,
backward, clip, step) over batches already in device memory. Prints one JSON line: samples/s of each, their
ratio `loop_over_bare`, the trainer's data wait, and peak memory (GPU: the allocator's peak; CPU: the process's
peak RSS, and on both the peak of activations held for backward).

    python bench/loop_efficiency.py --device cpu --size demo
    python bench/loop_efficiency.py --device cuda --size default --precision bf16 [--compile] [--channels_last]
    python bench/loop_efficiency.py --device cpu --size demo --accum_steps 4   # GradCache micro-batches

The first epoch warms up (allocator, kernels, compilation) and is not counted; evaluation and saves (epoch ends)
are not part of either figure. The bare loop takes as many steps as the counted epochs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from brain_trainer import build
from brain_trainer import trainer as trainer_module
from brain_trainer.config import parse_args
from brain_trainer.data.augment import normalize_images
from brain_trainer.data.sample_data import write_sample_dataset
from brain_trainer.run_log import RunLog
from brain_trainer.runtime import Runtime
from brain_trainer.trainer import Trainer

# The default architecture (ResNet-50, a 6-layer 768-wide text encoder, 224 px) without downloads: the scratch
# BERT has DistilBERT's shape (6 layers, 768 wide, 12 heads, 3072 feed-forward).
SIZES = {
    "demo": ["--demo"],
    "default": [
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
    ],
}


def trainer_for(args: argparse.Namespace, folder: Path) -> Trainer:
    """A Trainer assembled by the CLI's own build steps over generated data (cache on)."""
    root = write_sample_dataset(folder / "flickr8k", images=args.images, val=10, test=10, seed=1)
    argv = [
        *SIZES[args.size],
        "--root_dir",
        str(root),
        "--savedir",
        str(folder / "ckpt"),
        "--logdir",
        str(folder / "runs"),
        "--device",
        args.device,
        "--num_workers",
        str(args.workers),
        "--epochs",
        "100",
        "--log_every",
        str(args.log_every or 10**6),
        "--accum_steps",
        str(args.accum_steps),
    ]
    argv += ["--precision", args.precision] if args.precision else []
    argv += ["--batch_size", str(args.batch_size)] if args.batch_size else []
    argv += ["--compile"] if args.compile else []
    command = parse_args(argv)
    runtime, log = Runtime.start(args.device), RunLog(enabled=False)
    trainer = build.build(command, runtime, log).trainer  # held open for the bench's life
    if args.channels_last:  # in place: the optimiser and the (unwrapped, one-process) step model see it
        trainer.model.image_encoder.to(memory_format=torch.channels_last)
    return trainer


def images_to_device(channels_last: bool):
    """The project's batch-to-device step, with the memory format the bench asks for."""

    def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
        layout = torch.channels_last if channels_last else torch.contiguous_format
        return normalize_images(images.to(device, non_blocking=True)).contiguous(memory_format=layout)

    return to_device


def timed_epochs(trainer: Trainer, epochs: int) -> tuple[int, float, float]:
    """(samples, seconds, seconds waiting for data) of `epochs` epochs of the real loop: the wall time of each
    `train_epoch` (it ends with a device sync, the epoch's loss read), the data wait from the windows it logs."""
    windows, samples, seconds = [], 0, 0.0
    trainer.log_step = lambda bar, loss, grad_norm, count, wait, elapsed: windows.append(wait)
    for _ in range(epochs):
        started = time.perf_counter()
        assert trainer.train_epoch() is None, "stopped"
        seconds += time.perf_counter() - started
        samples += trainer.state.samples_seen
        trainer.state.epoch, trainer.state.samples_seen = trainer.state.epoch + 1, 0
    return samples, seconds, sum(windows)


def device_batches(trainer: Trainer, count: int, to_device) -> list[tuple[torch.Tensor, ...]]:
    batches = []
    for batch in trainer.loaders.train:
        batches.append(
            (
                to_device(batch["images"], trainer.runtime.device),
                batch["input_ids"].to(trainer.runtime.device),
                batch["attention_mask"].to(trainer.runtime.device),
            )
        )
        if len(batches) == count:
            return batches
    return batches


def bare_step(trainer: Trainer, inputs: tuple[torch.Tensor, ...]) -> None:
    """Forward, loss, backward, clip, step: nothing else (`--accum_steps` > 1: the same GradCache backward)."""
    optimizer, scaler = trainer.optimizer, trainer.scaler
    optimizer.zero_grad(set_to_none=True)
    if trainer.settings.accum_steps == 1:
        with trainer.autocast():
            loss = trainer.loss(*trainer.step_model(*inputs))
        scaler.scale(loss).backward()
    else:
        trainer.accumulation.backward(
            inputs, trainer.settings.accum_steps, lambda value: scaler.scale(value).backward()
        )
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), trainer.settings.grad_clip or float("inf"))
    scaler.step(optimizer)
    scaler.update()


def timed_bare(trainer: Trainer, batches: list, steps: int) -> tuple[int, float]:
    synchronize(trainer.runtime.device)
    started = time.perf_counter()
    for index in range(steps):
        bare_step(trainer, batches[index % len(batches)])
    synchronize(trainer.runtime.device)
    return steps * trainer.settings.batch_size, time.perf_counter() - started


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SavedForBackward:
    """The peak of the bytes autograd holds for backward at once (activations; leaves such as weights excluded)."""

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, tensor: torch.Tensor):
        if tensor.is_leaf and tensor.requires_grad:
            return tensor
        return _Held(tensor, self)

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Held:
    def __init__(self, tensor: torch.Tensor, counter: SavedForBackward):
        self.tensor, self.counter, self.bytes = tensor, counter, tensor.numel() * tensor.element_size()
        counter.live += self.bytes
        counter.peak = max(counter.peak, counter.live)

    def __del__(self):
        self.counter.live -= self.bytes


def measure(args: argparse.Namespace) -> dict:
    trainer_module.images_to_device = images_to_device(args.channels_last or args.device == "cuda")
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()):
        trainer = trainer_for(args, Path(folder))
        trainer.log_every = args.log_every or trainer.loaders.steps_per_epoch  # at least one log step an epoch
        device = trainer.runtime.device
        timed_epochs(trainer, 1)  # warm-up
        batches = device_batches(trainer, 4, trainer_module.images_to_device)
        for inputs in batches[:2]:  # the bare loop's warm-up
            bare_step(trainer, inputs)
        samples = seconds = wait = bare_samples = bare_seconds = 0
        loop_peak = bare_peak = 0
        for _ in range(args.epochs):  # interleaved, so a change in the machine's load reaches both alike
            reset_peak(device)
            epoch_samples, epoch_seconds, epoch_wait = timed_epochs(trainer, 1)
            loop_peak = max(loop_peak, peak(device))
            reset_peak(device)
            step_samples, step_seconds = timed_bare(trainer, batches, epoch_samples // trainer.settings.batch_size)
            bare_peak = max(bare_peak, peak(device))
            samples, seconds, wait = samples + epoch_samples, seconds + epoch_seconds, wait + epoch_wait
            bare_samples, bare_seconds = bare_samples + step_samples, bare_seconds + step_seconds
        if device.type != "cuda":
            loop_peak = bare_peak = None
        saved = SavedForBackward()
        with saved.hooks():
            bare_step(trainer, batches[0])
        trainer.checkpointer.close()
    loop, bare = samples / seconds, bare_samples / bare_seconds
    mib = lambda value: None if value is None else round(value / 2**20, 1)
    return {
        "bench": "loop_efficiency",
        "device": args.device,
        "size": args.size,
        "precision": trainer.settings.precision,
        "compile": args.compile,
        "channels_last": args.channels_last,
        "batch_size": trainer.settings.batch_size,
        "accum_steps": trainer.settings.accum_steps,
        "workers": args.workers,
        "steps": samples // trainer.settings.batch_size,
        "loop_samples_per_s": round(loop, 2),
        "bare_samples_per_s": round(bare, 2),
        "loop_over_bare": round(loop / bare, 3),
        "data_wait": round(wait / seconds, 4),
        "peak_gpu_mib_loop": mib(loop_peak),
        "peak_gpu_mib_bare": mib(bare_peak),
        "peak_saved_for_backward_mib": mib(saved.peak),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--size", choices=tuple(SIZES), default="demo")
    parser.add_argument(
        "--precision", choices=("fp32", "fp16", "bf16"), help="default: the run's (fp16 on CUDA, fp32 on CPU)"
    )
    parser.add_argument("--compile", action="store_true")
    parser.add_argument(
        "--channels_last", action="store_true", help="image encoder and inputs channels-last (always on CUDA)"
    )
    parser.add_argument("--batch_size", type=int, help="the global batch (default: the size's)")
    parser.add_argument("--accum_steps", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2, help="loader processes (the CLI's default: 2)")
    parser.add_argument("--images", type=int, default=140, help="generated images (5 captions each; 20 held out)")
    parser.add_argument("--epochs", type=int, default=2, help="counted epochs, after one warm-up epoch")
    parser.add_argument("--log_every", type=int, help="default: once an epoch (the CLI's: 50 steps)")
    print(json.dumps(measure(parser.parse_args())))


if __name__ == "__main__":
    main()
