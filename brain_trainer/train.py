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

from brain_trainer.build import Resume, Run, Training, build, build_eval, choose_checkpoint, start_training
from brain_trainer.checkpointing import LAST, CheckpointError, checkpoint_names
from brain_trainer.config import ConfigError, RunOptions, parse_args
from brain_trainer.data.annotations import DatasetError
from brain_trainer.data.image_cache import Interrupted
from brain_trainer.data.loaders import end_loader_workers
from brain_trainer.run_log import RunLog
from brain_trainer.runtime import LaunchError, Runtime
from brain_trainer.trainer import TrainingError


def fit(training: Training, run: Run, options: RunOptions, runtime: Runtime, log: RunLog, *, started: float) -> int:
    """Train to the end or to a stop, report, and close: the save in flight becomes durable, also on an error.
    `started` (time.monotonic() at the program's start) times the run for the closing summary."""
    trainer = training.trainer
    runtime.stop.last_good = trainer.checkpointer.location(LAST)  # what a second Ctrl-C names
    try:
        status = trainer.fit()
        if status:
            log.stopped(
                signum=status - 128,
                where=trainer.position(),
                path=trainer.last_saved,
                argv=options.argv,
                world_size=runtime.world_size,
                program=options.program,
            )
        elif options.demo:
            split = trainer.evaluator.split
            log.demo_report(trainer.last_metrics, len(split.images), len(split))
        if not status:
            log.summary(
                savedir=options.savedir,
                logdir=options.logdir,
                seconds=time.monotonic() - started,
                files=checkpoint_names(trainer.checkpointer.storage),
            )
        return status
    finally:
        log.close()
        trainer.checkpointer.close()
        if training.lock is not None:
            training.lock.release()


def evaluate_only(run: Run, options: RunOptions, runtime: Runtime, log: RunLog) -> int:
    evaluator = build_eval(run, options, runtime, log)
    log.small_split(options.eval_split, len(evaluator.split.images))
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


def main(
    argv: list[str] | None = None, program: tuple[str, ...] = ("brain-trainer", "train"), eval_only: bool = False
) -> int:
    """parse -> runtime -> build -> fit -> close; returns the exit status."""
    started, options = time.monotonic(), None
    runtime, log = None, RunLog()
    try:
        command = parse_args(argv, description=__doc__, program=program, eval_only=eval_only)
        options = command.options
        runtime = Runtime.start(options.device)  # the process group, the device, the stop flag
        log = RunLog(enabled=runtime.is_main)
        resume: Resume = choose_checkpoint(options, runtime, log)
        run = build(command, resume, runtime, log)
        options = run.options
        if options.eval_only:
            return evaluate_only(run, options, runtime, log)
        if run.state.epoch >= run.settings.epochs:
            log.print(
                f"Nothing left to train: the checkpoint has finished epoch {run.state.epoch - 1} and --epochs "
                f"is {run.settings.epochs}; pass a larger --epochs to train on."
            )
            return 0
        return fit(start_training(run, resume, options, runtime, log), run, options, runtime, log, started=started)
    except (ConfigError, DatasetError, CheckpointError, LaunchError) as error:
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


def run_program(
    argv: list[str] | None = None, program: tuple[str, ...] = ("brain-trainer", "train"), eval_only: bool = False
) -> int:
    """`main` as a program runs it: whatever way it ends (an unexpected error included), it ends the process's
    loader workers, so the process itself ends."""
    try:
        return main(argv, program, eval_only)
    finally:
        end_loader_workers()
