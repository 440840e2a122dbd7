"""What the inference commands share: the argument parser whose mistakes are one line, the device, and
running a command so that every user mistake is one `Error: ...` line with exit status 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

from brain_trainer.checkpointing import CheckpointError
from brain_trainer.config import ConfigError
from brain_trainer.inference.load import InferenceError
from brain_trainer.runtime.precision import choose_device
from brain_trainer.safe_files import OutputError


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and status 2, like every other user mistake
        self.exit(2, f"Error: {message} (see --help)\n")


def positive_int(flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{value}: {flag} must be at least 1")
        return value

    return parse


def resolve_device(name: str) -> torch.device:
    """`--device`: chosen as training chooses it (`auto`: the GPU when there is one)."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InferenceError(f"--device {name}: no CUDA device is available; use --device cpu")
    return choose_device(name)


def run_command(action: Callable[[], int]) -> int:
    """Run `action`; a user mistake (a bad file, flag or checkpoint) is one line on stderr and exit status 2."""
    try:
        return action()
    except (InferenceError, CheckpointError, ConfigError, OutputError) as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
