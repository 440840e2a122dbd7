"""The training loop: where the run is (`TrainState`), the optimiser and its schedule, one optimisation
step, the epoch, evaluation and save policy at its end, and stopping at a step boundary.

Nothing here asks which process it runs in: collectives go through the runtime, output through the run
log, files through the checkpointer (silent on all but the main process).
"""
from __future__ import annotations

import math
import time
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from brain_trainer.data.augment import images_to_device
from brain_trainer.brain_model import BrainConfig, BrainModel, ContrastiveLoss, UnsupportedEncoder
from brain_trainer.checkpointing import BEST, LAST, CheckpointError, Checkpointer, capture_rng_state, make_checkpoint, snapshot_name
from brain_trainer.config import ConfigError, TrainSettings
from brain_trainer.data.loaders import TrainLoaders
from brain_trainer.evaluation import METRICS, evaluate, retrieval_picture
from brain_trainer.data.flickr8k_dataset import CaptionCollator
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
        """The checkpoint's fields: `epoch` is the last completed one, `data_state` where training stands."""
        return {"epoch": self.epoch - 1, "global_step": self.global_step, "best_val": self.best_val,
                "val_loss": self.val_loss,
                "data_state": {"epoch": self.epoch, "samples_seen": self.samples_seen,
                               "skipped_images": self.skipped_images, "epoch_loss_sum": self.epoch_loss_sum,
                               "epoch_loss_steps": self.epoch_loss_steps}}

    def load_state_dict(self, checkpoint: dict) -> None:
        data_state = checkpoint.get("data_state") or {"epoch": checkpoint["epoch"] + 1, "samples_seen": 0}
        self.epoch, self.samples_seen = data_state["epoch"], data_state["samples_seen"]
        self.global_step = checkpoint.get("global_step", 0)
        self.best_val, self.val_loss = checkpoint.get("best_val"), checkpoint.get("val_loss")
        self.skipped_images = int(data_state.get("skipped_images", 0))
        self.epoch_loss_sum = float(data_state.get("epoch_loss_sum", 0.0))
        self.epoch_loss_steps = int(data_state.get("epoch_loss_steps", 0))

    def epoch_loss(self) -> float | None:
        return self.epoch_loss_sum / self.epoch_loss_steps if self.epoch_loss_steps else None


def learning_rate(step: int, settings: TrainSettings, total_steps: int) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio: a pure function of the step."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / (settings.warmup_steps + 1)
    progress = min(1.0, (step - settings.warmup_steps) / max(1, total_steps - settings.warmup_steps))
    floor = settings.lr * settings.min_lr_ratio
    return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (settings.lr - floor)


