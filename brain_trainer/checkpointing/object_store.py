"""Checkpoints in an object store (S3 and S3-compatible services through s3fs; other fsspec stores by URL),
with the local folder's promises where the store allows them:

- never torn: an object appears only when its upload completes (one PUT, or a completed multipart upload to
  its final key); an upload that fails is aborted, and a killed one never completes, so no partial object
  ever carries a checkpoint's name and the previous one stays readable;
- write once, publish other names: best and the epoch snapshot are server-side copies of the complete object;
- one run per prefix: a lock object created only if absent (`If-None-Match: *`), holding the run's holder
  and an expiry that a thread renews (`If-Match` on its ETag) while the run lives; a lock whose holder
  stopped renewing (a killed run) is taken over once it has expired;
- unreadable objects are copied aside under a new key before the original is removed;
- a write or copy completes only while the lock is confirmed this run's (its ETag, its expiry), and every call
  to the store has a deadline, so a run that lost its lock or a store that froze never completes a write late.

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
from collections.abc import Callable, Iterator

from brain_trainer.checkpointing.base import LOCK_NAME, ReadError, Save
from brain_trainer.checkpointing.format import CheckpointError
from brain_trainer.config import MAX_LOCK_EXPIRY_S

LOCK_EXPIRY_S = 120.0  # a killed run's prefix is free again this long after its last renewal
UPLOAD_BLOCK = 64 * 2**20  # multipart part size: memory per upload, and the unit a retry resends
SINGLE_COPY_LIMIT = 5 * 2**30  # S3 copies up to 5 GiB in one call (atomic, metadata kept); above, in parts
COPY_BLOCK = 512 * 2**20  # a part of a larger copy
# Every call to the store ends: a silent endpoint is an error after these (seconds; --storage_options
# '{"config_kwargs": {...}}' overrides them), never a run that hangs.
STORE_TIMEOUTS = {"connect_timeout": 10, "read_timeout": 30}
UPLOAD_RATE_FLOOR = 2**20  # bytes/s: an upload slower than this is taken for a store that stopped answering
STORE_ATTEMPTS = 3  # botocore's tries of one call (AWS_MAX_ATTEMPTS, where set, wins); s3fs adds none
URL_REFUSED = ("?", "*", "[", "]")  # globbing characters: fsspec expands them, so the keys would not be these


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
            "FSTimeoutError",  # an upload past its deadline (UPLOAD_RATE_FLOOR)
        )
        or "connect" in text.lower()
    ):
        return f"the endpoint did not answer ({text}); check AWS_ENDPOINT_URL or --storage_options and the network"
    return text


def _check_url(url: str) -> None:
    """Refuse what fsspec would read as a pattern or collapse (an empty path segment): the objects would land
    under other keys than the URL names, and the used-prefix refusal would look elsewhere."""
    path = url.partition("://")[2]
    bad = [character for character in URL_REFUSED if character in path]
    if bad or "//" in path or path.startswith("/") or not path:
        what = f"the character {bad[0]!r}" if bad else "an empty path segment (//)"
        raise CheckpointError(
            f"{url}: {what} in an object store URL would misplace the checkpoints; use a prefix of "
            f"letters, digits, '-', '_', '.' and single '/' (e.g. s3://bucket/runs/name)"
        )


def _with_timeouts(url: str, storage_options: dict) -> dict:
    if not url.startswith("s3://"):
        return storage_options
    config = {**STORE_TIMEOUTS, **storage_options.get("config_kwargs", {})}
    if "AWS_MAX_ATTEMPTS" not in os.environ:
        config.setdefault("retries", {"max_attempts": STORE_ATTEMPTS, "mode": "standard"})
    return {**storage_options, "config_kwargs": config}


def _bound_every_call(fs, url: str) -> None:
    """s3fs's own retry loop would multiply botocore's tries (and the wait on a silent store); and botocore's
    `Expect: 100-continue` on uploads makes aiohttp wait for the server's go-ahead with no timeout at all (a
    frozen endpoint hangs the upload forever), so uploads send their body without asking first."""
    from botocore.handlers import add_expect_header

    fs.retries = 1
    try:
        fs.connect()  # the client, made now (locally: no request) so that its handlers can be set
    except Exception as error:  # an unknown profile, a malformed option: botocore says which
        raise CheckpointError(f"{url}: {_reason(error)}; check --storage_options") from None
    fs.s3.meta.events.unregister("before-call.s3", add_expect_header)


def _filesystem(url: str, storage_options: dict):
    import fsspec

    _check_url(url)
    try:
        # a client of its own: fsspec's instance cache would hand back one made for another endpoint or identity
        fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=True, **_with_timeouts(url, storage_options))
        if url.startswith("s3://"):
            _bound_every_call(fs, url)
        return fs, root
    except ImportError:
        package = "s3fs" if url.startswith("s3://") else "the fsspec backend for this URL"
        raise CheckpointError(
            f"{url}: needs {package}: pip install 'brain-trainer[s3]' (or pip install s3fs)"
        ) from None
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{url}: {error}; check the URL and --storage_options") from None


def check_lock_body(held, url: str) -> None:
    """A lock object is data from outside: anything but this program's shape (an object with a string holder and
    a finite expiry in range) is unreadable, said in one line, never taken over."""
    expires = held.get("expires") if isinstance(held, dict) else None
    if not (
        isinstance(held.get("holder") if isinstance(held, dict) else None, str)
        and isinstance(expires, (int, float))
        and not isinstance(expires, bool)
        and 0 <= expires <= time.time() + MAX_LOCK_EXPIRY_S  # NaN fails this too
    ):
        raise CheckpointError(
            f"{url}: the lock object is unreadable (not a brain-trainer lock: a JSON object with a holder and "
            f"an expiry); if no run is using this prefix, remove it (aws s3 rm {url}) and run again"
        )


def bound_upload(handle, *, patience: float, confirm: Callable[[], None]) -> None:
    """Every call of an s3fs upload gets a deadline (botocore's read timeout does not cover sending a body: a
    frozen store would hold a part's upload forever), and its last call (the one-shot PUT or the multipart
    completion) runs only after `confirm` (the lock is this run's): a run that lost it aborts instead of
    replacing a newer run's object."""
    call, commit = handle._call_s3, handle.commit

    def call_with_deadline(method: str, *args, **kwargs):
        body = kwargs.get("Body")
        size = len(body) if isinstance(body, (bytes, bytearray, memoryview)) else 0
        return call(method, *args, timeout=patience + size / UPLOAD_RATE_FLOOR, **kwargs)

    def commit_if_locked() -> None:
        confirm()
        commit()

    handle._call_s3, handle.commit = call_with_deadline, commit_if_locked


def copy_keeping_metadata(fs, bucket: str, source: str, target: str, confirm: Callable[[], None]) -> None:
    """A server-side copy that keeps the object's metadata (the summary discovery reads) at every size: one
    atomic call up to 5 GiB, else a multipart copy created with the metadata; `confirm` runs before it completes."""
    head = fs.call_s3("head_object", Bucket=bucket, Key=source)
    confirm()
    if head["ContentLength"] <= SINGLE_COPY_LIMIT:
        copy = {"Bucket": bucket, "Key": source}
        fs.call_s3("copy_object", Bucket=bucket, Key=target, CopySource=copy, MetadataDirective="COPY")
        return
    upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=target, Metadata=head.get("Metadata", {}))
    try:
        parts = []
        for number, start in enumerate(range(0, head["ContentLength"], COPY_BLOCK), start=1):
            part = fs.call_s3(
                "upload_part_copy",
                Bucket=bucket,
                Key=target,
                PartNumber=number,
                UploadId=upload["UploadId"],
                CopySource={"Bucket": bucket, "Key": source},
                CopySourceIfMatch=head["ETag"],  # every part from the same object
                CopySourceRange=f"bytes={start}-{min(start + COPY_BLOCK, head['ContentLength']) - 1}",
            )
            parts.append({"PartNumber": number, "ETag": part["CopyPartResult"]["ETag"]})
        confirm()
        fs.call_s3(
            "complete_multipart_upload",
            Bucket=bucket,
            Key=target,
            UploadId=upload["UploadId"],
            MultipartUpload={"Parts": parts},
        )
    except BaseException:
        with contextlib.suppress(Exception):
            fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=target, UploadId=upload["UploadId"])
        raise


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
        self._guard = threading.Lock()  # a renewal and a confirmation never interleave (the ETag changes)
        self.renewed = time.time()  # when the last successful put was sent: the lock is ours until + expiry
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
        check_lock_body(held, self.storage.location(LOCK_NAME))
        if held["expires"] > time.time():
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
            with self._guard:
                try:
                    sent = time.time()
                    self.etag, self.renewed = self._put(IfMatch=self.etag), sent
                except Exception as error:  # taken over (we stalled past the expiry), or the store is gone
                    self.lost = _reason(error)
                    return

    def confirm(self) -> None:
        """Just before an object is completed: the lock is still ours, unexpired, and unchanged since our last
        renewal (its ETag), or CheckpointError; a run that lost it never completes a write."""
        with self._guard:
            if self.lost is None and time.time() > self.renewed + self.expiry * 0.9:
                self.lost = "it expired: the store did not take its renewals in time"
            if self.lost is None:
                bucket, key = self.storage.bucket_key(self.path)
                try:
                    self.storage.fs.call_s3("head_object", Bucket=bucket, Key=key, IfMatch=self.etag)
                except FileNotFoundError:
                    self.lost = "its object was removed"
                except Exception as error:
                    words = f"{type(error).__name__} {error}".lower()
                    if not any(word in words for word in ("precondition", "pre-condition", "412")):
                        raise  # the store did not answer: the write fails as any call would, the lock unjudged
                    self.lost = "another run changed it (its ETag is not this run's)"
        self.check()

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


