"""Every line the program prints and every event it logs, through one object: the banner and resume reports,
the step line or tqdm bar, the epoch line, and the scalars, fanned out to the --report_to trackers (TensorBoard,
metrics.jsonl, MLflow, W&B: brain_trainer/tracking; TensorBoard's safe writer, EventFiles, is here). Only the
main process speaks; the others hold a silent RunLog, so the loop never asks which process it is in.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
import uuid
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from brain_trainer.checkpointing.storage import is_url
from brain_trainer.config import ConfigError
from brain_trainer.evaluation import METRICS, RECALL_AT, chance_recall_at
from brain_trainer.safe_files import OutputError, describe, refuse_link
from brain_trainer.tracking import TrackedRun, Trackers, open_trackers  # a tracker's library: only when opened

RULE = "=" * 60


def _quiet_event_thread_errors() -> None:
    """TensorBoard's writer thread dies on a write error (a full disk) and re-raises it at the next event call,
    where the run log turns it into one line; the thread's own traceback on stderr would only repeat it."""
    previous = threading.excepthook
    if getattr(previous, "quiets_event_writer", False):
        return

    def hook(args) -> None:
        if not (type(args.thread).__name__ == "_AsyncWriterThread" and issubclass(args.exc_type, OSError)):
            previous(args)

    hook.quiets_event_writer = True
    threading.excepthook = hook


SCRIPT = "train_multimodal_brain_flickr8k.py"
EVENTS = "events.out.tfevents."  # how TensorBoard's event files are named
OWNER = ".brain_savedir"  # in --logdir: the checkpoint folder of the run whose curves the events are


class EventFiles:
    """TensorBoard's writer, opened only in a folder that is not a link and under a name nobody can guess; a
    write error (a full disk, a lost folder) ends the events with one line (`failure`) and asks the run to stop
    at the next step boundary (`stop`, the run's StopFlag), where it saves its checkpoint (train exits 2)."""

    def __init__(self, *, stop=None):
        self.stop, self.writer, self.failure, self.logdir = stop, None, None, ""

    def open(self, logdir: str, purge_step: int) -> None:
        self.logdir = logdir
        refuse_link(logdir, "--logdir")  # TensorBoard opens its own files: never in a folder a link redirects
        _quiet_event_thread_errors()
        from torch.utils.tensorboard import SummaryWriter  # here: inference never loads TensorBoard

        try:  # a random suffix: nobody can plant a link at the event file's name beforehand
            self.writer = SummaryWriter(logdir, purge_step=purge_step, filename_suffix=f".{uuid.uuid4().hex[:12]}")
        except OSError as error:
            raise OutputError(f"--logdir {describe(error, logdir)}") from None

    def write(self, action) -> None:
        if self.writer is None:
            return
        try:
            action(self.writer)
        except OSError as error:
            self.failure = f"--logdir {describe(error, error.filename or self.logdir)}"
            writer, self.writer = self.writer, None
            try:
                writer.close()
            except OSError:
                pass  # the same error again: `failure` says it
            if self.stop is not None:
                self.stop.signum = self.stop.signum or signal.SIGTERM


