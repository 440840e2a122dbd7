"""The shard flags' startup checks (one line naming the flag, the value and the fix), and where a resume finds
the shards when the command line does not name them."""

from __future__ import annotations

import pytest
from helpers import check

from brain_trainer.config import ConfigError, check_settings, parse_args, resolve_settings, with_saved_data


def test_val_shards_without_train_shards_is_refused():
    with pytest.raises(ConfigError, match="--val_shards v/{0..1}.tar: needs --train_shards"):
        check("--val_shards", "v/{0..1}.tar")


def test_a_negative_shard_cache_is_refused():
    with pytest.raises(ConfigError, match="--shard_cache_gb -1.0: must be a number of GB >= 0"):
        check("--train_shards", "t/{0..1}.tar", "--shard_cache_gb", "-1")


def test_train_and_val_shards_need_no_root_dir_but_train_shards_alone_do():
    def check_without_root(*argv: str) -> None:
        command = parse_args(list(argv))
        model_config, settings, _, _ = resolve_settings(command.given, None, False, "ckpt.pt")
        check_settings(command.options, model_config, settings)

    check_without_root("--train_shards", "t/{0..1}.tar", "--val_shards", "v/0.tar")
    with pytest.raises(ConfigError, match="with --train_shards, give --root_dir or --val_shards for validation"):
        check_without_root("--train_shards", "t/{0..1}.tar")


def test_a_resume_without_data_flags_takes_the_checkpoints_shards_and_the_command_line_wins():
    saved = {"train_shards": "s3://b/t/{0..9}.tar", "val_shards": "s3://b/v/0.tar"}
    command, note = with_saved_data(parse_args([]), saved)
    assert (command.options.train_shards, command.options.val_shards) == (saved["train_shards"], saved["val_shards"])
    assert note.startswith("Data: s3://b/t/{0..9}.tar and s3://b/v/0.tar (from the checkpoint")
    given, note = with_saved_data(parse_args(["--train_shards", "other/{0..1}.tar"]), saved)
    assert given.options.train_shards == "other/{0..1}.tar" and given.options.val_shards is None and note is None
