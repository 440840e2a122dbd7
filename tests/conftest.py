"""Fixtures only (helpers.py holds what tests import): small generated data sets, one shared training run,
a local S3 server. The environment comes first: tests never download, tokenizers never fork threads."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download

import pytest  # noqa: E402
from helpers import run_args  # noqa: E402

from brain_trainer.data.sample_data import write_sample_dataset  # noqa: E402
from brain_trainer.testing import Relay, S3Server, local_s3_server, s3_env  # noqa: E402


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    """20 drawn images in the original token layout: 14 train (70 samples), 4 val (20), 2 test (10)."""
    return write_sample_dataset(
        tmp_path_factory.mktemp("flickr") / "flickr8k", "token", images=20, val=4, test=2, size=(96, 72), seed=1
    )


@pytest.fixture
def fresh_root(sample_root, tmp_path) -> Path:
    """A private copy of the sample set, for tests that change files."""
    return Path(shutil.copytree(sample_root, tmp_path / "flickr8k"))


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


@pytest.fixture(scope="session")
def s3_server() -> S3Server:
    """One moto S3 server for the session (a real HTTP server: the real s3fs client talks to it)."""
    with local_s3_server() as server:
        yield server


@pytest.fixture
def s3(s3_server, monkeypatch, request) -> S3Server:
    """A fresh bucket on the session's server, its credentials and endpoint in this process's environment
    (so in-process runs and child processes both reach it), and a relay a test can cut."""
    relay = Relay(int(s3_server.endpoint.rsplit(":", 1)[1]))
    env = s3_env(relay.port)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    server = S3Server(f"http://127.0.0.1:{relay.port}", env, relay, process=s3_server.process)
    bucket = server.bucket(re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:50].strip("-"))
    server.url = f"s3://{bucket}/run"
    yield server
    if relay.open:
        relay.cut()


@pytest.fixture(scope="session")
def retrieval_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data root, checkpoint) of three tiny epochs on a set with a 24-image test split (120 captions): a model
    whose retrieval ranks are spread out, so that a search that differs from the evaluation shows."""
    from brain_trainer import train as cli

    work = tmp_path_factory.mktemp("retrieval")
    root = write_sample_dataset(work / "flickr8k", "token", images=64, val=4, test=24, size=(96, 72), seed=3)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.main(run_args(root, work, "--epochs", "3", "--log_every", "100"))
    assert status == 0, out.getvalue()
    return root, work / "ckpt" / "last_brain_v2.pt"
