"""Every subcommand's --help is its own reference: eval lists the flags eval reads and none of training's (and
refuses them), positionals are explained, and --vocab_size says how it relates to ckpt inspect's
text_vocab_size."""

from __future__ import annotations

import re

import pytest

from brain_trainer.cli import main
from brain_trainer.config import TRAINING_ONLY


def help_of(capsys, *command: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def flags(help_text: str) -> set[str]:
    return set(re.findall(r"^\s+(--[a-z_]+)", help_text, re.M))


def test_eval_help_lists_evaluation_flags_and_no_training_flag(capsys):
    train, evaluate = flags(help_of(capsys, "train")), flags(help_of(capsys, "eval"))
    assert {f"--{name}" for name in TRAINING_ONLY} <= train
    assert {"--resume", "--eval_split", "--root_dir", "--batch_size", "--precision", "--device"} <= evaluate
    assert not evaluate & {"--lr", "--epochs", "--overwrite", "--logdir", "--save_every_steps", "--eval_only"}


def test_eval_refuses_a_training_flag_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--resume", "last.pt", "--lr", "1e-3"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err == "Error: unrecognized arguments: --lr 1e-3 (see --help)\n"


def test_every_flag_and_positional_has_a_line_of_help(capsys):
    for command in (["train"], ["eval"], ["ckpt", "inspect"], ["ckpt", "convert"], ["search"], ["embed"], ["export"]):
        lines = help_of(capsys, *command).splitlines() + [""]
        for line, after in zip(lines, lines[1:]):
            if re.match(r"^  \S", line):  # an argument's entry: its help follows on the line or indented below
                assert re.match(r"^  \S.*\S {2,}\S", line) or after.startswith(" " * 10), (command, line)


def test_vocab_size_help_names_text_vocab_size(capsys):
    assert "text_vocab_size (ckpt inspect)" in " ".join(help_of(capsys, "train").split())