class ObjectUploads:
    """An object store's upload path: a write streams into an upload of the final key, a publish is a
    server-side copy, and each completes only after the run's lock is confirmed (`ObjectLock.confirm`)."""

    def __init__(self, storage: ObjectStorage):
        self.storage, self.fs = storage, storage.fs

    def write(self, name: str, save: Save, summary: dict[str, str] | None = None) -> None:
        """Stream into a (multipart) upload of the final key; it becomes visible only when complete, and a
        failure aborts it, so the previous object under that name stays as it was. `summary` becomes the
        object's user metadata (server-side copies keep it)."""
        self._check_lock()
        try:
            handle = self.fs.open(self.storage.key(name), "wb", block_size=UPLOAD_BLOCK, Metadata=dict(summary or {}))
            patience = getattr(self.fs, "config_kwargs", {}).get("read_timeout", STORE_TIMEOUTS["read_timeout"])
            bound_upload(handle, patience=patience, confirm=self._confirm_lock)
            try:
                save(handle)
                handle.close()  # completes the upload (after the lock is confirmed): the object appears whole
            except BaseException:
                with contextlib.suppress(Exception):
                    handle.discard()  # abort the multipart upload: nothing appears under the name
                handle.closed = True  # and never complete it later (fsspec closes files it collects)
                raise
        except CheckpointError:
            raise
        except Exception as error:
            raise CheckpointError(
                f"could not write {self.storage.location(name)}: {_reason(error)}; the previous {name} "
                f"(if any) is intact, since a store shows no partial upload; resume with "
                f"--resume auto once the store answers"
            ) from None

    def _check_lock(self) -> None:
        if self.storage._lock is not None:
            self.storage._lock.check()

    def _confirm_lock(self) -> None:
        if self.storage._lock is not None:
            self.storage._lock.confirm()

    def copy(self, source: str, target: str) -> None:
        bucket, source_key = self.storage.bucket_key(self.storage.key(source))
        target_key = self.storage.bucket_key(self.storage.key(target))[1]
        try:
            copy_keeping_metadata(self.fs, bucket, source_key, target_key, self._confirm_lock)
        finally:
            self.fs.invalidate_cache(self.storage.key(target))

    def publish(self, source: str, target: str) -> None:
        self._check_lock()
        try:
            self.copy(source, target)  # server-side, and atomic at the target
        except CheckpointError:
            raise
        except Exception as error:
            raise CheckpointError(
                f"could not publish {self.storage.location(target)} from {source}: {_reason(error)}; "
                f"{source} is written; resume with --resume auto once the store answers"
            ) from None


