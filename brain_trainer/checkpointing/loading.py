"""Safe loading: `torch.load(weights_only=True)` from any storage, with every refusal said in one line, and the
startup checks a file must pass before a run resumes from it."""

from __future__ import annotations

import errno
import io
import os
import pickle
import pickletools
import re
import struct
import warnings
import zipfile

import torch

from brain_trainer.checkpointing.base import ReadError, Storage
from brain_trainer.checkpointing.format import (
    CheckpointError,
    first,
    is_full_checkpoint,
    model_weights,
    nonfinite_tensors,
)
from brain_trainer.checkpointing.storage import locate
from brain_trainer.checkpointing.validate import check_fields, check_tensor_sizes

# Globals that old checkpoints commonly hold and that build plain values when unpickled: only for files asking for
# these alone does a refusal suggest `convert --trust`. Anything else (os.system, builtins.eval, ...) runs code.
BENIGN_GLOBALS = {
    "argparse.Namespace",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "collections.OrderedDict",
    "torch.torch_version.TorchVersion",
    "pathlib.PosixPath",
    "builtins.set",
    "builtins.slice",
    "_codecs.encode",
}


def _pickle_globals(data: bytes) -> list[str] | None:
    """Every global named by the pickles at the start of `data` (a legacy file is several in a row, then raw
    bytes), in order; None when one cannot be read statically (then nothing is offered)."""
    found, stream, scanned = [], io.BytesIO(data), 0
    while stream.tell() < len(data):
        strings: list[str] = []  # the string pushes just before a STACK_GLOBAL name its module and name
        try:
            for opcode, argument, _ in pickletools.genops(stream):
                if opcode.name in ("GLOBAL", "INST"):
                    found.append(argument.replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL":
                    if len(strings) < 2:
                        return None
                    found.append(f"{strings[-2]}.{strings[-1]}")
                if isinstance(argument, str) and "UNICODE" in opcode.name:
                    strings.append(argument)
                elif opcode.name not in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                    strings.clear()
        except Exception:  # the raw bytes after a legacy file's pickles, or not a pickle at all
            return found if scanned else None
        scanned += 1
    return found


def _unsafe_globals(path: str) -> list[str] | None:
    """The globals in the file that safe loading does not allow, all of them, whatever their order (torch's own
    scan stops at the first opcode it does not know, and its refusal names only the first); None when the file's
    pickles cannot be read statically."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                pickles = [archive.read(name) for name in archive.namelist() if name.endswith(".pkl")]
        else:
            with open(path, "rb") as handle:
                pickles = [handle.read()]
        allowed = set(torch._weights_only_unpickler._get_allowed_globals())
    except Exception:
        return None
    names = [_pickle_globals(data) for data in pickles]
    if not pickles or any(found is None for found in names):
        return None
    return list(dict.fromkeys(name for found in names for name in found if name not in allowed))


# What torch's loader and the zip reader raise for a truncated or foreign file (a text file is a KeyError on the
# legacy format's magic number, a truncated zip an OSError EINVAL from its seek); any other OSError, and a
# MemoryError, is the reading's failure, not the file's.
DAMAGED = (RuntimeError, EOFError, ValueError, KeyError, IndexError, struct.error, zipfile.BadZipFile)


def _refusal(path: str, location: str, error: pickle.UnpicklingError) -> CheckpointError:
    """Why `weights_only` refused the file: benign old globals (convertible), code-running ones, or none."""
    unsafe = _unsafe_globals(path)
    if unsafe and all(name.split(".dtype[")[0] in BENIGN_GLOBALS for name in unsafe):
        return CheckpointError(
            f"{location}: refused: loading it would need unsafe unpickling of "
            f"{', '.join(unsafe)}; if you trust where the file comes from, `brain-trainer ckpt "
            f"convert --trust {location} NEW.pt` makes a safe copy (unpickling runs its code)"
        )
    named = unsafe or re.findall(r"GLOBAL (\S+)", str(error))
    if named:
        return CheckpointError(
            f"{location}: refused: loading it would need unsafe unpickling of "
            f"{', '.join(named)}, which can run any code; do not load it (there is no safe way "
            f"to); point --resume at another file"
        )
    return CheckpointError(
        f"{location}: not a PyTorch checkpoint that loads safely (a plain pickle or a foreign "
        f"file); point --resume at another file"
    )


def _damaged(location: str, error: Exception) -> CheckpointError:
    reason = (str(error).splitlines() or [type(error).__name__])[0].split(". ")[0]
    return CheckpointError(
        f"{location}: truncated or not a PyTorch checkpoint ({reason}); point --resume at another file"
    )


def _load_file(path: str, location: str, mmap: bool) -> dict:
    check_tensor_sizes(path, location)  # before torch.load allocates what the file claims
    try:
        if os.stat(path).st_size == 0:
            raise CheckpointError(f"{location}: empty file (0 bytes), not a checkpoint; point --resume at another file")
        with warnings.catch_warnings():  # torch's remarks on foreign pickles: the refusal below says what matters
            warnings.simplefilter("ignore", UserWarning)
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        raise _refusal(path, location, error) from None
    except MemoryError:
        raise ReadError(f"{location}: not enough memory to load it; the file is left as it is; free memory") from None
    except OSError as error:
        if error.errno == errno.EINVAL:  # torch's zip reader seeking before the start of a truncated file
            raise _damaged(location, error) from None
        raise ReadError(
            f"{location}: could not be read ({error.strerror or error}): an I/O error, not a verdict on the file, "
            f"which is left as it is; check the disk or the mount and run again"
        ) from None
    except DAMAGED as error:
        raise _damaged(location, error) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{location}: holds a {type(checkpoint).__name__}, not a checkpoint dict or state_dict")
    return checkpoint


def read_checkpoint(storage: Storage, name: str, mmap: bool = False) -> dict:
    """Load `name` from `storage` to CPU with `weights_only=True`, or raise CheckpointError saying why not.

    `mmap` maps the tensors instead of reading them (cheap for looking at a file's fields); it applies to zip
    files only. Never falls back to unsafe unpickling: a file that asks for arbitrary globals is refused and
    the globals are named."""
    location = storage.location(name)
    kind = storage.kind(name)
    if kind == "link":  # a link the user made (latest.pt -> ...) is read through; a dangling one is not there
        kind = "file" if os.path.exists(location) else None
    if kind is None:
        raise CheckpointError(f"Checkpoint file not found: {location} (check the path: ls -lh {location})")
    if kind == "folder":
        raise CheckpointError(f"{location}: is a folder; pass a checkpoint file")
    with storage.local_copy(name) as path:
        return _load_file(path, location, mmap)


def load_checkpoint(location: str, mmap: bool = False, storage_options: dict | None = None) -> dict:
    """`read_checkpoint` of a file given by its path or URL."""
    storage, name = locate(location, storage_options)
    return read_checkpoint(storage, name, mmap)


def load_for_resume(location: str, allow_nonfinite: bool = False, storage_options: dict | None = None) -> dict:
    """`load_checkpoint`, then the startup checks: field types and ranges, and no NaN or inf in the weights."""
    checkpoint = load_checkpoint(location, storage_options=storage_options)
    if is_full_checkpoint(checkpoint):
        check_fields(checkpoint, location)
    broken = nonfinite_tensors(model_weights(checkpoint, location))
    if broken and not allow_nonfinite:
        raise CheckpointError(
            f"{location}: {len(broken)} weight tensors hold NaN or inf (e.g. {first(broken, 2)}); "
            f"it is not a model to train or evaluate; resume from an earlier checkpoint "
            f"(--allow_nonfinite loads it anyway, for forensics)"
        )
    return checkpoint
