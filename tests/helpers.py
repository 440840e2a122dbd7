"""What the tests share besides fixtures: the flags of a tiny model, starting the CLI (in-process, in a
subprocess, under torchrun), reading TensorBoard and checkpoints back, bitwise comparison, a small disk."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from brain_trainer.config import check_settings, parse_args, resolve_settings

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
WORKERS = Path(__file__).resolve().parent / "workers"
SCRIPT = str(ROOT / "train_multimodal_brain_flickr8k.py")

# A model small enough that a step takes milliseconds on one CPU core; dropout and augmentation stay on.
TINY_MODEL = (
    "--image_encoder mobilenet_v3_small "
    "--image_weights none "
    "--image_size 32 "
    "--text_encoder scratch "
    "--vocab_size 150 "
    "--scratch_text_width 32 "
    "--scratch_text_layers 1 "
    "--d_shared 32 "
    "--brain_layers 1 "
    "--brain_heads 2 "
    "--max_text_len 16 "
    "--batch_size 8 "
    "--lr 1e-3 "
    "--warmup_steps 2 "
    "--log_every 1 "
    "--num_workers 0"
).split()
STEPS_PER_EPOCH = 8  # 70 train samples, batches of 8


def run_args(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "--root_dir",
        str(root),
        "--savedir",
        str(run_dir / "ckpt"),
        "--logdir",
        str(run_dir / "runs"),
        "--cache_dir",
        str(run_dir / "cache"),
        *TINY_MODEL,
        *extra,
    ]


@contextlib.contextmanager
def small_disk(folder: Path, options: str):
    """A real small or read-only disk: a tmpfs mounted at `folder` (root on Linux); False where mounting is refused."""
    folder.mkdir(parents=True)
    mounted = (
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode
        == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "--lazy", str(folder)])  # detached even if a test left it busy


def events(logdir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in events(logdir).Scalars(tag)]


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def assert_bitwise_equal(left, right, where: str = "") -> None:
    if isinstance(left, torch.Tensor):
        assert torch.equal(left, right), f"{where} differs"
    elif isinstance(left, dict):
        assert left.keys() == right.keys(), where
        for key in left:
            assert_bitwise_equal(left[key], right[key], f"{where}/{key}")
    elif isinstance(left, (list, tuple)):
        assert len(left) == len(right), where
        for index, (a, b) in enumerate(zip(left, right)):
            assert_bitwise_equal(a, b, f"{where}[{index}]")
    else:
        assert left == right, f"{where}: {left} != {right}"


def start(
    args: list[str],
    processes: int = 0,
    extra_env: dict | None = None,
    signals: tuple[str, ...] = ("--signals-to-handle", "SIGTERM,SIGINT,SIGUSR1"),
) -> subprocess.Popen:
    """The CLI as a user starts it: `python SCRIPT ...`, or `torchrun --nproc_per_node N SCRIPT ...`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(extra_env or {})}
    launcher = (
        [sys.executable]
        if not processes
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(processes),
            *signals,
        ]
    )
    return subprocess.Popen(
        [*launcher, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
    )


def wait_for_step(process: subprocess.Popen, step: int) -> list[str]:
    """Read the run's output until it reports a step >= `step` (one line a step with --log_every 1)."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        match = re.match(r"epoch \d+ step (\d+) ", line)
        if match and int(match[1]) >= step:
            return lines
    raise AssertionError(f"the run ended before step {step}:\n{''.join(lines)}")


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = process.communicate(timeout=timeout)
    return process.returncode, out


def run_to_end(args: list[str], processes: int = 0) -> str:
    status, out = finish(start(args, processes))
    assert status == 0, out
    return out


def split_folder(root: Path, split: str, dest: Path) -> tuple[Path, Path, Path]:
    """A split as a user has it: (its images copied into one folder, named so that sorted order is the split's
    order; its captions as a Flickr8k token file naming those files; the captions one a line, in split order)."""
    from brain_trainer.data.layouts import load_splits

    data = load_splits(root)[split]
    images = dest / f"{split}_images"
    images.mkdir(parents=True)
    names = [f"{position:04d}_{name}" for position, name in enumerate(data.images)]
    for name, path in zip(names, data.image_paths()):
        shutil.copy2(path, images / name)
    token_lines = [
        f"{names[image]}#{n}\t{caption}" for n, (caption, image) in enumerate(zip(data.captions, data.caption_image))
    ]
    (dest / f"{split}_captions.token.txt").write_text("\n".join(token_lines) + "\n")
    (dest / f"{split}_queries.txt").write_text("\n".join(data.captions) + "\n")
    return images, dest / f"{split}_captions.token.txt", dest / f"{split}_queries.txt"


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """`brain-trainer ARGS` in-process: (exit status, stdout, stderr)."""
    from brain_trainer.cli import main

    capsys.readouterr()
    try:
        status = main([str(arg) for arg in args])
    except SystemExit as exit_:  # argparse's own mistakes (-k 0, a missing flag)
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_error_line(status: int, err: str, *needles: str) -> None:
    """A user mistake: exit status 2 and one line on stderr, `Error: ...`, naming what is wrong."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and lines[0].startswith("Error: "), (status, err)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def check(*argv: str, world_size: int = 1, saved: dict | None = None) -> None:
    """The startup checks of the options `argv` (with a --root_dir), as `train` makes them; raises ConfigError."""
    command = parse_args(["--root_dir", "somewhere", *argv])
    model_config, settings, _, from_checkpoint = resolve_settings(command.given, saved, False, "ckpt.pt")
    check_settings(command.options, model_config, settings, world_size, from_checkpoint)
