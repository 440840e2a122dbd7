"""Every file `brain-trainer export` writes gets the same mode, the one the user's umask gives new files (the
weights are not private while their config is readable)."""

from __future__ import annotations

import os
import stat

import pytest
from helpers import run_cli

pytestmark = pytest.mark.slow


def test_every_exported_file_has_the_umask_mode(one_epoch_run, tmp_path, capsys):
    umask = os.umask(0o022)
    os.umask(umask)
    out = tmp_path / "export"
    status, _, err = run_cli(
        capsys, "export", "--checkpoint", one_epoch_run / "ckpt" / "last_brain_v2.pt", "--out", out
    )
    assert status == 0, err
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= modes.keys()
    assert set(modes.values()) == {0o666 & ~umask}, modes
