"""Checkpoints in an object store (S3 and S3-compatible services through s3fs; other fsspec stores by URL),
with the local folder's promises where the store allows them:

- never torn: an object appears only when its upload completes (one PUT, or a completed multipart upload to
  its final key); an upload that fails is aborted, and a killed one never completes, so no partial object
  ever carries a checkpoint's name and the previous one stays readable;
- write once, publish other names: best and the epoch snapshot are server-side copies of the complete object;
- one run per prefix: a lock object created only if absent (`If-None-Match: *`), holding the run's holder
  and an expiry that a thread renews (`If-Match` on its ETag) while the run lives; a lock whose holder
  stopped renewing (a killed run) is taken over once it has expired;
- unreadable objects are copied aside under a new key before the original is removed.

What an object store cannot give: a rename (publishing is a copy, paid in time on the server, not in the
loop), hard links (each name is its own object), and a lock that dies with the process (hence the expiry).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator

from brain_trainer.checkpointing.base import LOCK_NAME, Save
from brain_trainer.checkpointing.format import CheckpointError

LOCK_EXPIRY_S = 120.0  # a killed run's prefix is free again this long after its last renewal
UPLOAD_BLOCK = 64 * 2**20  # multipart part size: memory per upload, and the unit a retry resends


def _reason(error: BaseException) -> str:
    """What went wrong with the store, in words a user can act on."""
    name = type(error).__name__
    text = (str(error).splitlines() or [name])[0][:200]
    if name == "NoCredentialsError":
        return "no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
    if isinstance(error, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return f"access denied ({text}); check the credentials and the bucket's policy"
    if (
        name
        in (
            "EndpointConnectionError",
            "ConnectTimeoutError",
            "ClientConnectorError",
            "ServerDisconnectedError",
            "ConnectionError",
            "ConnectionRefusedError",
            "ReadTimeoutError",
        )
        or "connect" in text.lower()
    ):
        return f"the endpoint did not answer ({text}); check AWS_ENDPOINT_URL or --storage_options and the network"
    return text


def _filesystem(url: str, storage_options: dict):
    import fsspec

    try:
        # a client of its own: fsspec's instance cache would hand back one made for another endpoint or identity
        return fsspec.core.url_to_fs(url, skip_instance_cache=True, **storage_options)
    except ImportError:
        package = "s3fs" if url.startswith("s3://") else "the fsspec backend for this URL"
        raise CheckpointError(
            f"{url}: needs {package}: pip install 'brain-trainer[s3]' (or pip install s3fs)"
        ) from None
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{url}: {error}; check the URL and --storage_options") from None


def _require_s3(url: str, fs) -> None:
    """The lock (conditional writes), the summaries (object metadata) and the bucket checks use S3's API, which
    fsspec's generic interface does not carry: another store is refused here, at startup, in one line."""
    if not hasattr(fs, "call_s3"):
        scheme = url.partition("://")[0]
        raise CheckpointError(
            f"{url}: {scheme}:// is not supported for checkpoints: the run's lock needs S3's conditional writes "
            f"(If-None-Match/If-Match), which {type(fs).__name__} lacks; use an s3:// URL (any S3-compatible "
            f"service, its endpoint in --storage_options) or a local folder"
        )


