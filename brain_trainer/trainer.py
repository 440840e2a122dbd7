"""The training loop: where the run is (`TrainState`), the optimiser and its schedule, one optimisation
step, the epoch, evaluation at its end, when the run stands at a step boundary (saves), and stopping there.

Nothing here asks which process it runs in: collectives go through the runtime, output through the run
log, saves through the checkpointer (which decides names, contents and who writes).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from brain_trainer.accumulation import GradientCache, accumulation_note
from brain_trainer.brain_model import BrainModel, ContrastiveLoss
from brain_trainer.checkpointing import Checkpointer, Saved
from brain_trainer.config import TrainSettings
from brain_trainer.data.augment import images_to_device
from brain_trainer.data.loaders import TrainLoaders
from brain_trainer.evaluation import METRICS, Evaluator, retrieval_picture
from brain_trainer.run_log import RunLog
from brain_trainer.runtime import Runtime


class TrainingError(Exception):
    """The run cannot go on (a non-finite loss or weights): one line with the step."""


@dataclass
class TrainState:
    """Where the run is: everything besides tensors that a resume needs to continue exactly."""

    epoch: int = 0  # the epoch being trained
    samples_seen: int = 0  # of that epoch, over all processes
    global_step: int = 0
    best_val: float | None = None
    val_loss: float | None = None
    skipped_images: int = 0  # over all processes
    epoch_loss_sum: float = 0.0  # of this epoch's steps, so the epoch line after a resume equals the uninterrupted one
    epoch_loss_steps: int = 0

    def state_dict(self) -> dict:
        """Its fields by name (the checkpoint format maps them to the file's layout)."""
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)

    def epoch_loss(self) -> float | None:
        return self.epoch_loss_sum / self.epoch_loss_steps if self.epoch_loss_steps else None


def learning_rate(step: int, settings: TrainSettings, total_steps: int) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio: a pure function of the step."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / (settings.warmup_steps + 1)
    progress = min(1.0, (step - settings.warmup_steps) / max(1, total_steps - settings.warmup_steps))
    floor = settings.lr * settings.min_lr_ratio
    return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (settings.lr - floor)


def check_finite_weights(model: torch.nn.Module, step: int) -> None:
    """Weights that turned NaN or inf are never saved: TrainingError, so the last good checkpoint is kept."""
    if not torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all():  # one device sync
        raise TrainingError(
            f"the weights hold NaN or inf at step {step}; not saved, so the "
            f"last good checkpoint is kept; lower --lr or use --precision bf16"
        )


class StepLosses:
    """The losses of the steps since the last read, left on the device. `read` (at log steps, saves, stops and
    epoch ends: a collective, called where all processes are) waits for the device once, means them over the
    processes in one all-reduce, adds them to the epoch's sum in step order and returns the latest; a non-finite
    one stops the run there, naming its step, so it is never saved."""

    def __init__(self, *, runtime: Runtime, state: TrainState, check_finite: bool, precision: str):
        self.runtime, self.state, self.check_finite, self.precision = runtime, state, check_finite, precision
        self.first_step, self.losses = 0, []

    def add(self, step: int, loss: torch.Tensor) -> None:
        if not self.losses:
            self.first_step = step
        self.losses.append(loss)

    def read(self) -> float | None:
        if not self.losses:  # the same on every process: each has taken the same steps
            return None
        values, self.losses = torch.stack(self.losses).tolist(), []
        for offset, value in enumerate(self.runtime.mean_each(values)):  # every process's rows: the global batch's
            if self.check_finite and not math.isfinite(value):
                raise TrainingError(
                    f"loss is {value} at step {self.first_step + offset} "
                    f"({self.precision}); lower --lr or check the data"
                )
            self.state.epoch_loss_sum += value
            self.state.epoch_loss_steps += 1
        return value


