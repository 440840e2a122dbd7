"""Settings: precedence (command line > checkpoint > demo > defaults), the checks with their one-line messages,
and a checkpoint's damaged config named as such."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
from helpers import check

from brain_trainer.brain_model import BrainConfig
from brain_trainer.build import build_model
from brain_trainer.config import (
    DEMO_SETTINGS,
    FLOAT_SETTINGS,
    ConfigError,
    TrainSettings,
    check_settings,
    fits_float32,
    parse_args,
    resolve_settings,
)


def test_the_command_line_beats_the_checkpoint_which_beats_the_defaults():
    saved = {**BrainConfig(d_shared=48).to_dict(), **asdict(TrainSettings(lr=3e-3, batch_size=10))}
    model_config, settings, overridden, from_checkpoint = resolve_settings(
        {"lr": 5e-4}, saved, demo=False, source="x.pt"
    )
    assert settings.lr == 5e-4 and settings.batch_size == 10 and model_config.d_shared == 48
    assert overridden == ["lr 0.003 -> 0.0005"]
    assert from_checkpoint["batch_size"] == "x.pt" and "lr" not in from_checkpoint


def test_the_demo_preset_applies_only_where_nothing_else_speaks():
    model_config, settings, _, _ = resolve_settings({"epochs": 2}, None, demo=True)
    assert settings.epochs == 2 and settings.batch_size == DEMO_SETTINGS["batch_size"]
    assert model_config.image_encoder == DEMO_SETTINGS["image_encoder"]


def test_options_and_settings_are_kept_apart_and_argv_is_recorded():
    command = parse_args(["--demo", "--lr", "1e-3", "--num_workers", "0"])
    assert command.given == {"lr": 1e-3}
    assert command.options.num_workers == 0 and command.options.root_dir == Path("data/flickr8k_sample")
    assert command.options.argv == ("--demo", "--lr", "1e-3", "--num_workers", "0")


@pytest.mark.parametrize(
    "field, value, expected",
    [("lr", "fast", "float"), ("batch_size", 8.5, "int"), ("hflip", "yes", "bool"), ("epochs", True, "int")],
)
def test_a_damaged_config_value_in_a_checkpoint_is_named_with_the_file(field, value, expected):
    with pytest.raises(ConfigError, match=rf"x\.pt: field 'config\.{field}' is .* \(expected a {expected}\)"):
        resolve_settings({}, {field: value}, demo=False, source="x.pt")


BAD_VALUES = [
    (["--warmup_steps", "-3"], "--warmup_steps -3: must be a number >= 0"),
    (["--grad_clip", "nan"], "--grad_clip nan: must be a number >= 0"),
    (["--batch_size", "1"], "--batch_size 1: must be at least 2"),
    (["--lr", "-1"], "--lr -1.0: must be a positive number"),
    (["--epochs", "0"], "--epochs 0: must be a positive integer"),
    (["--d_shared", "30", "--brain_heads", "4"], "--d_shared 30: must be divisible by --brain_heads 4"),
    (["--image_encoder", "resnet5000"], "--image_encoder resnet5000: not a torchvision classification model"),
    (["--image_weights", "IMAGENET9K"], "--image_weights IMAGENET9K: use DEFAULT, none, a local .pth file or one of"),
    (["--image_weights", "/nowhere/w.pth"], "--image_weights /nowhere/w.pth: no such file"),
    (["--dropout", "1.5"], "--dropout 1.5: must be in [0, 1)"),
    (["--scratch_text_width", "200"], "--scratch_text_width 200: must be below 64 or a multiple of 64"),
    (["--scratch_text_width", "100"], "--scratch_text_width 100: must be below 64 or a multiple of 64"),
    (["--num_workers", "-1"], "--num_workers -1: must not be negative"),
    (["--eval_only"], "--eval_only : needs --resume PATH"),
    (["--seed", "-1"], "--seed -1: must be in 0 .. 4294967295"),
]


@pytest.mark.parametrize("argv, message", BAD_VALUES, ids=[" ".join(argv) for argv, _ in BAD_VALUES])
def test_each_bad_value_is_one_line_naming_its_flag_and_the_fix(argv, message):
    with pytest.raises(ConfigError) as refusal:
        check(*argv)
    assert str(refusal.value).startswith(message) and "\n" not in str(refusal.value)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch_size", "abc"], "Error: argument --batch_size: invalid int value: 'abc'"),
        (["--precision", "fp8"], "Error: argument --precision: invalid choice: 'fp8'"),
    ],
)
def test_a_value_argparse_cannot_read_is_one_line_with_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--root_dir", "somewhere", *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith(message) and err.endswith("(see --help)\n") and err.count("\n") == 1


def test_an_image_encoder_that_is_not_a_convolutional_classifier_is_refused_as_the_model_is_built():
    command = parse_args(
        ["--root_dir", "somewhere", "--image_encoder", "vit_b_16", "--image_weights", "none", "--image_size", "32"]
    )
    model_config, settings, _, _ = resolve_settings(command.given, None, False)
    check_settings(command.options, model_config, settings)  # a torchvision classifier: the options pass
    with pytest.raises(ConfigError) as refusal:
        build_model(model_config, pretrained=False)
    assert str(refusal.value).startswith("--image_encoder vit_b_16: not a convolutional classifier")
    assert "\n" not in str(refusal.value)


def test_the_global_batch_must_divide_by_the_processes():
    with pytest.raises(
        ConfigError,
        match=r"--batch_size 10: the global batch must divide by the 4 processes; "
        r"use a multiple of 4",
    ):
        check("--batch_size", "10", world_size=4)
    check("--batch_size", "12", world_size=4)


def test_a_bad_value_from_a_checkpoint_says_where_it_came_from_and_how_to_override_it():
    with pytest.raises(
        ConfigError,
        match=r"--batch_size 1: must be at least 2 .*\(from ckpt\.pt; pass --batch_size "
        r"to override\)",
    ):
        check(saved={"batch_size": 1})


def test_every_float_setting_is_checked_against_float32():
    assert set(FLOAT_SETTINGS) == {"lr", "weight_decay", "min_lr_ratio", "grad_clip", "dropout"}
    assert fits_float32(2e-4) and fits_float32(0.0) and not fits_float32(1e39) and not fits_float32(1e-46)
