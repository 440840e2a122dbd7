"""Assembling a run, in one place, and closing it: `build` chooses the checkpoint to resume, resolves the
settings, makes the data, the model and its optimiser, restores where the run stands, and then either the
evaluator (`eval`) or what training holds (the folder's lock, the loaders, the checkpointer, the Trainer, the
trackers). It returns an `AssembledRun`, a context manager that releases all of it in reverse order
on every path, the first error winning. Every process runs these; what only the main process may do (choose a
file, claim a folder) goes through the runtime. Nothing here prints but through the run log, and nothing here
trains.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath

import torch

from brain_trainer.brain_model import BrainConfig, BrainModel, is_weights_file
from brain_trainer.checkpointing import (
    Checkpointer,
    CheckpointError,
    Discovery,
    RunRecord,
    SavePolicy,
    checkpoint_in_folder,
    claim_savedir,
    find_latest_checkpoint,
    load_checkpoint,
    load_for_resume,
    load_model_weights,
    locate,
    model_weights,
    open_storage,
    restore_rng_state,
    restore_training_state,
    rng_states_of,
)
from brain_trainer.checkpointing.base import Lock, Storage
from brain_trainer.config import (
    CommandLine,
    RunOptions,
    TrainSettings,
    check_settings,
    resolve_settings,
    with_saved_data,
)
from brain_trainer.data.loaders import (
    Data,
    TrainLoaders,
    build_loaders,
    check_split_sizes,
    end_loader_workers,
    eval_loader,
    load_data,
    split_images,
)
from brain_trainer.data.shards_run import ShardData, load_shards
from brain_trainer.data.text import CaptionCollator
from brain_trainer.evaluation import Evaluator
from brain_trainer.model_factory import build_model
from brain_trainer.run_log import RunLog, claim_logdir
from brain_trainer.runtime import Runtime
from brain_trainer.runtime.seeding import derive_seed
from brain_trainer.tracking import TrackedRun
from brain_trainer.trainer import Trainer, TrainState, learning_rate

DECAY_GROUPS = ("decay", "no_decay")  # AdamW's parameter groups, by name


@dataclass
class Resume:
    """The checkpoint a run resumes from. `checkpoint` (the whole file, weights and Adam moments) is dropped
    once `build` has restored it; what the run still needs afterwards is kept beside it."""

    location: str | None
    checkpoint: dict | None
    unreadable: list[tuple[str, str]]  # names `--resume auto` could not read: set aside before the run writes
    parent: str | None = None  # the lineage id of the run it continues
    rng_states: list[dict] | None = None  # one per process that wrote it
    trackers: dict[str, str] = field(default_factory=dict)  # its tracker runs by tracker; once open, this run's
    threads: int | None = None  # the intra-op threads per process it was written with (older files: None)

    def drop_checkpoint(self) -> None:
        checkpoint, self.checkpoint = self.checkpoint or {}, None
        run = checkpoint.get("run") if isinstance(checkpoint.get("run"), dict) else {}
        self.parent, self.threads = run.get("id"), run.get("threads")
        saved = run.get("trackers")  # absent from checkpoints written before trackers were recorded
        self.trackers = {k: v for k, v in saved.items() if isinstance(v, str)} if isinstance(saved, dict) else {}
        self.rng_states = rng_states_of(checkpoint)


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
    options: RunOptions  # as given, with the data location the checkpoint named if none was given


Hold = Callable[[Callable[[], None]], None]  # hands a release to the run: called in reverse order when it closes


def releasing(release: Callable[[], None], log: RunLog):
    """An exit callback for the run's ExitStack: runs `release`; its error goes on when nothing failed before,
    and is said in a ⚠ line when something did, so the first error is the one the run ends with."""

    def exit_(kind, error, traceback) -> bool:
        try:
            release()
        except Exception as later:
            if error is None:
                raise
            log.error(f"⚠ Also, while closing after that: {later}")
        return False

    return exit_


@dataclass
class AssembledRun:
    """What `build` returns: the run and its evaluator (`eval`) or its Trainer (None when there is nothing left
    to train), holding the lock, loader workers, checkpointer and logging until it closes (`with`)."""

    run: Run
    held: ExitStack
    evaluator: Evaluator | None = None
    trainer: Trainer | None = None

    @property
    def options(self) -> RunOptions:
        return self.run.options

    def __enter__(self) -> AssembledRun:
        return self

    def __exit__(self, *failure) -> bool:
        return self.held.__exit__(*failure)


def savedir_storage(options: RunOptions) -> Storage:
    return open_storage(options.savedir, options.storage_options, options.lock_expiry)


def choose_checkpoint(options: RunOptions, runtime: Runtime, log: RunLog) -> Resume:
    """The main process picks the file (`auto`: newest of the newest run; a folder: its newest); every process
    loads it to the CPU."""

    def choose() -> Discovery:
        if options.resume != "auto":
            storage, name = locate(options.resume, options.storage_options)
            folder = open_storage(options.resume, options.storage_options)
            return Discovery(checkpoint_in_folder(folder) if storage.kind(name) == "folder" else options.resume, [])
        found = find_latest_checkpoint(savedir_storage(options), log=log.print)
        if found.location is None and options.eval_only:
            raise CheckpointError(
                f"--eval_only --resume auto: no checkpoint in {options.savedir} to evaluate; pass --resume PATH"
            )
        if found.location is None:
            log.print(f"--resume auto: no loadable checkpoint in {options.savedir}; starting a fresh run")
        return found

    found = runtime.on_main(choose) if options.resume else Discovery(None, [])
    checkpoint = (
        load_for_resume(found.location, options.allow_nonfinite, options.storage_options) if found.location else None
    )
    return Resume(found.location, checkpoint, found.unreadable)


def build_optimizer(model: torch.nn.Module, settings: TrainSettings, device: torch.device) -> torch.optim.AdamW:
    """AdamW with CLIP's betas; weight decay on matrices only, never on biases, norms or the temperature."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"name": "decay", "params": [p for p in params if p.dim() >= 2], "weight_decay": settings.weight_decay},
        {"name": "no_decay", "params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.98), eps=1e-6, fused=device.type == "cuda")


def apply_group_settings(optimizer: torch.optim.Optimizer, settings: TrainSettings) -> None:
    """The run's settings beat the restored groups' (an older file's groups carry no names: they are in the
    order `build_optimizer` makes them)."""
    for group, name in zip(optimizer.param_groups, DECAY_GROUPS):
        group["name"] = name
        group["weight_decay"] = settings.weight_decay if name == "decay" else 0.0


def build_run(command: CommandLine, resume: Resume, runtime: Runtime, log: RunLog) -> Run:
    """Settings (command line > checkpoint > defaults), checks, data, model, optimiser, and the resumed state."""
    checkpoint = resume.checkpoint or {}
    command, data_note = with_saved_data(command, checkpoint.get("data"))
    options = command.options
    model_config, settings, overridden, from_checkpoint = resolve_settings(
        command.given, checkpoint.get("config"), options.demo, str(resume.location)
    )
    check_settings(options, model_config, settings, runtime.world_size, from_checkpoint)
    runtime.set_threads(given=options.threads, workers=options.num_workers)  # before anything computes
    settings = replace(settings, precision=runtime.resolve_precision(settings.precision))  # the file records it
    runtime.seed(settings.seed, options.deterministic)
    if data_note:
        log.print(data_note)
    data = load_data(
        shards=_shards(options, runtime, log),
        root_dir=options.root_dir,
        annotations=options.annotations,
        val_fraction=options.val_fraction,
        test_fraction=options.test_fraction,
        demo=options.demo,
        text_encoder=model_config.text_encoder,
        vocab_size=settings.vocab_size,
        saved_tokenizer=checkpoint.get("tokenizer"),
        runtime=runtime,
        log=log,
    )
    check_split_sizes(
        data.splits,
        train_samples=data.train_samples(),
        batch_size=settings.batch_size,
        eval_split=options.eval_only and options.eval_split,
        folds=options.folds,
    )
    if model_config.text_encoder == "scratch":
        model_config = replace(model_config, text_vocab_size=len(data.tokenizer))
    model = runtime.prepare(build_model(model_config, pretrained=resume.checkpoint is None))
    if resume.checkpoint is None and is_weights_file(model_config.image_weights):
        load_image_weights_file(model, model_config.image_weights, log)
    optimizer = build_optimizer(model, settings, runtime.device)
    autocast, scaler = runtime.precision(settings.precision)
    run = Run(model_config, settings, data, model, optimizer, autocast, scaler, TrainState(), options)
    if resume.checkpoint is not None:
        restore(run, resume, overridden, log)
    resume.drop_checkpoint()  # the weights and moments now live in the model and optimiser: no second copy
    if note := runtime.batchnorm_note(model):
        log.print(note)
    return run


def restore(run: Run, resume: Resume, overridden: list, log: RunLog) -> None:
    """The checkpoint into the run (`eval`: the weights alone, no optimizer, no position to report), and its
    resume block."""
    checkpoint, location = resume.checkpoint, resume.location
    if run.options.eval_only:
        weights = load_model_weights(run.model, model_weights(checkpoint, location), location)
        log.resume_block(location=location, lines=weights.lines, checkpoint=None, overridden=[], fingerprint={})
        return
    lines = restore_training_state(
        checkpoint=checkpoint,
        path=location,
        model=run.model,
        optimizer=run.optimizer,
        scaler=run.scaler,
        precision=run.settings.precision,
        architecture=run.model_config.to_dict(),
        state=run.state,
    )
    apply_group_settings(run.optimizer, run.settings)
    samples = run.data.train_samples()
    if run.state.samples_seen > samples:
        raise CheckpointError(
            f"{location}: field 'data_state.samples_seen' is {run.state.samples_seen}, "
            f"beyond the epoch's {samples} samples; the file is damaged "
            f"(or of other data): resume from another checkpoint"
        )
    log.resume_block(
        location=location, lines=lines, checkpoint=checkpoint, overridden=overridden, fingerprint=run.data.fingerprint()
    )


def _shards(options: RunOptions, runtime: Runtime, log: RunLog) -> ShardData | None:
    """`--train_shards` (and `--val_shards`): their indexes, built once on the main process."""
    if not options.train_shards:
        return None
    return load_shards(
        train_shards=options.train_shards,
        val_shards=options.val_shards,
        storage_options=options.storage_options,
        cache_dir=_cache_dir(options),
        shard_cache_gb=options.shard_cache_gb,
        runtime=runtime,
        log=log,
    )


def load_image_weights_file(model: BrainModel, path: str, log: RunLog) -> None:
    report = load_model_weights(model.image_encoder.trunk, model_weights(load_checkpoint(path), path), path)
    log.print(
        f"✓ Image weights from {path}: {report.loaded} tensors ({100 * report.loaded_fraction:.0f}% of the trunk)"
    )


def _cache_dir(options: RunOptions) -> Path:
    return options.cache_dir or (options.root_dir / ".brain_cache" if options.root_dir else Path(".brain_cache"))


def make_evaluator(run: Run, split_name: str, images, options: RunOptions, runtime: Runtime) -> Evaluator:
    """The evaluator of one split: the same for the epoch end and for `eval`."""
    split = run.data.splits[split_name]
    loader = eval_loader(
        split,
        images,
        image_size=run.model_config.image_size,
        batch_size=run.settings.batch_size,
        num_workers=options.num_workers,
        runtime=runtime,
        seed=run.settings.seed,
    )
    return Evaluator(
        model=run.model,
        split=split,
        images=images,
        image_loader=loader,
        collator=CaptionCollator(run.data.tokenizer, run.model_config.max_text_len),
        autocast=run.autocast,
        runtime=runtime,
        caption_batch=4 * run.settings.batch_size,
        folds=options.folds if options.eval_only else 1,
    )


def build_eval(run: Run, options: RunOptions, runtime: Runtime, log: RunLog) -> Evaluator:
    """`eval`: the evaluator of `--eval_split` over its images (cached as training caches them)."""
    images, _ = split_images(
        run.data,
        options.eval_split,
        use_cache=run.settings.cache_images,
        image_size=run.model_config.image_size,
        cache_dir=_cache_dir(options),
        num_workers=options.num_workers,
        runtime=runtime,
        log=log,
    )
    return make_evaluator(run, options.eval_split, images, options, runtime)


def run_record(run: Run, resume: Resume, settings: TrainSettings, runtime: Runtime) -> RunRecord:
    """What every checkpoint of this run carries besides tensors and the train state; the lineage is the main
    process's, so every process records the same run."""
    lineage = {
        "id": uuid.uuid4().hex,
        "parent": resume.parent,
        "started_ns": time.time_ns(),
        "trackers": resume.trackers,
    }
    lineage = runtime.broadcast({**lineage, "threads": runtime.threads.count})  # bitwise resume needs the count
    return RunRecord(
        config={**run.model_config.to_dict(), **asdict(settings)},
        tokenizer_json=run.data.tokenizer_json,
        fingerprint=run.data.fingerprint(),
        lineage=lineage,
        data=run.data.record,
    )


def start_loaders(run: Run, runtime: Runtime, log: RunLog) -> tuple[TrainLoaders, object, TrainSettings]:
    """The image sources (the decode-once cache, built on the main process, or the JPEGs) and the training
    loaders; returns them, the val images, and the settings recording whether the run decodes JPEGs."""
    settings, options = run.settings, run.options
    cache = {
        "use_cache": settings.cache_images,
        "image_size": run.model_config.image_size,
        "runtime": runtime,
        "cache_dir": _cache_dir(options),
        "num_workers": options.num_workers,
    }
    train_images, cached = split_images(run.data, "train", log=log, **cache)
    val_images, cached = split_images(run.data, "val", log=log, **{**cache, "use_cache": cached})
    settings = replace(settings, cache_images=cached)  # one ⚠ line, and the run records that it decodes JPEGs
    loaders = build_loaders(
        run.data,
        CaptionCollator(run.data.tokenizer, run.model_config.max_text_len),
        train_images=train_images,
        image_size=run.model_config.image_size,
        hflip=settings.hflip,
        batch_size=settings.batch_size,
        seed=settings.seed,
        num_workers=options.num_workers,
        runtime=runtime,
    )
    return loaders, val_images, settings


def make_trainer(run: Run, resume: Resume, runtime: Runtime, log: RunLog, *, storage: Storage, hold: Hold) -> Trainer:
    """The loaders, the run's record, the checkpointer (held: closed with the run), the Trainer."""
    loaders, val_images, settings = start_loaders(run, runtime, log)
    options = run.options
    checkpointer = Checkpointer(
        storage=storage,
        runtime=runtime,
        model=run.model,
        optimizer=run.optimizer,
        scaler=run.scaler,
        state=run.state,
        record=run_record(run, resume, settings, runtime),
        policy=SavePolicy(settings.save_every_steps, settings.keep_last, background=not options.sync_saves),
    )
    hold(checkpointer.close)
    return Trainer(
        runtime=runtime,
        model=run.model,
        optimizer=run.optimizer,
        autocast=run.autocast,
        scaler=run.scaler,
        settings=settings,
        loaders=loaders,
        evaluator=make_evaluator(run, "val", val_images, options, runtime),
        checkpointer=checkpointer,
        state=run.state,
        log=log,
        log_every=options.log_every,
        compile=options.compile,
    )


def restore_rng(resume: Resume, run: Run, runtime: Runtime, log: RunLog) -> None:
    """Last, so nothing built before draws from it: each process's own state at the same world size; at another,
    one derived from (seed, global step, rank), with a ⚠ line (and one for another thread count: neither resume
    is bitwise exact)."""
    if note := runtime.threads_note(resume.threads):
        log.print(note)
    states = resume.rng_states or []
    if len(states) == runtime.world_size:
        restore_rng_state(states[runtime.rank])
    elif states:
        log.print(runtime.rng_state_note(len(states)))
        runtime.seed(derive_seed(run.settings.seed, run.state.global_step, runtime.rank), run.options.deterministic)


def claim_folders(options: RunOptions, storage: Storage, resume: Resume, log: RunLog, hold: Hold) -> Lock:
    """Both folders writable, and the checkpoint folder this run's (locked, held until the run closes; see
    `claim_savedir`)."""
    logdir = open_storage(options.logdir)
    logdir.check_writable("logdir")
    lock = claim_savedir(
        storage, resume=resume.location, overwrite=options.overwrite, unreadable=resume.unreadable, log=log.print
    )
    hold(lock.release)
    logdir.prepare("logdir")
    claim_logdir(Path(logdir.url), savedir=options.savedir, resuming=bool(resume.location), overwrite=options.overwrite)
    return lock


def tracked_run(options: RunOptions, resume: Resume, state: TrainState) -> TrackedRun:
    """What the trackers open with. The checkpoint folder's name names MLflow's experiment and W&B's project;
    a resume drops what an earlier start logged past its checkpoint, a fresh run all of it."""
    savedir = options.savedir.rstrip("/")
    return TrackedRun(
        logdir=options.logdir,
        folder=PurePosixPath(savedir).name if "://" in savedir else Path(savedir).absolute().name,
        run_name=options.run_name,
        purge_step=state.global_step + 1 if resume.location else 0,
        run_ids=resume.trackers,
    )


def open_logging(run: Run, resume: Resume, runtime: Runtime, log: RunLog, hold: Hold) -> None:
    """What the run logs to, held until it closes: the --report_to trackers (main process). Their runs' ids go
    into the run's record (a resume reattaches them); one that cannot start stops the run here, before training."""
    tracked = tracked_run(run.options, resume, run.state)
    resume.trackers = runtime.on_main(lambda: log.open_trackers(run.options.report_to, tracked))
    hold(log.close)


def start_training(run: Run, resume: Resume, runtime: Runtime, log: RunLog, hold: Hold) -> Trainer:
    """Claim the folders (main process), open the logging, start the loaders and make the Trainer, print the
    banner, restore the RNG last, log the config; everything opened is held, so a failure on the way releases it."""
    storage = savedir_storage(run.options)  # one object: the lock it holds is checked at every write
    runtime.main_only(lambda: claim_folders(run.options, storage, resume, log, hold))
    hold(end_loader_workers)
    open_logging(run, resume, runtime, log, hold)
    trainer = make_trainer(run, resume, runtime, log, storage=storage, hold=hold)
    log.banner(
        train_samples=run.data.train_samples(),
        val_samples=len(run.data.splits["val"]),
        device=runtime.device,
        precision=run.settings.precision,
        batch_size=run.settings.batch_size,
        per_process=runtime.per_process(run.settings.batch_size),
        lr=run.settings.lr,
        start_epoch=run.state.epoch,
        epochs=run.settings.epochs,
        world_size=runtime.world_size,
        resumed_lr=learning_rate(run.state.global_step, run.settings, trainer.total_steps) if resume.location else None,
        threads=runtime.threads.line(),
    )
    log.small_split("val", len(run.data.splits["val"].images))
    restore_rng(resume, run, runtime, log)
    log.config(trainer.checkpointer.record.config, run.state.global_step)
    return trainer


def build(command: CommandLine, runtime: Runtime, log: RunLog) -> AssembledRun:
    """The run, assembled: the checkpoint chosen and restored, then the evaluator (`eval`), nothing more (the
    checkpoint has finished --epochs), or training's parts. What it opens is released if assembling fails."""
    with ExitStack() as held:

        def hold(release: Callable[[], None]) -> None:
            held.push(releasing(release, log))

        resume = choose_checkpoint(command.options, runtime, log)
        run = build_run(command, resume, runtime, log)
        assembled = AssembledRun(run, held)
        if run.options.eval_only:
            hold(end_loader_workers)
            assembled.evaluator = build_eval(run, run.options, runtime, log)
        elif run.state.epoch < run.settings.epochs:
            assembled.trainer = start_training(run, resume, runtime, log, hold)
        assembled.held = held.pop_all()  # assembled: from here the run releases what it holds
    return assembled
