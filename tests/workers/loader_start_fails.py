"""Run by tests/test_cli.py: the CLI with every loader worker failing on its first sample (as derive_seed did on
numpy 1.26), started the way the shim starts it; the process must end, not wait on its loader workers."""

import sys

from brain_trainer import train
from brain_trainer.data import datasets


def broken_seed(*keys: int) -> int:
    raise TypeError("ufunc 'right_shift' not supported for the input types (injected)")


datasets.derive_seed = broken_seed  # the loader workers are forked from here and inherit it
sys.exit(train.run_program(sys.argv[1:], program=("python", "loader_start_fails.py")))
