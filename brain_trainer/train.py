"""Train the multimodal brain (image encoder + text encoder meeting in one shared space) on Flickr8k.

    python train_multimodal_brain_flickr8k.py --root_dir data/flickr8k --epochs 100 --resume auto
    python train_multimodal_brain_flickr8k.py --demo          # a small run on generated data, CPU friendly
    torchrun --standalone --nproc_per_node 4 train_multimodal_brain_flickr8k.py --root_dir data/flickr8k --resume auto

A run can be stopped at any step (Ctrl-C, SIGTERM, SLURM's SIGUSR1) and resumed with `--resume`:
model, optimizer, scaler, RNG and data position come back, so it continues as if never stopped, also
on another number of processes (--batch_size is the global batch).
"""
from __future__ import annotations

import os
import signal
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers' threads and loader workers do not mix

from brain_trainer.build import Resume, Run, build, choose_checkpoint, claim_folders, make_trainer, restore_rng
from brain_trainer.checkpointing import BEST, LAST, CheckpointError
from brain_trainer.config import ConfigError, RunOptions, parse_args
from brain_trainer.data.loaders import end_loader_workers, eval_loader, image_source
from brain_trainer.evaluation import evaluate
from brain_trainer.data.flickr8k_dataset import CaptionCollator, DatasetError, Interrupted
from brain_trainer.run_log import RunLog
from brain_trainer.runtime import LaunchError, Runtime
from brain_trainer.trainer import TrainingError


def train(run: Run, resume: Resume, options: RunOptions, runtime: Runtime, log: RunLog, *,
          started: float | None = None) -> int:
    """Claim the folders, assemble the loop, train; the checkpoint folder stays this run's until the end.
    `started` (time.monotonic() at the program's start) times the run for the closing summary."""
    started = time.monotonic() if started is None else started
    lock, trainer = [], None
    runtime.stop.last_good = options.savedir / LAST  # what a second Ctrl-C names
    try:
        runtime.on_main(lambda: lock.append(claim_folders(options, resume, log)))
        trainer = make_trainer(run, resume, options, runtime, log)
        log.banner(train_samples=len(run.data.splits["train"]), val_samples=len(run.data.splits["val"]),
                   device=runtime.device, precision=run.settings.precision, batch_size=run.settings.batch_size,
                   lr=run.settings.lr, start_epoch=run.state.epoch, epochs=run.settings.epochs,
                   world_size=runtime.world_size)
        log.small_split("val", len(run.data.splits["val"].images))
        restore_rng(resume, run, runtime, log, options.deterministic)
        log.open_tensorboard(options.logdir, purge_step=run.state.global_step + 1 if resume.checkpoint else 0,
                             config=trainer.record.config, step=run.state.global_step)
        status = trainer.fit()
        if status:
            log.stopped(signum=status - 128, where=trainer.position(), path=trainer.last_saved, argv=options.argv,
                        world_size=runtime.world_size, program=options.program)
        elif options.demo:
            split = trainer.loaders.val_split
            log.demo_report(trainer.last_metrics, len(split.images), len(split))
        if not status:
            log.summary(savedir=options.savedir, logdir=options.logdir, seconds=time.monotonic() - started,
                        files=[name for name in (LAST, BEST) if (options.savedir / name).is_file()])
        return status
    finally:
        log.close()
        if trainer is not None:
            trainer.checkpointer.close()  # also on an exception: the save in flight becomes durable first
        for held in lock:
            held.release()


def evaluate_only(run: Run, options: RunOptions, runtime: Runtime, log: RunLog) -> int:
    split = run.data.splits[options.eval_split]
    log.small_split(options.eval_split, len(split.images))
    images, _ = image_source(split, use_cache=run.settings.cache_images, image_size=run.model_config.image_size,
                             cache_dir=options.cache_dir or options.root_dir / ".brain_cache",
                             num_workers=options.num_workers, runtime=runtime, log=log)
    loader = eval_loader(split, images, image_size=run.model_config.image_size, batch_size=run.settings.batch_size,
                         num_workers=options.num_workers, runtime=runtime, seed=run.settings.seed)
    metrics = evaluate(model=run.model, split=split, image_loader=loader, collator=CaptionCollator(
        run.data.tokenizer, run.model_config.max_text_len), autocast=run.autocast, runtime=runtime,
        caption_batch=4 * run.settings.batch_size, should_stop=runtime.stop_seen_alone)
    if metrics is None:
        return stopped_early(runtime, log, "during evaluation", options)
    log.metrics_table(metrics, options.eval_split)
    return 0


def stopped_early(runtime: Runtime, log: RunLog, where: str, options: RunOptions) -> int:
    signum = runtime.stop.signum or signal.SIGTERM
    log.stopped(signum=signum, where=where, path=None, argv=options.argv, world_size=runtime.world_size,
                program=options.program)
    return 128 + signum


def main(argv: list[str] | None = None, program: tuple[str, ...] = ("brain-trainer", "train"),
         eval_only: bool = False) -> int:
    started = time.monotonic()
    command = parse_args(argv, description=__doc__, program=program, eval_only=eval_only)
    options = command.options
    runtime, log = None, RunLog()
    try:
        runtime = Runtime.start(options.device)  # the process group, the device, the stop flag
        log = RunLog(enabled=runtime.is_main)
        resume = choose_checkpoint(options, runtime, log)
        run = build(command, resume, runtime, log)
        if options.eval_only:
            return evaluate_only(run, options, runtime, log)
        if run.state.epoch >= run.settings.epochs:
            log.print(f"Nothing left to train: the checkpoint has finished epoch {run.state.epoch - 1} and --epochs "
                      f"is {run.settings.epochs}; pass a larger --epochs to train on.")
            return 0
        return train(run, resume, options, runtime, log, started=started)
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


def run_program(argv: list[str] | None = None, program: tuple[str, ...] = ("brain-trainer", "train"),
                eval_only: bool = False) -> int:
    """`main` as a program runs it: whatever way it ends (an unexpected error included), it ends the process's
    loader workers, so the process itself ends."""
    try:
        return main(argv, program, eval_only)
    finally:
        end_loader_workers()