class ObjectLock:
    """The prefix's lock object, renewed by a thread until `release` (which stops and joins it)."""

    def __init__(self, storage: ObjectStorage, holder: str, expiry: float):
        self.storage, self.expiry = storage, expiry
        self.path = storage.key(LOCK_NAME)
        self.token = uuid.uuid4().hex
        self.holder = holder
        self.lost: str | None = None  # why the lock is no longer this run's, if it is not
        self.etag = self._acquire()
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew_until_released, name="lock-renewer", daemon=True)
        self._renewer.start()

    def _body(self) -> bytes:
        return json.dumps(
            {
                "token": self.token,
                "holder": self.holder,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "expires": time.time() + self.expiry,
            }
        ).encode()

    def _put(self, **condition) -> str:
        bucket, key = self.storage.bucket_key(self.path)
        return self.storage.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=self._body(), **condition)["ETag"]

    def _acquire(self) -> str:
        try:
            return self._put(IfNoneMatch="*")
        except Exception as error:
            if not any(word in f"{type(error).__name__} {error}".lower() for word in ("precondition", "pre-condition")):
                raise CheckpointError(
                    f"--savedir {self.storage.url}: could not create its lock ({_reason(error)})"
                ) from None
        held, etag = self.storage.read_json(LOCK_NAME)
        if held.get("expires", 0) > time.time():
            raise CheckpointError(
                f"--savedir {self.storage.url}: another run ({held.get('holder', 'unknown')}) "
                f"holds this prefix's lock until {time.ctime(held['expires'])} (if that run was killed, "
                f"the lock lapses then); wait for it to finish, stop it, or choose another --savedir"
            )
        try:
            etag = self._put(IfMatch=etag)  # only if nobody renewed or took it in between
        except Exception as error:
            raise CheckpointError(
                f"--savedir {self.storage.url}: the lock changed while it was taken over "
                f"({_reason(error)}); try again, or choose another --savedir"
            ) from None
        self.storage.notes.append(
            f"⚠ Took over the lock of {self.storage.url} from {held.get('holder', 'unknown')}, "
            f"which stopped renewing it (expired {time.ctime(held.get('expires', 0))})"
        )
        return etag

    def _renew_until_released(self) -> None:
        while not self._stop.wait(self.expiry / 3):
            try:
                self.etag = self._put(IfMatch=self.etag)
            except Exception as error:  # taken over (we stalled past the expiry), or the store is gone
                self.lost = _reason(error)
                return

    def check(self) -> None:
        if self.lost is not None:
            raise CheckpointError(
                f"--savedir {self.storage.url}: this run lost its lock ({self.lost}); another "
                f"run may be writing there; nothing more is written; resume with --resume auto"
            )

    def release(self) -> None:
        self._stop.set()
        self._renewer.join()
        if self.lost is None:
            with contextlib.suppress(Exception):  # an expired lock frees the prefix anyway
                self.storage.fs.rm_file(self.path)