def build_optimizer(model: torch.nn.Module, settings: TrainSettings, device: torch.device) -> torch.optim.AdamW:
    """AdamW with CLIP's betas; weight decay on matrices only, never on biases, norms or the temperature."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": settings.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.98), eps=1e-6, fused=device.type == "cuda")


def build_model(model_config: BrainConfig, pretrained: bool) -> BrainModel:
    """The model, with every way its encoders can fail to load said as one line naming the flag."""
    try:
        return BrainModel(model_config, pretrained=pretrained)
    except UnsupportedEncoder as error:
        raise ConfigError(str(error)) from None
    except urllib.error.URLError:  # torchvision downloads weights with urllib
        raise ConfigError(f"--image_weights {model_config.image_weights}: weights for {model_config.image_encoder} "
                          f"could not be downloaded (no network?); give a local weights file or none") from None
    except (OSError, ValueError) as error:  # transformers reports a failed download or a bad folder so
        raise ConfigError(f"--text_encoder {model_config.text_encoder}: could not be loaded "
                          f"({str(error).splitlines()[0][:120]}); give a local folder, or use --text_encoder scratch") from None


@dataclass(frozen=True)
class RunRecord:
    """What every checkpoint of this run carries besides tensors and the train state."""
    config: dict  # every setting of the run
    tokenizer_json: str | None
    fingerprint: dict  # of the training data
    lineage: dict  # this run's id, its parent's, when it started


class Trainer:
    """The loop, evaluation, logging and saving of one run; `fit` is the whole of training."""

    def __init__(self, *, runtime: Runtime, model: BrainModel, optimizer: torch.optim.Optimizer, autocast: Callable,
                 scaler: torch.amp.GradScaler, settings: TrainSettings, loaders: TrainLoaders,
                 collator: CaptionCollator, checkpointer: Checkpointer, record: RunRecord, state: TrainState,
                 log: RunLog, log_every: int, compile: bool = False):
        self.runtime, self.model, self.optimizer, self.autocast, self.scaler = runtime, model, optimizer, autocast, scaler
        self.settings, self.loaders, self.collator, self.checkpointer = settings, loaders, collator, checkpointer
        self.record, self.state, self.log, self.log_every = record, state, log, log_every
        self.step_model = runtime.wrap(model, compile)  # saves always use the plain model
        self.loss = ContrastiveLoss(gather=runtime.all_gather, rank=runtime.rank)
        self.total_steps = loaders.steps_per_epoch * settings.epochs
        self.last_metrics: dict | None = None  # the latest epoch's evaluation
        self.last_saved: Path | None = None
        self.unsummed_skips = 0  # images this process substituted since the last sum over processes

    # -- one optimisation step
    def step(self, batch: dict) -> tuple[float, torch.Tensor]:
        """One optimisation step; returns the global batch's loss and the (unclipped) gradient norm, on the device."""
        lr = learning_rate(self.state.global_step, self.settings, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images = images_to_device(batch["images"], self.runtime.device)
        input_ids = batch["input_ids"].to(self.runtime.device, non_blocking=True)
        attention_mask = batch["attention_mask"].to(self.runtime.device, non_blocking=True)
        with self.autocast():
            loss = self.loss(*self.step_model(images, input_ids, attention_mask))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip or float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        loss_value = self.runtime.mean(loss.item())  # every process's rows: the global batch's loss
        if not math.isfinite(loss_value) and not self.scaler.is_enabled():  # fp16 overflow is the scaler's job
            raise TrainingError(f"loss is {loss_value} at step {self.state.global_step + 1} "
                                f"({self.settings.precision}); lower --lr or check the data")
        return loss_value, grad_norm

    def note_bad_files(self, batch: dict) -> None:
        for name in batch["bad_files"]:  # the process that read the file says so: once over all processes
            self.log.warn_once(name, f"⚠ Could not read image {name}: substituting the next sample "
                                     f"(counted in train/skipped_images)")
        self.unsummed_skips += len(batch["bad_files"])

    def sum_skips(self) -> None:
        """Add every process's substituted images to the state (a collective: called where all processes are)."""
        self.state.skipped_images += int(self.runtime.sum(self.unsummed_skips))
        self.unsummed_skips = 0

    def train_epoch(self) -> int | None:
        """Train the rest of the current epoch; returns the stop signal when one came, else None."""
        state, loaders = self.state, self.loaders
        loaders.sampler.set_position(state.epoch, state.samples_seen)
        self.model.train()
        bar = self.log.progress_bar(total=loaders.steps_per_epoch, initial=state.samples_seen // self.settings.batch_size,
                                    desc=f"epoch {state.epoch}")
        window_start, window_samples, window_wait = time.perf_counter(), 0, 0.0
        fetch_start = time.perf_counter()
        for batch in loaders.train:
            window_wait += time.perf_counter() - fetch_start  # time the step waited for data
            signum = self.agree_to_stop()
            if signum:
                bar.close()
                return signum
            self.note_bad_files(batch)
            loss, grad_norm = self.step(batch)
            state.samples_seen += self.settings.batch_size
            state.global_step += 1
            state.epoch_loss_sum += loss
            state.epoch_loss_steps += 1
            window_samples += self.settings.batch_size
            bar.update()
            if state.global_step % self.log_every == 0:
                self.log_step(bar, loss, grad_norm, window_samples, window_wait, time.perf_counter() - window_start)
                window_start, window_samples, window_wait = time.perf_counter(), 0, 0.0
            if self.settings.save_every_steps and state.global_step % self.settings.save_every_steps == 0:
                self.save([LAST])
            fetch_start = time.perf_counter()
        bar.close()
        return self.agree_to_stop()

    def agree_to_stop(self) -> int | None:
        """The step boundary: a signal on any process stops every process here; a failed background save
        stops the run with its error (the previous checkpoint is intact)."""
        signum, failed = self.runtime.agree_to_stop(self.checkpointer.failed())
        if failed:
            self.wait_for_save()  # raises the writer's CheckpointError on every process
            raise CheckpointError("the main process could not write a checkpoint (it says which and why)")
        return signum

    def wait_for_save(self) -> None:
        """Wait until the save in flight is durable. Only the main process writes, so only it can fail: its
        CheckpointError is handed to every process, which all leave here together (none waits in a collective
        for a process that has gone)."""
        self.runtime.on_main(self.checkpointer.wait)

    def log_step(self, bar, loss: float, grad_norm: torch.Tensor, samples: int, wait: float, elapsed: float) -> None:
        self.sum_skips()
        lr = self.optimizer.param_groups[0]["lr"]
        scalars = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm.item(),
                   "train/samples_per_sec": samples / max(elapsed, 1e-9), "train/data_wait": wait / max(elapsed, 1e-9),
                   "train/skipped_images": self.state.skipped_images}
        if self.scaler.is_enabled():
            scalars["train/amp_scale"] = self.scaler.get_scale()
        self.log.scalars(scalars, self.state.global_step)
        self.log.step(bar, epoch=self.state.epoch, step=self.state.global_step, loss=loss, lr=lr,
                      samples_per_sec=scalars["train/samples_per_sec"], data_wait=scalars["train/data_wait"])

    # -- evaluation
    def evaluate(self) -> dict | None:
        metrics = evaluate(model=self.model, split=self.loaders.val_split, image_loader=self.loaders.val,
                           collator=self.collator, autocast=self.autocast, runtime=self.runtime,
                           caption_batch=4 * self.settings.batch_size, should_stop=self.runtime.stop_seen_alone)
        if metrics and metrics["unreadable_images"]:
            self.log.warn_once("val-unreadable", f"⚠ {metrics['unreadable_images']} val images could not be read: "
                                                 f"they are scored as black squares (counted as misses)")
        return metrics

    # -- checkpoints
    def save(self, names: list[str]) -> Path:
        """Save the run under `names` (the first written, the others linked to it). Every process takes part:
        the RNG states are gathered; only the main process writes."""
        self.sum_skips()
        if not torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all():  # one device sync
            raise TrainingError(f"the weights hold NaN or inf at step {self.state.global_step}; not saved, so the "
                                f"last good checkpoint is kept; lower --lr or use --precision bf16")
        train_state = self.state.state_dict()
        train_state["data_state"]["fingerprint"] = self.record.fingerprint
        checkpoint = make_checkpoint(model=self.model, optimizer=self.optimizer, scaler=self.scaler,
                                     train_state=train_state, config=self.record.config,
                                     tokenizer=self.record.tokenizer_json,
                                     rng_states=self.runtime.gather_objects(capture_rng_state()), run=self.record.lineage)
        stall = self.runtime.on_main(lambda: self.checkpointer.save(checkpoint, names))  # its error on every process
        self.log.scalars({"train/ckpt_stall_ms": 1000 * stall}, self.state.global_step)
        self.last_saved = self.checkpointer.savedir / names[0]
        return self.last_saved

    # -- the whole run
    def fit(self) -> int:
        """Train to the last epoch; returns the exit status (0, or 128 + the stop signal)."""
        state = self.state
        while state.epoch < self.settings.epochs:
            started = time.perf_counter()
            signum = self.train_epoch()
            metrics = None if signum else self.evaluate()
            signum = signum or self.agree_to_stop()
            if signum or metrics is None:
                return self.stop(signum)
            self.end_epoch(metrics, time.perf_counter() - started)
        self.wait_for_save()
        return 0

    def end_epoch(self, metrics: dict, seconds: float) -> None:
        state = self.state
        state.val_loss = metrics["loss"]
        self.log.scalars({f"val/{name}": metrics[name] for name in METRICS}, state.global_step)
        if self.log.enabled:
            picture = retrieval_picture(metrics["similarity"], self.loaders.val_split, self.loaders.val_images)
            self.log.image("val/retrieval", picture, state.global_step)
        improved = state.best_val is None or metrics["loss"] < state.best_val
        state.best_val = metrics["loss"] if improved else state.best_val
        finished_epoch, train_loss = state.epoch, state.epoch_loss()
        state.epoch, state.samples_seen, state.epoch_loss_sum, state.epoch_loss_steps = state.epoch + 1, 0, 0.0, 0
        self.save([LAST] + ([BEST] if improved else []) +
                  ([snapshot_name(finished_epoch)] if self.settings.keep_last else []))
        self.log.flush()
        self.log.epoch_end(epoch=finished_epoch, epochs=self.settings.epochs, train_loss=train_loss, metrics=metrics,
                           improved=improved, seconds=seconds)
        self.last_metrics = metrics

    def stop(self, signum: int) -> int:
        """Save where the run stands and wait until the file is durable; every process waits for it, so no
        launcher kills the writer. Returns the exit status, 128 + the signal."""
        self.save([LAST])
        self.wait_for_save()
        self.runtime.barrier()
        self.log.flush()
        return 128 + signum

    def position(self) -> str:
        state = self.state
        return (f"at epoch {state.epoch}, step {state.global_step} "
                f"(sample {state.samples_seen} of {self.loaders.train_samples})")