class Progress:
    """What the loop reports: the substituted images (summed over the processes where all are), each log step's
    scalars and line (timed over the window since the previous one), and each epoch's evaluation."""

    def __init__(self, *, runtime: Runtime, state: TrainState, log: RunLog, scaler: torch.amp.GradScaler):
        self.runtime, self.state, self.log, self.scaler = runtime, state, log, scaler
        self.unsummed_skips = 0  # images this process substituted since the last sum over processes
        self.start_window()

    def start_window(self) -> None:
        self.window_start, self.window_samples, self.window_wait = time.perf_counter(), 0, 0.0

    def note_bad_files(self, batch: dict) -> None:
        for name in batch["bad_files"]:  # the process that read the file says so: once over all processes
            self.log.warn_once(
                name, f"⚠ Could not read image {name}: substituting the next sample (counted in train/skipped_images)"
            )
        self.unsummed_skips += len(batch["bad_files"])

    def sum_skips(self) -> None:
        """Add every process's substituted images to the state (a collective: called where all processes are)."""
        self.state.skipped_images += int(self.runtime.sum(self.unsummed_skips))
        self.unsummed_skips = 0

    def log_step(self, bar, loss: float, grad_norm: torch.Tensor, lr: float) -> None:
        self.sum_skips()
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        scalars = {
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": grad_norm.item(),
            "train/samples_per_sec": self.window_samples / elapsed,
            "train/data_wait": self.window_wait / elapsed,
            "train/skipped_images": self.state.skipped_images,
        }
        if self.scaler.is_enabled():
            scalars["train/amp_scale"] = self.scaler.get_scale()
        self.log.scalars(scalars, self.state.global_step, self.state.epoch)
        self.log.step(
            bar,
            epoch=self.state.epoch,
            step=self.state.global_step,
            loss=loss,
            lr=lr,
            samples_per_sec=scalars["train/samples_per_sec"],
            data_wait=scalars["train/data_wait"],
        )
        self.start_window()

    def evaluated(self, metrics: dict | None) -> dict | None:
        if metrics and metrics["unreadable_images"]:
            self.log.warn_once(
                "val-unreadable",
                f"⚠ {metrics['unreadable_images']} val images could not be read: "
                f"they are scored as black squares (counted as misses)",
            )
        return metrics

    def validation(self, evaluator: Evaluator, metrics: dict) -> None:
        """The epoch's validation scalars and retrieval picture."""
        self.log.scalars({f"val/{name}": metrics[name] for name in METRICS}, self.state.global_step, self.state.epoch)
        if self.log.enabled:
            picture = retrieval_picture(metrics["similarity"], evaluator.split, evaluator.images)
            self.log.image("val/retrieval", picture, self.state.global_step)


