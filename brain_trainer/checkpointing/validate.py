"""One validation of a checkpoint's contents, for every command that reads one (`train --resume`, `eval`,
`embed`, `search`, `export`, `load_brain`, `ckpt inspect`): each field's type and range, every RNG state tried
on a scratch generator, the optimizer's per-parameter state, counters within int64, and, before `torch.load`
allocates anything, every tensor's size against the file's. A refusal is a CheckpointError: one line naming
the file, the field and what is wrong.
"""

from __future__ import annotations

import io
import math
import os
import random
import zipfile

import numpy as np
import torch

from brain_trainer.checkpointing.format import FORMAT_VERSION, CheckpointError, rng_states_of

MAX_COUNT = 2**62  # counters stay in int64 with room to count on (TensorBoard's writer takes steps as int64)
RNG_KEYS = {
    "python": ("version", "state", "gauss_next"),
    "numpy": ("bit_generator", "state", "pos", "has_gauss", "cached_gaussian"),
}


def describe(value) -> str:
    """A value as one short line: tensors by shape and dtype, long containers by kind and length, others by repr."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    if len(text) <= 60 and "\n" not in text:
        return text
    if isinstance(value, (dict, list, tuple)):
        return f"a {type(value).__name__} of {len(value)} items"
    return text.replace("\n", " ")[:57] + "..."


def fail(path: str, field: str, value, expected: str) -> None:
    raise CheckpointError(
        f"{path}: field '{field}' is {describe(value)} (expected {expected}); the file is damaged: "
        f"resume from another checkpoint"
    )


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------- before torch.load


def check_tensor_sizes(path: str, location: str) -> None:
    """Refuse a zip checkpoint whose tensors claim more bytes than its records hold, or than the file's size,
    before anything is allocated: its pickle is read with storages that take no memory (the meta device)."""
    if not os.path.isfile(path):
        return  # a pipe or a device: opening it here would block; the loader's own refusal names it
    if not zipfile.is_zipfile(path):
        return  # the legacy format: torch reads each storage's bytes from the file itself
    try:
        with zipfile.ZipFile(path) as archive:
            records = {  # storage key -> bytes of its record, archive/data/KEY
                info.filename.rsplit("/data/", 1)[1]: info.file_size
                for info in archive.infolist()
                if "/data/" in info.filename
            }
            pickle_name = next(name for name in archive.namelist() if name.endswith("data.pkl"))
            pickled = archive.read(pickle_name)
    except (zipfile.BadZipFile, StopIteration, OSError, ValueError):
        return  # not torch's layout: torch.load's own refusal says so
    file_size = os.path.getsize(path)

    def storage_of(saved_id):
        _, storage_type, key, _, numel = saved_id
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        if nbytes != records.get(str(key)):
            raise CheckpointError(
                f"{location}: storage {key} claims {nbytes} bytes, its record holds {records.get(str(key), 0)}; "
                f"the file is damaged: resume from another checkpoint"
            )
        meta = torch.UntypedStorage(nbytes, device="meta")
        return torch.storage.TypedStorage(wrap_storage=meta, dtype=dtype, _internal=True)

    unpickler = torch._weights_only_unpickler.Unpickler(io.BytesIO(pickled), encoding="utf-8")
    unpickler.persistent_load = storage_of
    try:
        tree = unpickler.load()
    except CheckpointError:
        raise
    except Exception:  # unsafe globals, a foreign pickle: torch.load's refusal names them
        return
    for field, tensor in _tensors(tree, ""):
        claimed = tensor.numel() * tensor.element_size()
        if claimed > file_size:
            raise CheckpointError(
                f"{location}: tensor '{field}' of shape {tuple(tensor.shape)} claims {claimed} bytes, more than "
                f"the file's {file_size}; the file is damaged: resume from another checkpoint"
            )


def _tensors(value, field: str):
    if isinstance(value, torch.Tensor):
        yield field, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{field}.{key}" if field else str(key))
    elif isinstance(value, (list, tuple)):
        for position, item in enumerate(value):
            yield from _tensors(item, f"{field}[{position}]")


# ----------------------------------------------------------------------------- the fields


def check_count(path: str, field: str, value, lowest: int = 0) -> None:
    if not is_int(value) or value < lowest:
        fail(path, field, value, f"an integer >= {lowest}")
    if value > MAX_COUNT:
        fail(path, field, value, "an integer <= 2**62, within int64")


def check_fields(checkpoint: dict, path: str) -> None:
    """Refuse a full checkpoint whose fields have the wrong types, keys or ranges, RNG states no generator
    takes, or optimizer state that no step can use, at startup, in one line."""
    version = checkpoint.get("format_version", 2)
    if not is_int(version):
        fail(path, "format_version", version, "an integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format {version!r} was written by a newer brain-trainer (this one reads "
            f"formats up to {FORMAT_VERSION}); upgrade brain-trainer to resume it"
        )
    check_count(path, "epoch", checkpoint["epoch"], lowest=-1)
    check_count(path, "global_step", checkpoint.get("global_step", 0))
    for name in ("best_val", "val_loss"):
        value = checkpoint.get(name)
        if value is not None and not is_number(value):
            fail(path, name, value, "a finite number or None")
    _check_data_state(checkpoint.get("data_state"), path)
    run = checkpoint.get("run")
    if isinstance(run, dict) and "trackers" in run:  # each tracker's run id, by tracker: the one nested dict
        _check_plain_dict(run["trackers"], path, "run.trackers", (str,))
        run = {key: value for key, value in run.items() if key != "trackers"}
    for name, kinds in PLAIN_DICTS.items():
        _check_plain_dict(run if name == "run" else checkpoint.get(name), path, name, kinds)
    _check_rng_states(checkpoint.get("rng_state"), path)
    world_size = checkpoint.get("world_size", 1)
    if not is_int(world_size) or not 1 <= world_size <= 2**20:
        fail(path, "world_size", world_size, "the number of processes that wrote it")
    if checkpoint.get("tokenizer") is not None:
        _check_tokenizer(checkpoint["tokenizer"], path)
    if not isinstance(checkpoint.get("model_state_dict"), dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor)
        for key, value in checkpoint["model_state_dict"].items()
    ):
        fail(path, "model_state_dict", checkpoint.get("model_state_dict"), "a dict of weight names to tensors")
    check_optimizer_state(checkpoint.get("optimizer_state_dict"), path)
    scaler = checkpoint.get("scaler_state_dict")
    if scaler is not None and not (isinstance(scaler, dict) and all(map(is_number, scaler.values()))):
        fail(path, "scaler_state_dict", scaler, "a dict of finite numbers (GradScaler's state)")
    if checkpoint.get("created") is not None and not isinstance(checkpoint["created"], str):
        fail(path, "created", checkpoint["created"], "an ISO time")


SCALARS = (str, int, float, bool, type(None))
PLAIN_DICTS = {  # fields holding a dict of names to plain values, and the types each value may have
    "config": SCALARS + (list, tuple),  # an older program's config may hold a list (betas, ...): never read
    "run": (str, int, type(None)),
    "data": (str, float, type(None)),  # where the data is, and the hash split's fractions
    "versions": (str,),
}


def _check_plain_dict(value, path: str, name: str, kinds: tuple[type, ...]) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        fail(path, name, value, "a dict")
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, kinds):
            expected = " or ".join("None" if kind is type(None) else kind.__name__ for kind in kinds)
            fail(path, f"{name}.{key}", item, f"a {expected}")


def _check_data_state(data_state, path: str) -> None:
    if data_state is None:
        return
    if not isinstance(data_state, dict):
        fail(path, "data_state", data_state, "a dict")
    for name in ("epoch", "samples_seen"):
        check_count(path, f"data_state.{name}", data_state.get(name))
    for name in ("skipped_images", "epoch_loss_steps"):
        check_count(path, f"data_state.{name}", data_state.get(name, 0))
    if not is_number(data_state.get("epoch_loss_sum", 0.0)):
        fail(path, "data_state.epoch_loss_sum", data_state.get("epoch_loss_sum"), "a finite number")
    _check_plain_dict(data_state.get("fingerprint"), path, "data_state.fingerprint", (str, int))


def _check_tokenizer(text, path: str) -> None:
    from tokenizers import Tokenizer

    if not isinstance(text, str):
        fail(path, "tokenizer", type(text).__name__, "the tokenizer's JSON text or None")
    try:
        Tokenizer.from_str(text)
    except Exception as error:  # the tokenizers library says only "data did not match any variant", as an Exception
        reason = (str(error).splitlines() or [type(error).__name__])[0][:80]
        fail(path, "tokenizer", text, f"a tokenizer's JSON; it does not load: {reason}")


# ----------------------------------------------------------------------------- RNG


def _check_rng_states(saved, path: str) -> None:
    if saved is not None and not isinstance(saved, (dict, list)):
        fail(path, "rng_state", type(saved).__name__, "a dict or a list of dicts")
    for index, state in enumerate(rng_states_of({"rng_state": saved})):
        if not (
            isinstance(state, dict)
            and isinstance(state.get("torch"), torch.Tensor)
            and isinstance(state.get("cuda"), list)
            and all(
                isinstance(state.get(part), dict) and all(key in state[part] for key in keys)
                for part, keys in RNG_KEYS.items()
            )
        ):
            fail(
                path,
                f"rng_state[{index}]",
                type(state).__name__,
                "a dict of python, numpy, torch and cuda states with their keys",
            )
        for part, restore in (
            ("python", _python_rng),
            ("numpy", _numpy_rng),
            ("torch", _torch_rng),
            ("cuda", _cuda_rng),
        ):
            try:
                restore(state[part])
            except Exception as error:  # each generator says no in its own way (ValueError, TypeError, RuntimeError)
                reason = (str(error).splitlines() or [type(error).__name__])[0][:80]
                fail(path, f"rng_state[{index}].{part}", state[part], f"a state its generator takes; {reason}")


def _python_rng(state: dict) -> None:
    random.Random().setstate((state["version"], tuple(state["state"].tolist()), state["gauss_next"]))


def _numpy_rng(state: dict) -> None:
    """Tried on a scratch generator; `pos` is checked first, as numpy reads its key at `pos` unchecked."""
    if not (is_int(state["pos"]) and 0 <= state["pos"] <= 624 and state["has_gauss"] in (0, 1)):
        raise ValueError(f"pos {state['pos']!r} or has_gauss {state['has_gauss']!r} out of range")
    if state["bit_generator"] != "MT19937" or not is_number(state["cached_gaussian"]):
        raise ValueError(f"{state['bit_generator']!r} is not MT19937, or its cached gaussian is not a number")
    keys = state["state"]
    if not (isinstance(keys, torch.Tensor) and keys.shape == (624,) and not keys.is_floating_point()):
        raise ValueError("its key is not 624 integers")
    np.random.RandomState().set_state(
        ("MT19937", keys.numpy().astype(np.uint32), state["pos"], state["has_gauss"], state["cached_gaussian"])
    )


def _torch_rng(state: torch.Tensor) -> None:
    torch.Generator().set_state(state)


def _cuda_rng(states: list) -> None:
    for state in states:
        if not (isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.dim() == 1):
            raise ValueError(f"a device's state is {describe(state)}, not bytes")
        if torch.cuda.is_available():
            torch.Generator(device="cuda").set_state(state)


# ----------------------------------------------------------------------------- the optimizer

MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
GROUP_NUMBERS = ("lr", "eps", "weight_decay")


def check_optimizer_state(saved, path: str) -> None:
    """AdamW's state_dict as the file holds it: groups of parameter ids with numeric settings, and per parameter
    a scalar `step` and moments of one shape. (Moments against the model's weights: `restore`.)"""
    field = "optimizer_state_dict"
    if saved is None or saved == {}:
        return  # weights only: the optimizer starts fresh, as the resume block says
    if not (
        isinstance(saved, dict) and isinstance(saved.get("state"), dict) and isinstance(saved.get("param_groups"), list)
    ):
        fail(path, field, saved, "an optimizer's state_dict (state and param_groups)")
    ids = []
    for position, group in enumerate(saved["param_groups"]):
        if not (
            isinstance(group, dict)
            and isinstance(group.get("params"), list)
            and all(map(is_int, group["params"]))
            and all(_is_scalar(group.get(name, 0.0)) for name in GROUP_NUMBERS)
            and isinstance(group.get("betas", (0.9, 0.999)), (list, tuple))
            and len(group.get("betas", (0.9, 0.999))) == 2
            and all(map(_is_scalar, group.get("betas", (0.9, 0.999))))
        ):
            fail(path, f"{field}.param_groups[{position}]", group, "a dict of parameter ids and numeric settings")
        ids += group["params"]
    for key, entry in saved["state"].items():
        where = f"{field}.state[{key!r}]"
        if key not in ids or not isinstance(entry, dict):
            fail(path, where, entry, "the state of a parameter its param_groups name")
        step = entry.get("step", 0)
        if not _is_scalar(step) or not 0 <= float(step) <= MAX_COUNT:
            fail(path, f"{where}.step", step, "one number of steps taken (a scalar), within int64")
        moments = [entry[name] for name in MOMENTS if name in entry]
        if (
            not all(isinstance(m, torch.Tensor) and m.is_floating_point() for m in moments)
            or len({tuple(m.shape) for m in moments}) > 1
        ):
            fail(path, where, entry, "moments (exp_avg, exp_avg_sq) as float tensors of one shape")


def _is_scalar(value) -> bool:
    """A finite number, or a tensor holding one (AdamW keeps `step`, and may keep `lr`, as 0-dim tensors)."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and bool(torch.isfinite(value.float()).all())
    return is_number(value)


# ----------------------------------------------------------------------------- the run's settings


def check_settings_of(checkpoint: dict, path: str) -> None:
    """The run's saved settings, checked by the code that checks the command line's (config.py), for commands
    with no flags to override them (embed, search, export, load_brain, ckpt inspect); `train --resume` checks
    them in `build`, after the command line's overrides."""
    from brain_trainer.config import ConfigError, check_run_settings, resolve_settings

    if not isinstance(checkpoint.get("config"), dict):
        return
    try:
        model_config, settings, _, saved = resolve_settings({}, checkpoint["config"], False, path, overridable=False)
        check_run_settings(model_config, settings, from_checkpoint=saved, overridable=False)
    except ConfigError as error:
        raise CheckpointError(str(error)) from None
