"""`python -m brain_trainer ...` is the `brain-trainer` command."""

import sys

from brain_trainer.cli import main

if __name__ == "__main__":
    sys.exit(main(program=("python", "-m", "brain_trainer")))