class ObjectStorage:
    """A prefix in an object store, by URL (`s3://bucket/run`)."""

    def __init__(self, url: str, storage_options: dict, lock_expiry: float = LOCK_EXPIRY_S):
        self.url = url.rstrip("/")
        self.fs, self.root = _filesystem(self.url, storage_options)
        _require_s3(self.url, self.fs)
        self.lock_expiry = lock_expiry
        self.notes: list[str] = []  # lines for the run log (a lock taken over)
        self._lock: ObjectLock | None = None

    def key(self, name: str) -> str:
        return f"{self.root}/{name}"

    def bucket_key(self, path: str) -> tuple[str, str]:
        bucket, _, key = path.partition("/")
        return bucket, key

    def location(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _call(self, what: str, action, *args, **kwargs):
        try:
            return action(*args, **kwargs)
        except CheckpointError:
            raise
        except FileNotFoundError:
            if not self._bucket_exists():
                raise CheckpointError(
                    f"{self.url}: bucket '{self.bucket}' does not exist; create it, or fix the --savedir/--resume URL"
                ) from None
            raise
        except Exception as error:
            raise CheckpointError(f"{self.url}: could not {what} ({_reason(error)})") from None

    @property
    def bucket(self) -> str:
        return self.root.partition("/")[0]

    def _bucket_exists(self) -> bool:
        try:
            self.fs.call_s3("head_bucket", Bucket=self.bucket)
        except FileNotFoundError:
            return False
        return True

    def check_writable(self, flag: str) -> None:
        try:
            exists = self._bucket_exists()
        except Exception as error:
            raise CheckpointError(f"--{flag} {self.url}: cannot be reached ({_reason(error)})") from None
        if not exists:
            raise CheckpointError(
                f"--{flag} {self.url}: bucket '{self.bucket}' does not exist; create it, or fix the URL"
            )

    def prepare(self, flag: str) -> None:
        self.check_writable(flag)
        probe = self.key(f".probe-{uuid.uuid4().hex}")
        try:
            self.fs.pipe_file(probe, b"probe")
            self.fs.rm_file(probe)
        except Exception as error:
            raise CheckpointError(
                f"--{flag} {self.url}: cannot be written ({_reason(error)}); check the credentials' write permission"
            ) from None

    def names(self) -> list[str]:
        self.fs.invalidate_cache(self.root)
        try:
            entries = self._call("list the prefix", self.fs.ls, self.root, detail=True, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(entry["name"].rsplit("/", 1)[-1] for entry in entries if entry["type"] == "file")

    def kind(self, name: str) -> str | None:
        self.fs.invalidate_cache(self.key(name))
        try:
            info = self._call("look up an object", self.fs.info, self.key(name))
        except FileNotFoundError:
            return None
        return "file" if info["type"] == "file" else "folder"

    def write(self, name: str, save: Save, summary: dict[str, str] | None = None) -> None:
        """Stream into a (multipart) upload of the final key; it becomes visible only when complete, and a
        failure aborts it, so the previous object under that name stays as it was. `summary` becomes the
        object's user metadata (server-side copies keep it)."""
        if self._lock is not None:
            self._lock.check()
        try:
            handle = self.fs.open(self.key(name), "wb", block_size=UPLOAD_BLOCK, Metadata=dict(summary or {}))
            try:
                save(handle)
            except BaseException:
                handle.discard()  # abort the multipart upload: nothing appears under the name
                handle.closed = True  # and never complete it later (fsspec closes files it collects)
                raise
            handle.close()  # completes the upload: the object appears whole
        except Exception as error:
            raise CheckpointError(
                f"could not write {self.location(name)}: {_reason(error)}; the previous {name} "
                f"(if any) is intact, since a store shows no partial upload; resume with "
                f"--resume auto once the store answers"
            ) from None

    def publish(self, source: str, target: str) -> None:
        if self._lock is not None:
            self._lock.check()
        try:
            self.fs.copy(self.key(source), self.key(target))  # server-side, and atomic at the target
        except Exception as error:
            raise CheckpointError(
                f"could not publish {self.location(target)} from {source}: {_reason(error)}; "
                f"{source} is written; resume with --resume auto once the store answers"
            ) from None

    def summary(self, name: str) -> dict[str, str] | None:
        try:
            return self._call("read an object's metadata", self.fs.metadata, self.key(name)) or None
        except FileNotFoundError:
            return None

    def remove(self, name: str) -> None:
        self._call("remove an object", self.fs.rm_file, self.key(name))

    def move_aside(self, name: str, new_name: str) -> None:
        self._call("copy an object aside", self.fs.copy, self.key(name), self.key(new_name))
        self.remove(name)  # only once the copy exists

    def modified_ns(self, name: str) -> int:
        info = self._call("look up an object", self.fs.info, self.key(name))
        return int(info["LastModified"].timestamp() * 1e9)

    def read_json(self, name: str) -> tuple[dict, str]:
        """A small JSON object and the ETag of exactly that content (read again if it changed meanwhile)."""
        path = self.key(name)
        for _ in range(5):
            before = self._call("look up an object", self.fs.info, path, refresh=True)["ETag"]
            data = self._call("read an object", self.fs.cat_file, path)
            if self._call("look up an object", self.fs.info, path, refresh=True)["ETag"] == before:
                try:
                    return json.loads(data), before
                except ValueError:
                    return {}, before
        raise CheckpointError(f"{self.location(name)}: keeps changing while it is read; try again")

    @contextlib.contextmanager
    def local_copy(self, name: str) -> Iterator[str]:
        """The object downloaded to a temporary file, removed afterwards (tensors mapped from it stay valid)."""
        with tempfile.TemporaryDirectory(prefix="brain-ckpt-") as folder:
            path = os.path.join(folder, name)
            self._call(f"download {self.location(name)}", self.fs.get_file, self.key(name), path)
            yield path

    def lock(self, holder: str) -> ObjectLock:
        self._lock = ObjectLock(self, holder, self.lock_expiry)
        return self._lock

    def clean_up(self) -> list[str]:
        return []  # nothing half-written is ever visible: an incomplete upload is the store's to expire