class OptimizationStep:
    """One optimisation step of the model as the run wraps it (DDP, torch.compile), with the lr schedule, the
    global-batch loss, gradient accumulation, clipping and the scaler. The Trainer is one, with the loop around."""

    def __init__(
        self,
        *,
        runtime: Runtime,
        model: BrainModel,
        optimizer: torch.optim.Optimizer,
        autocast: Callable,
        scaler: torch.amp.GradScaler,
        settings: TrainSettings,
        state: TrainState,
        total_steps: int,
        compile: bool,
    ):
        self.runtime, self.model, self.optimizer, self.autocast, self.scaler = (
            runtime,
            model,
            optimizer,
            autocast,
            scaler,
        )
        self.settings, self.state, self.total_steps = settings, state, total_steps
        self.step_model = runtime.wrap(model, compile)  # saves always use the plain model
        self.loss = ContrastiveLoss(gather=runtime.all_gather, rank=runtime.rank)
        self.accumulation = GradientCache(
            forward=self.step_model,
            plain=model,
            loss=self.loss,
            autocast=autocast,
            no_sync=runtime.no_sync(self.step_model),
            device=runtime.device,
        )

    def step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step; returns this process's loss and the (unclipped) gradient norm, both left on the
        device: nothing here waits for the device (`StepLosses.read` at log steps and saves)."""
        lr = learning_rate(self.state.global_step, self.settings, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images = images_to_device(batch["images"], self.runtime.device)
        input_ids = batch["input_ids"].to(self.runtime.device, non_blocking=True)
        attention_mask = batch["attention_mask"].to(self.runtime.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        if self.settings.accum_steps == 1:
            with self.autocast():
                loss = self.loss(*self.step_model(images, input_ids, attention_mask))
            self.scaler.scale(loss).backward()
        else:
            loss = self.accumulation.backward(
                (images, input_ids, attention_mask),
                self.settings.accum_steps,
                lambda value: self.scaler.scale(value).backward(),
            )
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip or float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach(), grad_norm


class Trainer(OptimizationStep):
    """The loop and evaluation of one run; `fit` is the whole of training. Saves are the checkpointer's: the
    loop says when the run stands at a step boundary, never which file or what goes in it."""

    def __init__(
        self,
        *,
        runtime: Runtime,
        model: BrainModel,
        optimizer: torch.optim.Optimizer,
        autocast: Callable,
        scaler: torch.amp.GradScaler,
        settings: TrainSettings,
        loaders: TrainLoaders,
        evaluator: Evaluator,
        checkpointer: Checkpointer,
        state: TrainState,
        log: RunLog,
        log_every: int,
        compile: bool = False,
    ):
        super().__init__(
            runtime=runtime,
            model=model,
            optimizer=optimizer,
            autocast=autocast,
            scaler=scaler,
            settings=settings,
            state=state,
            total_steps=loaders.steps_per_epoch * settings.epochs,
            compile=compile,
        )
        self.loaders, self.evaluator, self.checkpointer = loaders, evaluator, checkpointer
        self.log, self.log_every = log, log_every
        self.last_metrics: dict | None = None  # the latest epoch's evaluation
        self.progress = Progress(runtime=runtime, state=state, log=log, scaler=scaler)
        self.losses = StepLosses(
            runtime=runtime, state=state, check_finite=not scaler.is_enabled(), precision=settings.precision
        )  # fp16's non-finite losses are the scaler's
        if note := accumulation_note(model, settings.accum_steps):
            log.print(note)

    def train_epoch(self) -> int | None:
        """Train the rest of the current epoch; returns the stop signal when one came, else None."""
        state, loaders, progress = self.state, self.loaders, self.progress
        loaders.sampler.set_position(state.epoch, state.samples_seen)
        self.model.train()
        bar = self.log.progress_bar(
            total=loaders.steps_per_epoch,
            initial=state.samples_seen // self.settings.batch_size,
            desc=f"epoch {state.epoch}",
        )
        progress.start_window()
        fetch_start = time.perf_counter()
        for batch in loaders.train:
            progress.window_wait += time.perf_counter() - fetch_start  # time the step waited for data
            signum = self.agree_to_stop()
            if signum:
                bar.close()
                self.losses.read()
                return signum
            progress.note_bad_files(batch)
            loss, grad_norm = self.step(batch)
            state.samples_seen += self.settings.batch_size
            state.global_step += 1
            self.losses.add(state.global_step, loss)
            progress.window_samples += self.settings.batch_size
            bar.update()
            if state.global_step % self.log_every == 0:  # the read waits for the device: the window is the steps'
                progress.log_step(bar, self.losses.read(), grad_norm, self.optimizer.param_groups[0]["lr"])
            if self.checkpointer.due(state.global_step):
                self.save()
            fetch_start = time.perf_counter()
        bar.close()
        self.losses.read()  # the epoch's loss is complete before the epoch line
        # The epoch's BatchNorm statistics from every process, for its evaluation and save (a stop here saves them
        # too). Mid-epoch a save holds the main process's: DDP's next forward hands those to every process anyway.
        self.runtime.average_batchnorm(self.model)
        return self.agree_to_stop()

    def agree_to_stop(self) -> int | None:
        """The step boundary: a signal on any process stops every process here; a failed background save
        stops the run with its error on every process (the previous checkpoint is intact)."""
        signum, failed = self.runtime.agree_to_stop(self.checkpointer.failed())
        if failed:
            self.checkpointer.raise_failure()
        return signum

    # -- saves: the checkpointer's, at a step boundary, once the state is whole and finite
    def ready_to_save(self) -> None:
        """Every process: the losses and skips read into the state (a non-finite loss since the last read stops
        the run before this save), and weights that turned NaN or inf are never saved."""
        self.losses.read()
        self.progress.sum_skips()
        check_finite_weights(self.model, self.state.global_step)

    def save(self, epoch_end: tuple[int, float] | None = None) -> Saved:
        """Save where the run stands (at an epoch end: the finished epoch and its val loss, for the best)."""
        self.ready_to_save()
        saved = self.checkpointer.save_epoch_end(*epoch_end) if epoch_end else self.checkpointer.save()
        self.log.scalars({"train/ckpt_stall_ms": 1000 * saved.stall}, self.state.global_step, self.state.epoch)
        return saved

    # -- the whole run
    def fit(self) -> int:
        """Train to the last epoch; returns the exit status (0, or 128 + the stop signal)."""
        state = self.state
        while state.epoch < self.settings.epochs:
            started = time.perf_counter()
            signum = self.train_epoch()
            metrics = None if signum else self.progress.evaluated(self.evaluator())
            signum = signum or self.agree_to_stop()
            if signum or metrics is None:
                return self.stop(signum)
            self.end_epoch(metrics, time.perf_counter() - started)
        self.checkpointer.wait()
        return 0

    def end_epoch(self, metrics: dict, seconds: float) -> None:
        state = self.state
        state.val_loss = metrics["loss"]
        self.progress.validation(self.evaluator, metrics)
        finished_epoch, train_loss = state.epoch, state.epoch_loss()
        state.epoch, state.samples_seen, state.epoch_loss_sum, state.epoch_loss_steps = state.epoch + 1, 0, 0.0, 0
        saved = self.save(epoch_end=(finished_epoch, metrics["loss"]))
        self.log.flush()
        self.log.epoch_end(
            epoch=finished_epoch,
            epochs=self.settings.epochs,
            train_loss=train_loss,
            metrics=metrics,
            improved=saved.improved,
            seconds=seconds,
        )
        self.last_metrics = metrics

    def stop(self, signum: int) -> int:
        """Save where the run stands and wait until the file is durable; every process waits for it, so no
        launcher kills the writer. Returns the exit status, 128 + the signal."""
        self.save()
        self.checkpointer.wait()
        self.runtime.barrier()
        self.log.flush()
        return 128 + signum

    def position(self) -> str:
        s = self.state
        return f"at epoch {s.epoch}, step {s.global_step} (sample {s.samples_seen} of {self.loaders.train_samples})"
