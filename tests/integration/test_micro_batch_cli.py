"""The CLI refuses --accum_steps that gives BatchNorm micro-batches of one at startup: one line, exit status 2,
nothing trained or written."""

from __future__ import annotations

from helpers import run_args

from brain_trainer import train as cli


def test_accum_steps_equal_to_the_batch_with_batchnorm_is_refused_at_startup(sample_root, tmp_path, capsys):
    status = cli.main(run_args(sample_root, tmp_path, "--accum_steps", "8"))  # batch 8: micro-batches of 1
    captured = capsys.readouterr()
    assert status == 2 and captured.err.count("\n") == 1 and "Train samples" not in captured.out
    assert captured.err == (
        "Error: --accum_steps 8: micro-batches of 1 per process, and a BatchNorm in --image_encoder "
        "mobilenet_v3_small sees a 1x1 map at --image_size 32, which it cannot train on; the smallest micro-batch "
        "it accepts is 2: use --accum_steps 4 or a larger --batch_size\n"
    )
    assert not (tmp_path / "ckpt").exists()