class RunLog:
    def __init__(self, *, enabled: bool = True, stop=None):
        self.enabled = enabled
        self.interactive = enabled and sys.stdout.isatty()
        self.warned: set[str] = set()
        self.stop = stop  # the run's stop flag: a --logdir write failure stops the run (EventFiles, metrics.jsonl)
        self.trackers = Trackers(warn=self.print)
        self.outcome = "failed"  # what the trackers record at close, unless the run reports it finished or stopped

    # -- plain lines
    def print(self, line: str = "") -> None:
        if self.enabled:
            tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()

    def error(self, line: str) -> None:
        if self.enabled:
            print(line, file=sys.stderr, flush=True)

    def warn_once(self, key: str, line: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            self.print(line)

    # -- the trackers: every scalar, image and summary goes to each of them
    def open_trackers(self, names: tuple[str, ...], run: TrackedRun) -> dict[str, str]:
        """Open the --report_to trackers (main process); returns the tracker runs' ids for the checkpoint: the
        ones opened, and the checkpoint's others (a resume without a tracker keeps its run for a later one)."""
        if self.enabled:
            self.trackers = open_trackers(names, replace(run, stop=self.stop), warn=self.print)
        return {**run.run_ids, **self.trackers.run_ids()}

    @property
    def failure(self) -> str | None:
        """A --logdir write failure (TensorBoard's events): the run stops at the next step boundary and exits 2."""
        return self.trackers.failure

    def config(self, config: dict, step: int) -> None:
        self.trackers.config(config, step)

    def scalars(self, values: dict[str, float], step: int, epoch: int) -> None:
        self.trackers.log(values, step, epoch)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        self.trackers.image(tag, image, step)

    def flush(self) -> None:
        self.trackers.flush()

    def close(self) -> None:
        self.trackers.close(self.outcome)

    # -- the loop
    def progress_bar(self, *, total: int, initial: int, desc: str) -> tqdm:
        return tqdm(total=total, initial=initial, desc=desc, disable=not self.interactive, dynamic_ncols=True)

    def step(
        self, bar: tqdm, *, epoch: int, step: int, loss: float, lr: float, samples_per_sec: float, data_wait: float
    ) -> None:
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", sps=f"{samples_per_sec:.0f}")
        if not self.interactive:
            self.print(
                f"epoch {epoch} step {step} loss {loss:.4f} lr {lr:.2e} {samples_per_sec:.0f} samples/s, "
                f"data wait {100 * data_wait:.0f}%"
            )

    def epoch_end(
        self, *, epoch: int, epochs: int, train_loss: float | None, metrics: dict, improved: bool, seconds: float
    ) -> None:
        self.trackers.summary({f"val/{name}": metrics[name] for name in METRICS})  # the latest figures
        train = f"{train_loss:.4f}" if train_loss is not None else "n/a (no step this epoch)"
        self.print(
            f"Epoch {epoch}/{epochs}: train loss {train}, val loss {metrics['loss']:.4f}"
            f"{' (best)' if improved else ''}, i2t R@1/5/10 {metrics['i2t_R@1']:.1f}/{metrics['i2t_R@5']:.1f}/"
            f"{metrics['i2t_R@10']:.1f}, t2i R@1/5/10 {metrics['t2i_R@1']:.1f}/{metrics['t2i_R@5']:.1f}/"
            f"{metrics['t2i_R@10']:.1f}, {seconds:.0f} s"
        )

    # -- reports
    def banner(self, **facts) -> None:
        """The run's facts before the first step (`banner_lines` names them)."""
        for line in banner_lines(**facts):
            self.print(line)

    def small_split(self, name: str, images: int, folds: int = 1) -> None:
        """One ⚠ line when a split (or each of its `folds`) is too small for recall@k to mean anything: R@k over k
        or fewer images is 100."""
        scored = images // folds
        if scored <= max(RECALL_AT):
            where = f"The {name} split has" if folds == 1 else f"--folds {folds}: each fold of the {name} split has"
            self.print(
                f"⚠ {where} {scored} images: text -> image R@k is 100 for every k >= {scored} "
                f"whatever the model, and the others are near it; use at least {4 * max(RECALL_AT)} images "
                f"for recall that means something"
            )

    def resume_block(
        self, *, location: str, lines: list[str], checkpoint: dict | None, overridden: list[str], fingerprint: dict
    ) -> None:
        for line in resume_lines(location, lines, checkpoint, overridden, fingerprint):
            self.print(line)

    def metrics_table(self, metrics: dict, split: str, *, images: int, captions: int) -> None:
        for line in metrics_lines(metrics, split, images=images, captions=captions):
            self.print(line)

    def demo_report(self, metrics: dict, num_images: int, num_captions: int) -> None:
        chance_i2t, chance_t2i = chance_recall_at(5, num_images, round(num_captions / num_images))
        self.print(
            f"Demo retrieval on {num_images} val images: Recall@5 image->text {metrics['i2t_R@5']:.1f}% "
            f"(chance {chance_i2t:.1f}%), text->image {metrics['t2i_R@5']:.1f}% (chance {chance_t2i:.1f}%)"
        )

    def summary(self, *, savedir: str, files: list[str], seconds: float) -> None:
        """The end of a finished run: where its checkpoints and each tracker's record are, how long it took."""
        self.outcome = "finished"
        self.trackers.summary({f"checkpoint/{name}": _location(savedir, name) for name in files})
        minutes, rest = divmod(round(seconds), 60)
        self.print(RULE)
        self.print(f"Finished in {f'{minutes} min {rest} s' if minutes else f'{rest} s'}")
        self.print(f"Checkpoints: {savedir} ({', '.join(files) or 'none written'})")
        for line in self.trackers.where():
            self.print(line)
        self.print(RULE)

    def stopped(
        self,
        *,
        signum: int,
        where: str,
        path: str | None,
        argv: tuple[str, ...],
        world_size: int,
        program: tuple[str, ...],
    ) -> None:
        self.outcome = "stopped"
        saved = f"; saved {path}" if path else "; nothing to save yet"
        self.print(f"Stopped by {signal.Signals(signum).name} {where}{saved}")
        self.print(
            f"Resume with: {resume_command(argv, path, world_size, program)}"
            if path
            else f"Run the same command again: {resume_command(argv, None, world_size, program)}"
        )


def banner_lines(
    *,
    train_samples: int,
    val_samples: int,
    device: torch.device,
    precision: str,
    batch_size: int,
    per_process: int,
    lr: float,
    start_epoch: int,
    epochs: int,
    world_size: int,
    resumed_lr: float | None = None,
    threads: str | None = None,
) -> list[str]:
    """`resumed_lr`: the schedule's lr at the step a resumed run starts from (a fresh run starts in warmup)."""
    many = world_size > 1
    return [
        f"\nTrain samples: {train_samples}",
        f"Val samples:   {val_samples}",
        f"Device: {device.type}" + (f" ({world_size} processes)" if many else ""),
        *([threads] if threads else []),
        f"Precision: {precision}",
        f"Batch size: {batch_size}" + (f" ({per_process} per process)" if many else ""),
        f"Learning rate: {lr}" + (f" (peak); resuming at {resumed_lr:.3g}" if resumed_lr is not None else ""),
        f"Training epochs: {start_epoch} -> {epochs}",
    ]


def resume_lines(
    location: str, lines: list[str], checkpoint: dict | None, overridden: list[str], fingerprint: dict
) -> list[str]:
    """The resume guide's block: the file, what was restored (✓) or not (⚠), and the plan (`checkpoint`
    None: evaluation, which restores the weights alone and has no plan)."""
    block = [RULE, f"Resuming from checkpoint: {location}", RULE, *lines]
    if checkpoint is None:
        return [*block, RULE]
    restored = [
        "settings" if checkpoint.get("config") else "",
        "RNG" if checkpoint.get("rng_state") else "",
        "data position" if checkpoint.get("data_state") else "",
    ]
    block += [
        RULE,
        f"Plan: restored {', '.join(item for item in restored if item) or 'weights only'} from the checkpoint",
        f"      overridden on the command line: {'; '.join(overridden) or 'nothing'}",
    ]
    saved = (checkpoint.get("data_state") or {}).get("fingerprint")
    if isinstance(saved, dict) and saved != fingerprint:
        block.append(
            f"⚠ Training data differs from the checkpoint's: {saved.get('samples')} samples "
            f"({saved.get('sha256')}) -> {fingerprint['samples']} samples ({fingerprint['sha256']})"
        )
    return block


def metrics_lines(metrics: dict, split: str, *, images: int, captions: int) -> list[str]:
    """`eval`'s table: loss, recall at 1/5/10 and the median rank, both directions."""
    table = [
        f"Scored {images} {split} images against {captions} captions",
        f"{split} loss {metrics['loss']:.4f}",
        f"{'':16}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'median rank':>14}",
    ]
    for direction, label in (("i2t", "image -> text"), ("t2i", "text -> image")):
        table.append(
            f"{label:16}"
            + "".join(f"{metrics[f'{direction}_R@{k}']:8.1f}" for k in (1, 5, 10))
            + f"{metrics[f'{direction}_median_rank']:14.0f}"
        )
    if metrics.get("folds", 1) > 1:  # eval --folds K
        table.append(f"mean over {metrics['folds']} folds of {metrics['fold_images']} images:")
        for direction, label in (("i2t", "image -> text"), ("t2i", "text -> image")):
            table.append(f"{label:16}" + "".join(f"{metrics[f'folds_{direction}_R@{k}']:8.1f}" for k in (1, 5, 10)))
    return table


def _location(savedir: str, name: str) -> str:
    """A checkpoint's location for the trackers' summary: a URL as it is, a local path made absolute."""
    return f"{savedir.rstrip('/')}/{name}" if "://" in savedir else str(Path(savedir).absolute() / name)


def launcher(world_size: int, program: tuple[str, ...]) -> list[str]:
    """How this process was started, for the printed resume command: `program` itself on one process (python
    SCRIPT, brain-trainer train, ...); under torchrun its command line as the user typed it (read from the parent
    process, torchrun's agent) before the program; or srun."""
    if world_size == 1:
        return list(program)
    in_python = list(program[1:]) if program[0] == "python" else ["-m", "brain_trainer", *program[1:]]
    try:
        tokens = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        tokens = []
    program_at = next(
        (
            index
            for index, token in enumerate(tokens)
            if token.endswith(SCRIPT) or token in ("brain_trainer", "brain-trainer") or token.endswith("/brain-trainer")
        ),
        None,
    )
    if program_at is not None and tokens[program_at - 1] in ("-m", "--module"):
        program_at -= 1
    for index, token in enumerate(tokens[:program_at] if program_at else []):
        if token.endswith("torchrun") or token == "torch.distributed.run":
            return ["torchrun", *tokens[index + 1 : program_at], *in_python]
    if "SLURM_PROCID" in os.environ:
        return ["srun", *program]
    return ["torchrun", "--nproc_per_node", str(world_size), *in_python]


def resume_command(
    argv: tuple[str, ...],
    checkpoint: Path | str | None,
    world_size: int = 1,
    program: tuple[str, ...] = ("python", SCRIPT),
) -> str:
    """The command line as given, with --resume pointing at `checkpoint`, behind the launcher that started it."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--resume":
            skip = True
        elif not token.startswith("--resume="):
            kept.append(token)
    resume = ["--resume", str(checkpoint)] if checkpoint else []
    return shlex.join([*launcher(world_size, program), *kept, *resume])


def claim_logdir(folder: Path, *, savedir: str, resuming: bool, overwrite: bool) -> None:
    """Make `folder` (the --logdir, created and writable) this run's, or refuse with one line. A run's events
    hide the events already there (TensorBoard drops a folder's steps from a run's `purge_step` on), so only the
    run of the same --savedir may write over them, or any run with --overwrite; events with no owner recorded
    (an older version's) count as a resumed run's own. The owner is recorded relative to the folder, so a
    project moved or copied whole still owns its curves."""
    refuse_link(folder, "--logdir")  # before the record is written: never into a folder a link redirects
    owner = savedir.rstrip("/") if is_url(savedir) else os.path.relpath(savedir.removeprefix("file://"), folder)
    events = [entry.name for entry in os.scandir(folder) if entry.name.startswith(EVENTS)]
    marker = folder / OWNER
    recorded = marker.read_text(errors="replace").strip() if marker.is_file() and not marker.is_symlink() else None
    if events and (recorded != owner if recorded is not None else not resuming) and not overwrite:
        where = recorded if not recorded or is_url(recorded) else os.path.normpath(folder / recorded)
        raise ConfigError(
            f"--logdir {folder} holds the TensorBoard events of "
            f"{f'the run in --savedir {where}' if where else 'another run'} ({len(events)} event "
            f"file{'s' * (len(events) > 1)}), which this run's curves would hide; choose another --logdir, "
            f"or pass --overwrite to hide them"
        )
    try:  # never through a link planted at the name (O_NOFOLLOW); a torn record only asks for --overwrite
        with os.fdopen(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666), "w") as handle:
            handle.write(f"{owner}\n")
    except OSError as error:
        raise ConfigError(f"--logdir {folder}: cannot write {OWNER} ({error.strerror}); remove what is there") from None
