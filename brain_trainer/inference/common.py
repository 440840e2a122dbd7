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


def positive_int(flag: str, lowest: int = 1) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"{value}: {flag} must be at least {lowest}")
        return value

    return parse


def resolve_device(name: str) -> torch.device:
    """`--device`: chosen as training chooses it (`auto`: the GPU when there is one); anything else is one line."""
    if name == "auto":
        return choose_device(name)
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's "Expected one of cpu, cuda, ... device type at start of device string"
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise InferenceError(f"--device {name}: not a device this program runs on; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InferenceError(f"--device {name}: no CUDA device is available; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise InferenceError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 .. "
            f"cuda:{torch.cuda.device_count() - 1}; name one of them"
        )
    return device


def run_command(action: Callable[[], int]) -> int:
    """Run `action`; a user mistake (a bad file, flag or checkpoint) is one line on stderr and exit status 2."""
    try:
        return action()
    except (InferenceError, CheckpointError, ConfigError, OutputError) as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
