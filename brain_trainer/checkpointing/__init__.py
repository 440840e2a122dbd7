"""The checkpoint wing: the file format, the storage under it, the background writer, the folder's policy,
loading, restoring a run, and the `ckpt` command. Its public names are re-exported here.

    format.py       schema (format 3), names, field checks, RNG, key normalisation, TrainState <-> fields
    base.py         the Storage and Lock protocols, is_url (imports no storage)
    local.py        LocalStorage (the checkpoint code's only caller of rename, link, fsync, flock)
    object_store.py ObjectStorage: S3 and S3-compatible stores (other fsspec stores are refused at startup)
    storage.py      open_storage / locate: which storage a path or URL names
    checkpointer.py Checkpointer: the run's saves (when, names, RNG gather, the dict, main-only writing)
    writer.py       CheckpointWriter: snapshot at the step boundary, persist in the background
    folder.py       lock and consent, lineage-aware discovery, set-aside, rotation
    loading.py      weights-only loading from any storage, startup checks
    restore.py      weights, optimizer, scaler and position into a run; returns the ✓/⚠ lines
    cli.py          brain-trainer ckpt inspect | convert
"""

from brain_trainer.checkpointing.base import ReadError
from brain_trainer.checkpointing.checkpointer import Checkpointer, RunRecord, Saved, SavePolicy
from brain_trainer.checkpointing.folder import (
    Discovery,
    check_names,
    checkpoint_in_folder,
    checkpoint_names,
    claim_savedir,
    find_latest_checkpoint,
    rotate_snapshots,
    set_aside,
)
from brain_trainer.checkpointing.format import (
    BEST,
    FORMAT_VERSION,
    LAST,
    SNAPSHOT,
    CheckpointError,
    capture_rng_state,
    is_full_checkpoint,
    make_checkpoint,
    model_weights,
    nonfinite_tensors,
    normalize_keys,
    restore_rng_state,
    rng_states_of,
    snapshot_name,
    train_state_fields,
    train_state_of,
)
from brain_trainer.checkpointing.loading import load_checkpoint, load_for_resume, read_checkpoint
from brain_trainer.checkpointing.restore import (
    WeightsReport,
    load_model_weights,
    match_parameter_layout,
    restore_training_state,
)
from brain_trainer.checkpointing.storage import LOCK_NAME, LocalStorage, Storage, is_url, locate, open_storage
from brain_trainer.checkpointing.validate import check_fields
from brain_trainer.checkpointing.writer import CheckpointWriter, save_checkpoint

__all__ = [
    "BEST",
    "FORMAT_VERSION",
    "LAST",
    "LOCK_NAME",
    "SNAPSHOT",
    "CheckpointError",
    "CheckpointWriter",
    "Checkpointer",
    "Discovery",
    "LocalStorage",
    "ReadError",
    "RunRecord",
    "SavePolicy",
    "Saved",
    "Storage",
    "WeightsReport",
    "capture_rng_state",
    "check_fields",
    "check_names",
    "checkpoint_in_folder",
    "checkpoint_names",
    "claim_savedir",
    "find_latest_checkpoint",
    "is_full_checkpoint",
    "is_url",
    "load_checkpoint",
    "load_for_resume",
    "load_model_weights",
    "locate",
    "make_checkpoint",
    "match_parameter_layout",
    "model_weights",
    "nonfinite_tensors",
    "normalize_keys",
    "open_storage",
    "read_checkpoint",
    "restore_rng_state",
    "restore_training_state",
    "rng_states_of",
    "rotate_snapshots",
    "save_checkpoint",
    "set_aside",
    "snapshot_name",
    "train_state_fields",
    "train_state_of",
]
