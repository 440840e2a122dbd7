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

from brain_trainer.build import Resume, Run, Training, build, build_eval, choose_checkpoint, start_training
from brain_trainer.checkpointing import CheckpointError
from brain_trainer.config import ConfigError, RunOptions, parse_args
from brain_trainer.data.flickr8k_dataset import DatasetError, Interrupted
from brain_trainer.run_log import RunLog
from brain_trainer.runtime import LaunchError, Runtime
from brain_trainer.trainer import TrainingError


def fit(training: Training, run: Run, options: RunOptions, runtime: Runtime, log: RunLog) -> int:
    """Train to the end or to a stop, report, and close: the save in flight becomes durable, also on an error."""
    trainer = training.trainer
    try:
        status = trainer.fit()
        if status:
            log.stopped(signum=status - 128, where=trainer.position(), path=trainer.last_saved, argv=options.argv,
                        world_size=runtime.world_size, program=options.program)
        elif options.demo:
            split = trainer.evaluator.split
            log.demo_report(trainer.last_metrics, len(split.images), len(split))
        return status
    finally:
        log.close()
        trainer.checkpointer.close()
        if training.lock is not None:
            training.lock.release()


def evaluate_only(run: Run, options: RunOptions, runtime: Runtime, log: RunLog) -> int:
    evaluator = build_eval(run, options, runtime, log)
    metrics = evaluator()
    if metrics is None:
        return stopped_early(runtime, log, "during evaluation", options)
    log.metrics_table(metrics, options.eval_split, images=len(evaluator.split.images), captions=len(evaluator.split))
    return 0


def stopped_early(runtime: Runtime, log: RunLog, where: str, options: RunOptions) -> int:
    signum = runtime.stop.signum or signal.SIGTERM
    log.stopped(signum=signum, where=where, path=None, argv=options.argv, world_size=runtime.world_size,
                program=options.program)
    return 128 + signum


def main(argv: list[str] | None = None, program: tuple[str, ...] = ("brain-trainer", "train"),
         eval_only: bool = False) -> int:
    """parse -> runtime -> build -> fit -> close; returns the exit status."""
    options = None
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
            log.print(f"Nothing left to train: the checkpoint has finished epoch {run.state.epoch - 1} and --epochs "
                      f"is {run.settings.epochs}; pass a larger --epochs to train on.")
            return 0
        return fit(start_training(run, resume, options, runtime, log), run, options, runtime, log)
    except (ConfigError, DatasetError, CheckpointError, LaunchError) as error:
        log.error(f"Error: {error}")
        return 2
    except Interrupted as interrupted:
        return stopped_early(runtime, log, f"during {interrupted}", options)
    except TrainingError as error:
        log.error(f"Error: {error}")
        return 1
    finally:
        if runtime is not None:
            runtime.close()