class ObjectStorage:
    """A prefix in an object store, by URL (`s3://bucket/run`)."""

    def __init__(self, url: str, storage_options: dict, lock_expiry: float = LOCK_EXPIRY_S):
        self.url = url.rstrip("/")
        self.fs, self.root = _filesystem(self.url, storage_options)
        _require_s3(self.url, self.fs)
        self.lock_expiry = lock_expiry
        self.notes: list[str] = []  # lines for the run log (a lock taken over)
        self._lock: ObjectLock | None = None
        self.uploads = ObjectUploads(self)

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
        except Exception as error:  # the store failed, not the object: ReadError never sets anything aside
            raise ReadError(f"{self.url}: could not {what} ({_reason(error)})") from None

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
        self.uploads.write(name, save, summary)

    def publish(self, source: str, target: str) -> None:
        self.uploads.publish(source, target)

    def summary(self, name: str) -> dict[str, str] | None:
        try:
            return self._call("read an object's metadata", self.fs.metadata, self.key(name)) or None
        except FileNotFoundError:
            return None

    def remove(self, name: str) -> None:
        self._call("remove an object", self.fs.rm_file, self.key(name))

    def move_aside(self, name: str, new_name: str) -> None:
        self._call("copy an object aside", self.uploads.copy, name, new_name)
        self.remove(name)  # only once the copy exists

    def modified_ns(self, name: str) -> int:
        info = self._call("look up an object", self.fs.info, self.key(name))
        return int(info["LastModified"].timestamp() * 1e9)

    def read_json(self, name: str) -> tuple[object, str]:
        """A small JSON value (None when it is not JSON) and the ETag of exactly that content (read again if it
        changed meanwhile)."""
        path = self.key(name)
        for _ in range(5):
            before = self._call("look up an object", self.fs.info, path, refresh=True)["ETag"]
            data = self._call("read an object", self.fs.cat_file, path)
            if self._call("look up an object", self.fs.info, path, refresh=True)["ETag"] == before:
                try:
                    return json.loads(data), before
                except ValueError:  # not JSON: the lock's check says it is unreadable
                    return None, before
        raise CheckpointError(f"{self.location(name)}: keeps changing while it is read; try again")

    @contextlib.contextmanager
    def local_copy(self, name: str) -> Iterator[str]:
        """The object downloaded to a temporary file, removed afterwards (tensors mapped from it stay valid)."""
        try:
            scratch = tempfile.TemporaryDirectory(prefix="brain-ckpt-")
        except OSError as error:  # TMPDIR missing or unwritable: the object is not at fault
            raise ReadError(
                f"could not download {self.location(name)}: {tempfile.gettempdir()} cannot be written "
                f"({error.strerror or error}); point TMPDIR at a writable disk"
            ) from None
        with scratch as folder:
            path = os.path.join(folder, name)
            # a full TMPDIR fails here, as the store's error (ReadError): nothing is taken for unreadable
            self._call(f"download {self.location(name)} into {folder}", self.fs.get_file, self.key(name), path)
            yield path

    def lock(self, holder: str) -> ObjectLock:
        self._lock = ObjectLock(self, holder, self.lock_expiry)
        return self._lock

    def clean_up(self) -> list[str]:
        return []  # nothing half-written is ever visible: an incomplete upload is the store's to expire
