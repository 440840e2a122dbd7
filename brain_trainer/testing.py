"""A local S3 server for the tests and the benchmarks: moto's server on 127.0.0.1 (the test extra brings it),
reached by the real s3fs client, and a TCP relay a test can cut to play a store that stops answering.

    with local_s3_server() as server:            # moto on a free port of 127.0.0.1, credentials to match
        os.environ.update(server.env)
        server.bucket("bench")
"""

from __future__ import annotations

import contextlib
import io
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def s3_env(port: int) -> dict[str, str]:
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


@dataclass
class S3Server:
    """An S3 endpoint on 127.0.0.1 (the server itself, or a relay in front of it), its credentials, and the
    moto process behind it (`process`: a test may stop it with SIGSTOP to play a store that freezes)."""

    endpoint: str
    env: dict
    relay: Relay | None = None
    process: subprocess.Popen | None = None
    url: str = ""  # s3://BUCKET/run: a test's own prefix

    def filesystem(self):
        import s3fs

        filesystem = s3fs.S3FileSystem(endpoint_url=self.endpoint, key="testing", secret="testing")
        filesystem.invalidate_cache()
        return filesystem

    def bucket(self, name: str) -> str:
        self.filesystem().mkdir(name)
        return name

    def objects(self, prefix: str) -> dict[str, int]:
        found = self.filesystem().find(prefix, detail=True)
        return {path.rsplit("/", 1)[-1]: info["size"] for path, info in found.items()}

    def read(self, url: str) -> dict:
        import torch

        return torch.load(io.BytesIO(self.filesystem().cat_file(url)), weights_only=True)


@contextlib.contextmanager
def local_s3_server() -> Iterator[S3Server]:
    """moto's S3 server on a free port of 127.0.0.1, stopped (and waited for) on the way out."""
    port = free_port()
    process = subprocess.Popen(
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
        yield S3Server(f"http://127.0.0.1:{port}", s3_env(port), process=process)
    finally:
        process.terminate()
        process.wait(10)


class Relay:
    """Forwards a port of 127.0.0.1 to the server; `cut()` closes it and refuses new connections. Its threads
    are daemons by design: `cut()` ends the accepting one (joined) and the pipes end with their sockets."""

    def __init__(self, target_port: int):
        self.target_port, self.open, self.sockets = target_port, True, []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
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
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
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
        self.open = False
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join()
        for connection in self.sockets:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
                connection.close()
