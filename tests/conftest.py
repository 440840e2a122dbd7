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
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
SCRIPT = str(ROOT / "train_multimodal_brain_flickr8k.py")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download

from brain_trainer.data.sample_data import write_sample_dataset  # noqa: E402 (after the environment above)

# A model small enough that a step takes milliseconds on one CPU core; dropout and augmentation stay on.
TINY_MODEL = [
    "--image_encoder",
    "mobilenet_v3_small",
    "--image_weights",
    "none",
    "--image_size",
    "32",
    "--text_encoder",
    "scratch",
    "--vocab_size",
    "150",
    "--scratch_text_width",
    "32",
    "--scratch_text_layers",
    "1",
    "--d_shared",
    "32",
    "--brain_layers",
    "1",
    "--brain_heads",
    "2",
    "--max_text_len",
    "16",
    "--batch_size",
    "8",
    "--lr",
    "1e-3",
    "--warmup_steps",
    "2",
    "--log_every",
    "1",
    "--num_workers",
    "0",
]
STEPS_PER_EPOCH = 8  # 70 train samples, batches of 8


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
    mounted = (
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode
        == 0
    )
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


# ----------------------------------------------------------------------------- a local S3 server


@dataclass
class S3Server:
    """moto's S3 server on 127.0.0.1, reached through a TCP relay the tests can cut (a store that stops
    answering) without losing what the server holds."""

    endpoint: str
    env: dict
    relay: Relay
    url: str = ""  # s3://BUCKET/run: the test's own prefix

    def bucket(self, name: str) -> str:
        import s3fs

        s3fs.S3FileSystem(endpoint_url=self.endpoint, key="testing", secret="testing").mkdir(name)
        return name

    def objects(self, prefix: str) -> dict[str, int]:
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=self.endpoint, key="testing", secret="testing")
        fs.invalidate_cache()
        return {path.rsplit("/", 1)[-1]: info["size"] for path, info in fs.find(prefix, detail=True).items()}

    def read(self, url: str) -> dict:
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=self.endpoint, key="testing", secret="testing")
        return torch.load(io.BytesIO(fs.cat_file(url)), weights_only=True)


class Relay:
    """Forwards 127.0.0.1:port to the server; `cut()` closes it and refuses new connections."""

    def __init__(self, target_port: int):
        import socket
        import threading

        self.target_port, self.open, self.sockets = target_port, True, []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import socket
        import threading

        while self.open:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source, sink) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.close()

    def cut(self) -> None:
        """The store stops answering: no new connection, and the open ones (a client's pool) are closed."""
        import socket

        self.open = False
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join()
        for connection in self.sockets:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
                connection.close()


@pytest.fixture(scope="session")
def s3_server() -> S3Server:
    """One moto S3 server for the session (a real HTTP server: the real s3fs client talks to it)."""
    import socket
    import time

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("moto's S3 server did not start")
        yield S3Server(f"http://127.0.0.1:{port}", _s3_env(port), relay=None)
    finally:
        server.terminate()
        server.wait(10)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _s3_env(port: int) -> dict:
    """Test credentials for the local server; nothing looks for others (no instance-metadata lookups)."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_MAX_ATTEMPTS": "2",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "AWS_CONFIG_FILE": "/nonexistent",
    }


@pytest.fixture
def s3(s3_server, monkeypatch, request) -> S3Server:
    """A fresh bucket on the session's server, its credentials and endpoint in this process's environment
    (so in-process runs and child processes both reach it), and a relay a test can cut."""
    relay = Relay(int(s3_server.endpoint.rsplit(":", 1)[1]))
    env = _s3_env(relay.port)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    server = S3Server(f"http://127.0.0.1:{relay.port}", env, relay)
    bucket = server.bucket(re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:50].strip("-"))
    server.url = f"s3://{bucket}/run"
    yield server
    if relay.open:
        relay.cut()


# ----------------------------------------------------------------------------- using a trained brain


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
