"""--accum_steps that gives BatchNorm micro-batches of one image per process where its map is 1x1 (one value per
channel: it cannot train on that) is refused with the options, in one line naming the smallest micro-batch and
the largest --accum_steps that keeps it."""

from __future__ import annotations

import pytest

from brain_trainer.config import ConfigError, check_settings, parse_args, resolve_settings


def check(*argv: str, world_size: int = 1) -> None:
    command = parse_args(["--root_dir", "somewhere", "--image_weights", "none", *argv])
    model_config, settings, _, _ = resolve_settings(command.given, None, False)
    check_settings(command.options, model_config, settings, world_size)


SMALL_RESNET = ["--image_encoder", "resnet18", "--image_size", "32"]  # its last stage is 1x1


def test_micro_batches_of_one_on_a_1x1_batchnorm_map_are_one_line_naming_the_smallest_micro_batch():
    with pytest.raises(ConfigError) as refusal:
        check(*SMALL_RESNET, "--batch_size", "8", "--accum_steps", "8")
    assert str(refusal.value) == (
        "--accum_steps 8: micro-batches of 1 per process, and a BatchNorm in --image_encoder resnet18 sees a 1x1 "
        "map at --image_size 32, which it cannot train on; the smallest micro-batch it accepts is 2: use "
        "--accum_steps 4 or a larger --batch_size"
    )


def test_the_micro_batch_is_counted_per_process():
    with pytest.raises(ConfigError, match=r"^--accum_steps 3: micro-batches of 1 per process, .* --accum_steps 1 "):
        check(*SMALL_RESNET, "--batch_size", "6", "--accum_steps", "3", world_size=2)
    check(*SMALL_RESNET, "--batch_size", "12", "--accum_steps", "3", world_size=2)


def test_micro_batches_of_one_pass_without_batchnorm_or_where_its_maps_are_larger():
    check("--image_encoder", "alexnet", "--image_size", "64", "--batch_size", "8", "--accum_steps", "8")
    check("--image_encoder", "convnext_tiny", "--image_size", "32", "--batch_size", "8", "--accum_steps", "8")
    check("--image_encoder", "resnet18", "--image_size", "64", "--batch_size", "8", "--accum_steps", "8")  # 2x2
    check(*SMALL_RESNET, "--batch_size", "8", "--accum_steps", "4")
