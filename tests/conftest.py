"""Shared fixtures: small generated data sets in every layout, and the flags of a tiny model."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download

from sample_data import write_sample_dataset  # noqa: E402

# A model small enough that a step takes milliseconds on one CPU core; dropout and augmentation stay on.
TINY_MODEL = ["--image_encoder", "mobilenet_v3_small", "--image_weights", "none", "--image_size", "32",
              "--text_encoder", "scratch", "--vocab_size", "150", "--scratch_text_width", "32",
              "--scratch_text_layers", "1", "--d_shared", "32", "--brain_layers", "1", "--brain_heads", "2",
              "--max_text_len", "16", "--batch_size", "8", "--lr", "1e-3", "--warmup_steps", "2",
              "--log_every", "1", "--num_workers", "0"]


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    """20 drawn images in the original token layout: 14 train (70 samples), 4 val (20), 2 test (10)."""
    return write_sample_dataset(tmp_path_factory.mktemp("flickr") / "flickr8k", "token", images=20, val=4, test=2,
                                size=(96, 72), seed=1)


@pytest.fixture
def fresh_root(sample_root, tmp_path) -> Path:
    """A private copy of the sample set, for tests that change files."""
    return Path(shutil.copytree(sample_root, tmp_path / "flickr8k"))


def run_args(root: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["--root_dir", str(root), "--savedir", str(tmp_path / "ckpt"), "--logdir", str(tmp_path / "runs"),
            "--cache_dir", str(tmp_path / "cache"), *TINY_MODEL, *extra]
