"""--accum_steps that would give BatchNorm micro-batches of one sample per process is refused with the options,
in one line naming the smallest micro-batch and the largest --accum_steps that keeps it."""

from __future__ import annotations

import pytest

from brain_trainer.config import ConfigError, check_settings, parse_args, resolve_settings


def check(*argv: str, world_size: int = 1) -> None:
    command = parse_args(["--root_dir", "somewhere", "--image_weights", "none", *argv])
    model_config, settings, _, _ = resolve_settings(command.given, None, False)
    check_settings(command.options, model_config, settings, world_size)


def test_micro_batches_of_one_with_batchnorm_are_one_line_naming_the_smallest_micro_batch():
    with pytest.raises(ConfigError) as refusal:
        check("--image_encoder", "resnet18", "--batch_size", "8", "--accum_steps", "8")
    assert str(refusal.value) == (
        "--accum_steps 8: micro-batches of 1 per process, which the BatchNorm in --image_encoder resnet18 cannot "
        "train on (the smallest micro-batch is 2); use --accum_steps 4 or a larger --batch_size"
    )


def test_the_micro_batch_is_counted_per_process():
    with pytest.raises(ConfigError, match=r"^--accum_steps 3: micro-batches of 1 per process, .* use --accum_steps 1 "):
        check("--image_encoder", "mobilenet_v3_small", "--batch_size", "6", "--accum_steps", "3", world_size=2)
    check("--image_encoder", "mobilenet_v3_small", "--batch_size", "12", "--accum_steps", "3", world_size=2)


def test_micro_batches_of_one_are_fine_without_batchnorm_and_two_are_fine_with_it():
    check("--image_encoder", "alexnet", "--batch_size", "8", "--accum_steps", "8")
    check("--image_encoder", "convnext_tiny", "--batch_size", "8", "--accum_steps", "8")  # LayerNorm
    check("--image_encoder", "resnet18", "--batch_size", "8", "--accum_steps", "4")
