"""The `brain-trainer` command: one entry, a subcommand each.

    brain-trainer train --demo                      # also: brain-trainer --demo (train is the default)
    brain-trainer eval --resume checkpoints_brain_v2/best_brain_v2.pt --eval_split test
    brain-trainer ckpt inspect checkpoints_brain_v2/last_brain_v2.pt
    brain-trainer ckpt convert old_weights.pt converted_brain_v2.pt
    brain-trainer sample-data data/flickr8k_sample --layout karpathy
    brain-trainer embed --checkpoint checkpoints_brain_v2/best_brain_v2.pt --images photos/ --out photos.index
    brain-trainer search --index photos.index --text "a dog running on the beach" -k 5
    brain-trainer export --checkpoint checkpoints_brain_v2/best_brain_v2.pt --out brain_export
    brain-trainer shards index 'data/cc/{00000..00099}.tar'

Each subcommand's own `--help` is its reference; `brain-trainer --version` prints the version.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers' threads and loader workers do not mix

SUBCOMMANDS = {
    "train": "train a brain (the default when the first argument is a flag)",
    "eval": "evaluate a checkpoint's retrieval on a split (train's --eval_only)",
    "ckpt": "inspect or convert checkpoint files",
    "sample-data": "write the generated Flickr8k look-alike the demo and the tests use",
    "embed": "embed a folder of images (and captions) with a checkpoint into an index",
    "search": "search an index by text or image (exact cosine, the model's retrieval)",
    "export": "export a checkpoint as safetensors + config + tokenizer, or as two ONNX towers",
    "shards": "index WebDataset shards (a disk or an object store) for training with --train_shards",
}


def _train(argv: list[str], program: tuple[str, ...]) -> int:
    from brain_trainer.train import run_program

    return run_program(argv, program=(*program, "train"))


def _eval(argv: list[str], program: tuple[str, ...]) -> int:
    from brain_trainer.train import run_program

    return run_program(argv, program=(*program, "eval"), eval_only=True)


def _ckpt(argv: list[str], program: tuple[str, ...]) -> int:
    from brain_trainer.checkpointing.cli import main as ckpt_main

    return ckpt_main(argv, prog=" ".join((*program, "ckpt")))


def _sample_data(argv: list[str], program: tuple[str, ...]) -> int:
    from brain_trainer.data.sample_data import main as sample_main

    return sample_main(argv, prog=" ".join((*program, "sample-data")))


def _embed(argv: list[str], program: tuple[str, ...]) -> int:
    from brain_trainer.inference.embed import main as embed_main

    return embed_main(argv, prog=" ".join((*program, "embed")))


def _search(argv: list[str], program: tuple[str, ...]) -> int:
    from brain_trainer.inference.search import main as search_main

    return search_main(argv, prog=" ".join((*program, "search")))


def _export(argv: list[str], program: tuple[str, ...]) -> int:
    from brain_trainer.inference.export import main as export_main

    return export_main(argv, prog=" ".join((*program, "export")))


def _shards(argv: list[str], program: tuple[str, ...]) -> int:
    from brain_trainer.data.shards_cli import main as shards_main

    return shards_main(argv, prog=" ".join((*program, "shards")))


COMMANDS: dict[str, Callable[[list[str], tuple[str, ...]], int]] = {
    "train": _train,
    "eval": _eval,
    "ckpt": _ckpt,
    "sample-data": _sample_data,
    "embed": _embed,
    "search": _search,
    "export": _export,
    "shards": _shards,
}


def version() -> str:
    """This program's version and the ones a bug report needs, read without importing torch (which is slow)."""
    from importlib.metadata import version as installed

    from brain_trainer import __version__

    return f"brain-trainer {__version__} (Python {platform.python_version()}, torch {installed('torch')})"


def usage(program: tuple[str, ...]) -> str:
    name = " ".join(program)
    lines = [f"usage: {name} COMMAND [options]   ({name} COMMAND --help for each)", "", "commands:"]
    lines += [f"  {command:12} {text}" for command, text in SUBCOMMANDS.items()]
    lines += ["", f"With a flag first ({name} --demo), the command is train; {name} --version prints the version."]
    return "\n".join(lines)


def main(argv: list[str] | None = None, program: tuple[str, ...] = ("brain-trainer",)) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage(program))
        return 0
    if argv and argv[0] == "--version":
        print(version())
        return 0
    if not argv:
        print(usage(program), file=sys.stderr)
        return 2
    if argv[0].startswith("-"):
        return _train(argv, program)  # the original CLI: flags only
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"Error: unknown command '{command}'; choose one of {', '.join(COMMANDS)} (see --help)", file=sys.stderr)
        return 2
    return COMMANDS[command](rest, program)
