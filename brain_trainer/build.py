"""Assembling a run: which checkpoint to resume, the settings it resolves to, the data, the model and its
optimiser, where the run stands, the loaders and the Trainer. The entry script calls these in order; every
process runs them, and what only the main process may do (choose a file, claim a folder) goes through the
runtime, which hands its result to the others.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from brain_trainer.brain_model import BrainConfig, BrainModel, is_weights_file
from brain_trainer.checkpointing import (CheckpointError, Checkpointer, Discovery, RunLock, check_writable, checkpoint_in_folder,
                           claim_savedir, find_latest_checkpoint, load_checkpoint, load_for_resume, load_model_weights,
                           model_weights, probe_folder, restore_rng_state, restore_training_state, rng_states_of)
from brain_trainer.config import CommandLine, RunOptions, TrainSettings, check_settings, resolve_settings
from brain_trainer.data.loaders import Data, build_loaders, check_split_sizes, image_source, load_data
from brain_trainer.data.flickr8k_dataset import CaptionCollator, derive_seed
from brain_trainer.run_log import RunLog
from brain_trainer.runtime import Runtime
from brain_trainer.trainer import RunRecord, Trainer, TrainState, build_model, build_optimizer


@dataclass
class Resume:
    path: Path | None
    checkpoint: dict | None
    unreadable: list[tuple[Path, str]]  # files `--resume auto` could not read: set aside before the run writes


@dataclass
class Run:
    """What `build` makes: the settings resolved, the data, the model and its optimiser, where the run is."""
    model_config: BrainConfig
    settings: TrainSettings
    data: Data
    model: BrainModel
    optimizer: torch.optim.Optimizer
    autocast: object
    scaler: torch.amp.GradScaler
    state: TrainState


def choose_checkpoint(options: RunOptions, runtime: Runtime, log: RunLog) -> Resume:
    """The main process picks the file (`auto`: newest of the newest run; a folder: its newest); every process
    loads it to the CPU."""
    def choose() -> Discovery:
        if options.resume != "auto":
            path = Path(options.resume)
            return Discovery(checkpoint_in_folder(path) if path.is_dir() else path, [])
        found = find_latest_checkpoint(options.savedir, log=log.print)
        if found.path is None and options.eval_only:
            raise CheckpointError(f"--eval_only --resume auto: no checkpoint in {options.savedir} to evaluate; "
                                  f"pass --resume PATH")
        if found.path is None:
            log.print(f"--resume auto: no loadable checkpoint in {options.savedir}; starting a fresh run")
        return found

    found = runtime.on_main(choose) if options.resume else Discovery(None, [])
    checkpoint = load_for_resume(found.path, options.allow_nonfinite) if found.path else None
    return Resume(found.path, checkpoint, found.unreadable)


def build(command: CommandLine, resume: Resume, runtime: Runtime, log: RunLog) -> Run:
    """Settings (command line > checkpoint > defaults), checks, data, model, optimiser, and the resumed state."""
    options, checkpoint = command.options, resume.checkpoint
    model_config, settings, overridden, from_checkpoint = resolve_settings(
        command.given, (checkpoint or {}).get("config"), options.demo, str(resume.path))
    check_settings(options, model_config, settings, runtime.world_size, from_checkpoint)
    if settings.precision == "auto":  # the checkpoint records the resolved choice
        settings = replace(settings, precision="fp16" if runtime.device.type == "cuda" else "fp32")
    runtime.seed(settings.seed, options.deterministic)
    data = load_data(root_dir=options.root_dir, annotations=options.annotations, demo=options.demo,
                     text_encoder=model_config.text_encoder, vocab_size=settings.vocab_size,
                     saved_tokenizer=(checkpoint or {}).get("tokenizer"), runtime=runtime, log=log)
    check_split_sizes(data.splits, batch_size=settings.batch_size, eval_split=options.eval_only and options.eval_split)
    if model_config.text_encoder == "scratch":
        model_config = replace(model_config, text_vocab_size=len(data.tokenizer))
    model = runtime.prepare(build_model(model_config, pretrained=checkpoint is None))
    if checkpoint is None and is_weights_file(model_config.image_weights):
        load_image_weights_file(model, Path(model_config.image_weights), log)
    optimizer = build_optimizer(model, settings, runtime.device)
    autocast, scaler = runtime.precision(settings.precision)
    state = TrainState()
    if checkpoint is not None:
        restore_training_state(checkpoint, resume.path, model, optimizer, scaler, settings.precision,
                               model_config.to_dict(), state, log.print)
        optimizer.param_groups[0]["weight_decay"] = settings.weight_decay  # the run's setting beats the restored group
        log.resume_plan(checkpoint=checkpoint, overridden=overridden, fingerprint=data.splits["train"].fingerprint())
    if note := runtime.batchnorm_note(model):
        log.print(note)
    return Run(model_config, settings, data, model, optimizer, autocast, scaler, state)


def load_image_weights_file(model: BrainModel, path: Path, log: RunLog) -> None:
    report = load_model_weights(model.image_encoder.trunk, model_weights(load_checkpoint(path), path), path,
                                log=lambda line: None)
    log.print(f"✓ Image weights from {path}: {report.loaded} tensors ({100 * report.loaded_fraction:.0f}% of the trunk)")


def make_trainer(run: Run, resume: Resume, options: RunOptions, runtime: Runtime, log: RunLog) -> Trainer:
    """Image sources and loaders, the run's record for its checkpoints, the checkpointer, the Trainer."""
    settings, splits = run.settings, run.data.splits
    cache = {"use_cache": settings.cache_images, "image_size": run.model_config.image_size, "runtime": runtime,
             "cache_dir": options.cache_dir or options.root_dir / ".brain_cache", "num_workers": options.num_workers}
    train_images, cached = image_source(splits["train"], log=log, **cache)
    val_images, cached = image_source(splits["val"], log=log, **{**cache, "use_cache": cached})
    settings = replace(settings, cache_images=cached)  # one ⚠ line, and the run records that it decodes JPEGs
    collator = CaptionCollator(run.data.tokenizer, run.model_config.max_text_len)
    loaders = build_loaders(run.data, collator, train_images=train_images, val_images=val_images,
                            image_size=run.model_config.image_size, hflip=settings.hflip, batch_size=settings.batch_size,
                            seed=settings.seed, num_workers=options.num_workers, runtime=runtime)
    parent = ((resume.checkpoint or {}).get("run") or {}).get("id")
    lineage = runtime.broadcast({"id": uuid.uuid4().hex, "parent": parent, "started_ns": time.time_ns()})
    record = RunRecord(config={**run.model_config.to_dict(), **asdict(settings)}, tokenizer_json=run.data.tokenizer_json,
                       fingerprint=splits["train"].fingerprint(), lineage=lineage)
    checkpointer = Checkpointer(savedir=options.savedir, keep_last=settings.keep_last,
                                background=not options.sync_saves, enabled=runtime.is_main)
    return Trainer(runtime=runtime, model=run.model, optimizer=run.optimizer, autocast=run.autocast, scaler=run.scaler,
                   settings=settings, loaders=loaders, collator=collator, checkpointer=checkpointer, record=record,
                   state=run.state, log=log, log_every=options.log_every, compile=options.compile)


def restore_rng(resume: Resume, run: Run, runtime: Runtime, log: RunLog, deterministic: bool) -> None:
    """Last, so nothing built before draws from it: each process's own state at the same world size; at another,
    one derived from (seed, global step, rank), with a ⚠ line."""
    states = rng_states_of(resume.checkpoint or {})
    if len(states) == runtime.world_size:
        restore_rng_state(states[runtime.rank])
    elif states:
        log.print(runtime.rng_state_note(len(states)))
        runtime.seed(derive_seed(run.settings.seed, run.state.global_step, runtime.rank), deterministic)


def claim_folders(options: RunOptions, resume: Resume, log: RunLog) -> RunLock:
    """Both folders writable, and the checkpoint folder this run's (locked; see `claim_savedir`)."""
    check_writable(options.logdir, "logdir")
    lock = claim_savedir(options.savedir, resume=resume.path, overwrite=options.overwrite,
                         unreadable=resume.unreadable, log=log.print)
    try:
        probe_folder(options.logdir, "logdir")
    except BaseException:
        lock.release()
        raise
    return lock
