"""Settings: precedence (command line > checkpoint > demo > defaults), the checks with their one-line messages,
and a checkpoint's damaged config named as such."""

from __future__ import annotations

import pytest
from helpers import run_args

from brain_trainer import train as cli


@pytest.mark.parametrize(
    "flag, value",
    [("lr", "1e308"), ("weight_decay", "1e39"), ("grad_clip", "1e300"), ("lr", "1e-50"), ("min_lr_ratio", "1e-46")],
)
def test_a_float_setting_float32_cannot_hold_is_one_line_at_startup(sample_root, tmp_path, capsys, flag, value):
    status = cli.main(run_args(sample_root, tmp_path, f"--{flag}", value))
    captured = capsys.readouterr()
    assert status == 2 and captured.err.count("\n") == 1 and "Train samples" not in captured.out
    assert captured.err.startswith(
        f"Error: --{flag} {float(value)}: is out of the float32 range the optimizer computes in"
    )
