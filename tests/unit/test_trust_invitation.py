"""`ckpt convert --trust` is offered only for files whose every global builds a plain value: a benign global
first must not vouch for a dangerous one after it. Nothing here ever unpickles the payload."""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import pytest
import torch

from brain_trainer.checkpointing import CheckpointError, load_checkpoint


class Payload:
    """Unpickled, it would run a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def save(kind: str, value: dict, path: Path) -> None:
    if kind == "zip":
        torch.save(value, path)
    elif kind == "legacy":
        torch.save(value, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(value, protocol=4))  # STACK_GLOBAL, not GLOBAL


@pytest.mark.parametrize("kind", ["zip", "legacy", "pickle4"])
def test_a_benign_global_before_a_dangerous_one_is_refused_without_the_trust_invitation(kind, tmp_path):
    marker = tmp_path / "payload-ran"
    checkpoint = tmp_path / "old.pt"
    save(kind, {"args": argparse.Namespace(lr=0.1), "weights": torch.ones(2), "z": Payload(marker)}, checkpoint)

    with pytest.raises(CheckpointError) as refusal:
        load_checkpoint(str(checkpoint))

    assert "--trust" not in str(refusal.value)
    assert "os.system" in str(refusal.value) or "posix.system" in str(refusal.value), str(refusal.value)
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_a_file_asking_only_for_benign_globals_is_offered_the_trusted_convert(kind, tmp_path):
    checkpoint = tmp_path / "old.pt"
    save(kind, {"args": argparse.Namespace(lr=0.1), "weights": torch.ones(2)}, checkpoint)

    with pytest.raises(CheckpointError, match="convert --trust") as refusal:
        load_checkpoint(str(checkpoint))
    assert "argparse.Namespace" in str(refusal.value)
