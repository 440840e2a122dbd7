"""Shared fixtures and helpers: small generated data sets, the flags of a tiny model, one shared training run,
starting the CLI (plain and under torchrun), reading TensorBoard back, and bitwise comparison."""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
SCRIPT = str(ROOT / "train_multimodal_brain_flickr8k.py")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download

from brain_trainer.data.sample_data import write_sample_dataset

# A model small enough that a step takes milliseconds on one CPU core; dropout and augmentation stay on.
TINY_MODEL = ["--image_encoder", "mobilenet_v3_small", "--image_weights", "none", "--image_size", "32",
              "--text_encoder", "scratch", "--vocab_size", "150", "--scratch_text_width", "32",
              "--scratch_text_layers", "1", "--d_shared", "32", "--brain_layers", "1", "--brain_heads", "2",
              "--max_text_len", "16", "--batch_size", "8", "--lr", "1e-3", "--warmup_steps", "2",
              "--log_every", "1", "--num_workers", "0"]
STEPS_PER_EPOCH = 8  # 70 train samples, batches of 8


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    """20 drawn images in the original token layout: 14 train (70 samples), 4 val (20), 2 test (10)."""
    return write_sample_dataset(tmp_path_factory.mktemp("flickr") / "flickr8k", "token", images=20, val=4, test=2,
                                size=(96, 72), seed=1)


@pytest.fixture
def fresh_root(sample_root, tmp_path) -> Path:
    """A private copy of the sample set, for tests that change files."""
    return Path(shutil.copytree(sample_root, tmp_path / "flickr8k"))


def run_args(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--root_dir", str(root), "--savedir", str(run_dir / "ckpt"), "--logdir", str(run_dir / "runs"),
            "--cache_dir", str(run_dir / "cache"), *TINY_MODEL, *extra]


@pytest.fixture(scope="session")
def one_epoch_run(sample_root, tmp_path_factory) -> Path:
    """One tiny epoch of the CLI, run once per session; `trained` hands each test its own copy."""
    from brain_trainer import train as cli

    run_dir = tmp_path_factory.mktemp("one_epoch")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.main(run_args(sample_root, run_dir, "--epochs", "1"))
    assert status == 0, out.getvalue()
    (run_dir / "out.txt").write_text(out.getvalue())
    return run_dir


@pytest.fixture
def trained(one_epoch_run, tmp_path) -> Path:
    """A private copy of the shared one-epoch run (checkpoints, TensorBoard events, image cache)."""
    shutil.copytree(one_epoch_run, tmp_path, dirs_exist_ok=True)
    return tmp_path


@contextlib.contextmanager
def small_disk(folder: Path, options: str):
    """A real small or read-only disk: a tmpfs mounted at `folder` (root on Linux); False where mounting is refused."""
    folder.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "--lazy", str(folder)])  # detached even if a test left it busy


# ----------------------------------------------------------------------------- reading results back

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


# ----------------------------------------------------------------------------- the CLI in a subprocess

def start(args: list[str], processes: int = 0, extra_env: dict | None = None,
          signals: tuple[str, ...] = ("--signals-to-handle", "SIGTERM,SIGINT,SIGUSR1")) -> subprocess.Popen:
    """The CLI as a user starts it: `python SCRIPT ...`, or `torchrun --nproc_per_node N SCRIPT ...`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(extra_env or {})}
    launcher = [sys.executable] if not processes else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
        *signals]
    return subprocess.Popen([*launcher, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=ROOT)


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
