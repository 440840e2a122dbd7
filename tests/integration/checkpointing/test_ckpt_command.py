"""`brain-trainer ckpt inspect | convert` on real files: what inspect prints and its verdict (exit 2 for a file
--resume refuses), convert of legacy files, and every failure as one `Error:` line with exit 2."""

from __future__ import annotations

import subprocess
import sys

from checkpoint_helpers import ROOT, broken_sources


def test_the_installed_command_reports_a_broken_file_without_a_traceback(tmp_path):
    sources = broken_sources(tmp_path)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "brain_trainer",
            "ckpt",
            "convert",
            "--trust",
            str(sources["random"]),
            str(tmp_path / "new.pt"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith(f"Error: {sources['random']}: "), done.stderr
