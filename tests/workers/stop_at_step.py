"""Run under torchrun by tests/integration/test_batchnorm_processes.py: the CLI, whose main process sends itself a
real SIGTERM during step STOP_AT_STEP, so that every process stops at the step boundary after it: a stop at a step
known in advance (the last of an epoch, say), with no race against the run's speed."""

import os
import signal
import sys

from brain_trainer import train
from brain_trainer.trainer import Trainer

STOP_AT_STEP = int(os.environ["STOP_AT_STEP"])
original_step = Trainer.step


def step_then_signal(self: Trainer, batch: dict):
    if self.state.global_step + 1 == STOP_AT_STEP and self.runtime.is_main:
        signal.raise_signal(signal.SIGTERM)  # held by the stop flag until the next step boundary
    return original_step(self, batch)


Trainer.step = step_then_signal
sys.exit(train.run_program(sys.argv[1:], program=("python", "stop_at_step.py")))
