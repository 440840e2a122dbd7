"""`brain-trainer train` (and `eval`): train the multimodal brain (an image encoder and a text encoder meeting
in one shared space) on Flickr8k, contrastively.

    brain-trainer train --demo                    # a small run on generated data, CPU friendly
    brain-trainer train --root_dir data/flickr8k --epochs 100 --resume auto
    brain-trainer train --root_dir data/flickr8k --savedir s3://bucket/run --resume auto
    torchrun --standalone --nproc_per_node 4 -m brain_trainer train --root_dir data/flickr8k --resume auto

A run can be stopped at any step (Ctrl-C, SIGTERM, SLURM's SIGUSR1) and resumed with `--resume`:
model, optimizer, scaler, RNG and data position come back, so it continues as if never stopped, also
on another number of processes (--batch_size is the global batch). docs/resume.md is the guide.
"""

from __future__ import annotations

import signal
import sys
import time

from brain_trainer.build import AssembledRun, build
from brain_trainer.checkpointing import CheckpointError
from brain_trainer.config import ConfigError, RunOptions, parse_args
from brain_trainer.data.annotations import DatasetError
from brain_trainer.data.image_cache import Interrupted
from brain_trainer.evaluation import Evaluator
from brain_trainer.run_log import RunLog
from brain_trainer.runtime import LaunchError, Runtime
from brain_trainer.safe_files import OutputError
from brain_trainer.trainer import TrainingError


def fit(assembled: AssembledRun, runtime: Runtime, log: RunLog, *, started: float) -> int:
    """Train to the end or to a stop, and report (the run closes after: the save in flight becomes durable).
    `started` (time.monotonic() at the program's start) times the run for the closing summary."""
    trainer, options = assembled.trainer, assembled.options
    checkpointer = trainer.checkpointer
    runtime.stop.last_good = checkpointer.last  # what a second Ctrl-C names
    status = trainer.fit()
    if status and log.failure is not None:  # not a signal: the events could not be written
        log.error(
            f"Error: {log.failure}; the run saved {checkpointer.last_saved} and stopped; resume with --resume auto"
        )
        return 2
    if status:
        log.stopped(
            signum=status - 128,
            where=trainer.position(),
            path=checkpointer.last_saved,
            argv=options.argv,
            world_size=runtime.world_size,
            program=options.program,
        )
        return status
    if options.demo:
        split = trainer.evaluator.split
        log.demo_report(trainer.last_metrics, len(split.images), len(split))
    log.summary(savedir=options.savedir, seconds=time.monotonic() - started, files=checkpointer.files())
    return 0


def evaluate_only(evaluator: Evaluator, options: RunOptions, runtime: Runtime, log: RunLog) -> int:
    log.small_split(options.eval_split, len(evaluator.split.images), options.folds)  # each fold is scored alone
    metrics = evaluator()
    if metrics is None:
        return stopped_early(runtime, log, "during evaluation", options)
    log.metrics_table(metrics, options.eval_split, images=len(evaluator.split.images), captions=len(evaluator.split))
    return 0


def stopped_early(runtime: Runtime, log: RunLog, where: str, options: RunOptions) -> int:
    signum = runtime.stop.signum or signal.SIGTERM
    log.stopped(
        signum=signum, where=where, path=None, argv=options.argv, world_size=runtime.world_size, program=options.program
    )
    return 128 + signum


def run(assembled: AssembledRun, runtime: Runtime, log: RunLog, started: float) -> int:
    """Evaluate, say there is nothing left to train, or train."""
    if assembled.evaluator is not None:
        return evaluate_only(assembled.evaluator, assembled.options, runtime, log)
    if assembled.trainer is None:
        state, epochs = assembled.run.state, assembled.run.settings.epochs
        log.print(
            f"Nothing left to train: the checkpoint has finished epoch {state.epoch - 1} and --epochs "
            f"is {epochs}; pass a larger --epochs to train on."
        )
        return 0
    return fit(assembled, runtime, log, started=started)


def main(
    argv: list[str] | None = None, program: tuple[str, ...] = ("brain-trainer", "train"), eval_only: bool = False
) -> int:
    """parse -> runtime -> build -> fit or eval -> close; returns the exit status."""
    started, options = time.monotonic(), None
    runtime, log = None, RunLog()
    try:
        command = parse_args(argv, description=__doc__, program=program, eval_only=eval_only)
        options = command.options
        runtime = Runtime.start(options.device)  # the process group, the device, the stop flag
        log = RunLog(enabled=runtime.is_main, stop=runtime.stop)
        with build(command, runtime, log) as assembled:  # closes in reverse order, whatever happens
            options = assembled.options
            return run(assembled, runtime, log, started)
    except (ConfigError, DatasetError, CheckpointError, LaunchError, OutputError) as error:
        log.error(f"Error: {error}")
        return 2
    except Interrupted as interrupted:
        return stopped_early(runtime, log, f"during {interrupted}", options)
    except TrainingError as error:
        log.error(f"Error: {error}")
        return 1
    except RuntimeError as error:  # a collective whose peer is gone: one line on every process left
        line = runtime.lost_contact(error) if runtime is not None else None
        if line is None:
            raise
        print(line, file=sys.stderr, flush=True)
        return 2
    finally:
        if runtime is not None:
            runtime.close()


run_program = main  # the name the command and the root script call: the run ends its loader workers itself
