"""Train the multimodal brain (image encoder + text encoder meeting in one shared space) on Flickr8k.

    python train_multimodal_brain_flickr8k.py --root_dir data/flickr8k --epochs 100 --resume auto
    python train_multimodal_brain_flickr8k.py --demo          # a small run on generated data, CPU friendly

A run can be stopped at any step (Ctrl-C, SIGTERM, SLURM's SIGUSR1) and resumed with `--resume`:
model, optimizer, scaler, RNG and data position come back, so it continues as if never stopped.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import shlex
import signal
import sys
import time
import urllib.error
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers' threads and loader workers do not mix

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from torchvision.transforms import v2
from tqdm import tqdm

import checkpointing
from brain_model import (BrainConfig, BrainModel, UnsupportedEncoder, is_weights_file, retrieval_metrics,
                         scratch_text_heads)
from checkpointing import BEST, LAST, CheckpointError
from flickr8k_dataset import (CaptionCollator, DatasetError, Flickr8kDataset, JpegImages, ResumableSampler, Split,
                              TrainAugment, UniqueImages, build_image_cache, eval_transform, load_splits,
                              normalize_images, tokenizer_from_json, train_caption_tokenizer)
from sample_data import write_sample_dataset

DEMO_ROOT = Path("data/flickr8k_sample")
EVAL_LOSS_CHUNK = 32  # val loss is InfoNCE over fixed chunks of this many pairs, whatever --batch_size is
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class TrainSettings:
    """Settings of the run besides the architecture: saved in the checkpoint and restored on resume."""
    epochs: int = 50
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.05
    warmup_steps: int = 500
    min_lr_ratio: float = 0.1  # the cosine schedule ends at lr * min_lr_ratio
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "auto"  # fp16 on CUDA, fp32 on CPU; the resolved value is what gets saved
    hflip: bool = False
    vocab_size: int = 4000  # scratch tokenizer only
    cache_images: bool = True
    save_every_steps: int = 0
    keep_last: int = 0


# A small configuration that trains in about two minutes on 2 CPU cores and needs no download.
DEMO_SETTINGS = {"image_encoder": "shufflenet_v2_x0_5", "image_weights": "none", "image_size": 64, "text_encoder": "scratch",
                 "scratch_text_width": 128, "scratch_text_layers": 2, "max_text_len": 24, "d_shared": 128,
                 "brain_layers": 1, "brain_heads": 4, "epochs": 8, "batch_size": 32, "lr": 1e-3, "warmup_steps": 30,
                 "vocab_size": 600}
SETTING_FIELDS = [f for f in fields(BrainConfig) if f.name != "text_vocab_size"] + list(fields(TrainSettings))


class ConfigError(Exception):
    """A bad command-line value: one line naming the flag, the value and the fix."""


class TrainingError(Exception):
    """The run cannot go on (a non-finite loss): one line with the step."""


# ----------------------------------------------------------------------------- arguments

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and status 2, like every other user mistake
        self.exit(2, f"Error: {message} (see --help)\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Settings of the run default to None here: None means "not given", so that on resume the
    checkpoint's value applies (command line > checkpoint > defaults; see `resolve_settings`)."""
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = {**BrainConfig().to_dict(), **asdict(TrainSettings())}

    def setting(group, name: str, kind=None, **options) -> None:
        help_text = f"{options.pop('help')} (default: {defaults[name]}; on resume: the checkpoint's)"
        if kind is bool:
            group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(f"--{name}", type=kind, default=None, help=help_text, **options)

    data = parser.add_argument_group("data")
    data.add_argument("--root_dir", type=Path, help="Flickr8k folder (token, Karpathy or Kaggle layout)")
    data.add_argument("--annotations", choices=("auto", "token", "karpathy", "kaggle"), default="auto",
                      help="annotation layout to read (default: detected)")
    data.add_argument("--num_workers", type=int, default=2, help="data loader processes (default: 2)")
    data.add_argument("--cache_dir", type=Path, help="image cache folder (default: ROOT_DIR/.brain_cache)")
    setting(data, "image_size", int, help="image side in pixels")
    setting(data, "max_text_len", int, help="captions are cut at this many tokens")
    setting(data, "hflip", bool, help="random horizontal flips (off: captions say left and right)")
    setting(data, "cache_images", bool, help="decode each image once into a memory-mapped cache")

    model = parser.add_argument_group("model")
    setting(model, "image_encoder", str, help="torchvision CNN classifier, e.g. resnet50, resnet18, convnext_tiny")
    setting(model, "image_weights", str, help="DEFAULT, a torchvision weights name, a local .pth file, or none")
    setting(model, "text_encoder", str, help="Hugging Face model name or local folder, or scratch")
    setting(model, "vocab_size", int, help="WordPiece vocabulary size for --text_encoder scratch")
    setting(model, "scratch_text_width", int, help="hidden size of the scratch text encoder")
    setting(model, "scratch_text_layers", int, help="layers of the scratch text encoder")
    setting(model, "d_shared", int, help="width of the shared space and the brain core")
    setting(model, "brain_layers", int, help="shared transformer layers")
    setting(model, "brain_heads", int, help="attention heads in the brain core")
    setting(model, "dropout", float, help="dropout in the brain core and scratch text encoder")

    optimisation = parser.add_argument_group("optimisation")
    setting(optimisation, "epochs", int, help="train until this many epochs are done")
    setting(optimisation, "batch_size", int, help="pairs per step")
    setting(optimisation, "lr", float, help="peak learning rate (AdamW, linear warmup, cosine decay)")
    setting(optimisation, "weight_decay", float, help="AdamW weight decay on matrices")
    setting(optimisation, "warmup_steps", int, help="linear warmup steps")
    setting(optimisation, "min_lr_ratio", float, help="final lr as a fraction of --lr")
    setting(optimisation, "grad_clip", float, help="clip the gradient norm at this value (0: no clipping)")
    setting(optimisation, "seed", int, help="seed of every random choice in the run")

    device = parser.add_argument_group("precision and device")
    setting(device, "precision", str, choices=("auto",) + PRECISIONS, help="autocast precision; auto: fp16 on CUDA, fp32 on CPU")
    device.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    device.add_argument("--deterministic", action="store_true", help="deterministic CUDA kernels (slower)")
    device.add_argument("--compile", action="store_true", help="torch.compile the model (checkpoints stay plain)")

    saving = parser.add_argument_group("checkpointing")
    saving.add_argument("--savedir", type=Path, default=Path("checkpoints_brain_v2"), help="default: checkpoints_brain_v2")
    saving.add_argument("--resume", help="checkpoint file, a folder holding one, or auto (newest in --savedir)")
    setting(saving, "save_every_steps", int, help="also save last_brain_v2.pt every N steps (0: epoch ends only)")
    setting(saving, "keep_last", int, help="keep this many epoch_NNN_brain_v2.pt snapshots")

    logging = parser.add_argument_group("logging and evaluation")
    logging.add_argument("--logdir", type=Path, default=Path("runs_brain_v2"), help="TensorBoard folder (default: runs_brain_v2)")
    logging.add_argument("--log_every", type=int, default=50, help="log train scalars every N steps (default: 50)")
    logging.add_argument("--eval_only", action="store_true", help="evaluate the --resume checkpoint and exit")
    logging.add_argument("--eval_split", choices=("val", "test"), default="val", help="split for --eval_only")
    logging.add_argument("--demo", action="store_true",
                         help=f"train a small model on generated data in {DEMO_ROOT} (written if absent)")
    args = parser.parse_args(argv)
    if args.demo and args.root_dir is None:
        args.root_dir = DEMO_ROOT
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def resolve_settings(args: argparse.Namespace, saved: dict | None) -> tuple[BrainConfig, TrainSettings, list[str]]:
    """Command line > checkpoint config > demo settings (with --demo) > defaults; returns the overrides."""
    defaults = {**BrainConfig().to_dict(), **asdict(TrainSettings()), **(DEMO_SETTINGS if args.demo else {})}
    saved = saved or {}
    values, overridden = {}, []
    for name in [f.name for f in SETTING_FIELDS]:
        given = getattr(args, name)
        if given is not None and name in saved and saved[name] != given:
            overridden.append(f"{name} {saved[name]} -> {given}")
        values[name] = given if given is not None else saved.get(name, defaults[name])
    values["text_vocab_size"] = saved.get("text_vocab_size", 0)
    brain = BrainConfig.from_dict(values)
    train = TrainSettings(**{f.name: values[f.name] for f in fields(TrainSettings)})
    return brain, train, overridden


def validate(args: argparse.Namespace, brain: BrainConfig, train: TrainSettings) -> None:
    """Every check of the options, in one place; raises ConfigError naming the flag, the value and the fix."""
    def need(ok: bool, flag: str, value, fix: str) -> None:
        if not ok:
            raise ConfigError(f"--{flag} {value}: {fix}")

    need(args.root_dir is not None, "root_dir", "(missing)", "give the Flickr8k folder, or use --demo")
    values = {**brain.to_dict(), **asdict(train)}
    for flag in ("epochs", "image_size", "max_text_len", "d_shared", "brain_layers", "brain_heads",
                 "scratch_text_width", "scratch_text_layers"):
        need(values[flag] >= 1, flag, values[flag], "must be a positive integer")
    need(train.batch_size >= 2, "batch_size", train.batch_size, "must be at least 2 (contrastive pairs need negatives)")
    need(train.lr > 0 and math.isfinite(train.lr), "lr", train.lr, "must be a positive number such as 2e-4")
    need(0 < train.min_lr_ratio <= 1, "min_lr_ratio", train.min_lr_ratio, "must be in (0, 1]")
    for flag in ("weight_decay", "warmup_steps", "grad_clip", "save_every_steps", "keep_last"):
        need(getattr(train, flag) >= 0, flag, getattr(train, flag), "must not be negative")
    need(0 <= brain.dropout < 1, "dropout", brain.dropout, "must be in [0, 1)")
    need(brain.image_size >= 32, "image_size", brain.image_size, "must be at least 32 pixels")
    need(brain.d_shared % brain.brain_heads == 0, "d_shared", brain.d_shared,
         f"must be divisible by --brain_heads {brain.brain_heads}")
    width = brain.scratch_text_width
    need(width % scratch_text_heads(width) == 0, "scratch_text_width", width,
         "must be below 64 or a multiple of 64 (one attention head per 64 channels)")
    need(train.vocab_size >= 100, "vocab_size", train.vocab_size, "must be at least 100")
    need(args.num_workers >= 0, "num_workers", args.num_workers, "must not be negative")
    need(args.log_every >= 1, "log_every", args.log_every, "must be a positive integer")
    for flag in ("savedir", "logdir"):
        folder = getattr(args, flag)
        need(not folder.exists() or folder.is_dir(), flag, folder, "is a file; name a folder")
    models = torchvision.models.list_models(module=torchvision.models)
    need(brain.image_encoder in models, "image_encoder", brain.image_encoder,
         "not a torchvision classification model; try resnet50, resnet18 or convnext_tiny")
    weights = brain.image_weights
    if is_weights_file(weights):
        need(Path(weights).is_file(), "image_weights", weights, "no such file; give a torchvision weights file or none")
    elif weights not in ("DEFAULT", "none"):
        known = [w.name for w in torchvision.models.get_model_weights(brain.image_encoder)]
        need(weights.split(".")[-1] in known, "image_weights", weights,
             f"use DEFAULT, none, a local .pth file or one of {', '.join(known)}")
    need(args.device != "cuda" or torch.cuda.is_available(), "device", args.device,
         "CUDA is not available on this machine; use --device cpu")
    need(not args.eval_only or args.resume, "eval_only", "", "needs --resume PATH (the checkpoint to evaluate)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic matmuls
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not deterministic  # autotuning picks kernels nondeterministically


def resolve_precision(precision: str, device: torch.device):
    """Precision resolves once into (autocast context factory, GradScaler), so the loop has no branches:
    fp32 autocasts nothing and its scaler is a no-op; only fp16 scales the loss."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    autocast = partial(torch.autocast, device.type, dtype=dtype) if dtype else nullcontext
    return autocast, torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def learning_rate(step: int, train: TrainSettings, total_steps: int) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio: a pure function of the step."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / (train.warmup_steps + 1)
    progress = min(1.0, (step - train.warmup_steps) / max(1, total_steps - train.warmup_steps))
    floor = train.lr * train.min_lr_ratio
    return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (train.lr - floor)


def build_optimizer(model: torch.nn.Module, train: TrainSettings, device: torch.device) -> torch.optim.AdamW:
    """AdamW with CLIP's betas; weight decay on matrices only, never on biases, norms or the temperature."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.lr, betas=(0.9, 0.98), eps=1e-6, fused=device.type == "cuda")


# ----------------------------------------------------------------------------- data

@dataclass
class Data:
    splits: dict[str, Split]
    tokenizer: object
    tokenizer_json: str | None  # the scratch tokenizer, saved with the run


def load_data(args: argparse.Namespace, brain: BrainConfig, train: TrainSettings, checkpoint: dict | None) -> Data:
    """Read the annotations and make the tokenizer (from the checkpoint, trained on captions, or pretrained)."""
    from transformers import AutoTokenizer

    if args.demo and not args.root_dir.exists():
        print(f"Writing the sample data set to {args.root_dir} ...")
        write_sample_dataset(args.root_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = load_splits(args.root_dir, args.annotations)
    for warning in caught:
        print(f"⚠ {warning.message}")
    if brain.text_encoder != "scratch":
        try:
            return Data(splits, AutoTokenizer.from_pretrained(brain.text_encoder), None)
        except OSError:
            raise ConfigError(f"--text_encoder {brain.text_encoder}: its tokenizer could not be loaded (no network "
                              f"or no such model); give a local folder, or use --text_encoder scratch") from None
    saved_json = (checkpoint or {}).get("tokenizer")
    tokenizer_json = saved_json or train_caption_tokenizer(splits["train"].captions, train.vocab_size).backend_tokenizer.to_str()
    return Data(splits, tokenizer_from_json(tokenizer_json), tokenizer_json)


def _ignore_stop_signals(worker_id: int) -> None:
    # Loader workers leave signals to the main process, which stops at a step boundary and shuts them down.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


def make_loader(dataset, batch_size: int, args: argparse.Namespace, device: torch.device, seed: int, **options) -> DataLoader:
    workers = args.num_workers
    # Each loader has its own generator: creating an iterator otherwise draws from the global torch RNG.
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                      worker_init_fn=_ignore_stop_signals, generator=torch.Generator().manual_seed(seed), **options)


# ----------------------------------------------------------------------------- model

def build_model(brain: BrainConfig, pretrained: bool) -> BrainModel:
    try:
        return BrainModel(brain, pretrained=pretrained)
    except UnsupportedEncoder as error:
        raise ConfigError(str(error)) from None
    except urllib.error.URLError:  # torchvision downloads weights with urllib
        raise ConfigError(f"--image_weights {brain.image_weights}: weights for {brain.image_encoder} could not be "
                          f"downloaded (no network?); give a local weights file or none") from None
    except OSError as error:  # transformers reports a failed download or a missing folder as OSError
        raise ConfigError(f"--text_encoder {brain.text_encoder}: could not be loaded ({str(error).splitlines()[0]}); "
                          f"give a local folder, or use --text_encoder scratch") from None


def load_image_weights_file(model: BrainModel, path: str) -> None:
    weights = checkpointing.model_weights(checkpointing.load_checkpoint(Path(path)), Path(path))
    report = checkpointing.load_model_weights(model.image_encoder.trunk, weights, Path(path),
                                              log=lambda line: None)
    print(f"✓ Image weights from {path}: {report.loaded} tensors ({100 * report.loaded_fraction:.0f}% of the trunk)")


# ----------------------------------------------------------------------------- signals

class StopFlag:
    """SIGINT, SIGTERM and SIGUSR1 ask the run to stop at the next step boundary; a second SIGINT exits at once
    (atomic saves mean even that never leaves a half-written checkpoint)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}

    def _handle(self, signum: int, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            os._exit(128 + signum)
        self.signum = self.signum or signum
        print(f"\n{signal.Signals(signum).name} received: stopping at the next step boundary "
              f"(Ctrl-C again to quit without saving)", flush=True)

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def resume_command(argv: list[str], checkpoint: Path) -> str:
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--resume":
            skip = True
        elif not token.startswith("--resume="):
            kept.append(token)
    return shlex.join(["python", "train_multimodal_brain_flickr8k.py", *kept, "--resume", str(checkpoint)])


# ----------------------------------------------------------------------------- the run

@dataclass
class Progress:
    epoch: int  # the epoch being trained
    samples_seen: int  # of that epoch
    global_step: int
    best_val: float | None
    val_loss: float | None = None
    skipped_images: int = 0


class Trainer:
    """The loop, evaluation, logging and saving of one run; `fit` is the whole of training."""

    def __init__(self, args, brain, train, data, model, optimizer, autocast, scaler, device, progress):
        self.args, self.brain, self.train, self.data = args, brain, train, data
        self.model, self.optimizer, self.autocast, self.scaler, self.device = model, optimizer, autocast, scaler, device
        self.progress = progress
        self.step_model = torch.compile(model) if args.compile else model  # saves always use the plain model
        self.collator = CaptionCollator(data.tokenizer, brain.max_text_len)
        self.config = {**brain.to_dict(), **asdict(train)}
        self.fingerprint = data.splits["train"].fingerprint()
        self.bad_files: set[str] = set()
        self.last_metrics: dict | None = None  # the latest epoch's evaluation
        self.channels_last = device.type == "cuda"
        if self.channels_last:
            self.model.image_encoder.to(memory_format=torch.channels_last)

    # -- data
    def image_source(self, split: Split):
        """The split's images: from the decode-once cache when the run uses it, else from the JPEG files. A cache
        that cannot be built is one ⚠ line, and the run records that it decodes JPEGs."""
        if self.train.cache_images:
            try:
                return build_image_cache(split.image_paths(), self.brain.image_size,
                                         self.args.cache_dir or self.args.root_dir / ".brain_cache",
                                         self.args.num_workers, progress=sys.stdout.isatty())
            except OSError as error:
                print(f"⚠ Image cache could not be built ({error.strerror or error}); decoding JPEGs instead "
                      f"(recorded as cache_images=False)")
                self.train = replace(self.train, cache_images=False)
                self.config["cache_images"] = False
        return JpegImages(split.image_paths())

    def build_loaders(self) -> None:
        train_split, val_split = self.data.splits["train"], self.data.splits["val"]
        train_images, val_images = self.image_source(train_split), self.image_source(val_split)
        self.sampler = ResumableSampler(len(train_split), self.train.seed)
        dataset = Flickr8kDataset(train_split, train_images, TrainAugment(self.brain.image_size, hflip=self.train.hflip),
                                  self.train.seed)
        self.train_loader = make_loader(dataset, self.train.batch_size, self.args, self.device, self.train.seed,
                                        sampler=self.sampler, collate_fn=self.collator, drop_last=True)
        self.val_split = val_split
        self.val_images = val_images
        self.val_loader = make_loader(UniqueImages(val_split, val_images, self.brain.image_size),
                                      self.train.batch_size, self.args, self.device, self.train.seed)
        self.steps_per_epoch = len(train_split) // self.train.batch_size
        self.total_steps = self.steps_per_epoch * self.train.epochs

    def images_to_device(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 batch from the loader -> normalised float on the device (channels-last for CNNs on CUDA)."""
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return normalize_images(images.to(self.device, non_blocking=True)).contiguous(memory_format=memory_format)

    # -- checkpoints
    def save(self, names: list[str]) -> Path:
        p = self.progress
        checkpoint = checkpointing.make_checkpoint(  # `epoch` is the last completed one; data_state is where we are
            model=self.model, optimizer=self.optimizer, scaler=self.scaler, epoch=p.epoch - 1, global_step=p.global_step, best_val=p.best_val,
            val_loss=p.val_loss, config=self.config, tokenizer=self.data.tokenizer_json,
            data_state={"epoch": p.epoch, "samples_seen": p.samples_seen, "fingerprint": self.fingerprint,
                        "skipped_images": p.skipped_images})
        for name in names:
            checkpointing.save_checkpoint(checkpoint, self.args.savedir / name)
        return self.args.savedir / names[0]

    # -- one optimisation step
    def step(self, batch: dict) -> tuple[float, torch.Tensor]:
        """One optimisation step; returns the loss and the (unclipped) gradient norm, left on the device."""
        lr = learning_rate(self.progress.global_step, self.train, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images = self.images_to_device(batch["images"])
        input_ids = batch["input_ids"].to(self.device, non_blocking=True)
        attention_mask = batch["attention_mask"].to(self.device, non_blocking=True)
        with self.autocast():
            loss = self.step_model(images, input_ids, attention_mask)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train.grad_clip or float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        loss_value = loss.item()
        if not math.isfinite(loss_value) and not self.scaler.is_enabled():  # fp16 overflow is the scaler's job
            raise TrainingError(f"loss is {loss_value} at step {self.progress.global_step + 1} "
                                f"({self.config['precision']}); lower --lr or check the data")
        return loss_value, grad_norm

    def note_bad_files(self, batch: dict) -> None:
        self.progress.skipped_images += len(batch["bad_files"])
        for name in batch["bad_files"]:
            if name not in self.bad_files:
                self.bad_files.add(name)
                tqdm.write(f"⚠ Could not read image {name}: substituting the next sample (counted in train/skipped_images)")

    def train_epoch(self, stop: StopFlag, writer: SummaryWriter) -> float | None:
        """Train the rest of the current epoch; returns its mean loss, or None when stopped by a signal."""
        p = self.progress
        self.sampler.set_position(p.epoch, p.samples_seen)
        self.model.train()
        interactive = sys.stdout.isatty()
        bar = tqdm(total=self.steps_per_epoch, initial=p.samples_seen // self.train.batch_size,
                   desc=f"epoch {p.epoch}", disable=not interactive, dynamic_ncols=True)
        losses, window_start, window_samples, window_wait = [], time.perf_counter(), 0, 0.0
        fetch_start = time.perf_counter()
        for batch in self.train_loader:
            window_wait += time.perf_counter() - fetch_start  # time the step waited for data
            if stop.signum:
                break
            self.note_bad_files(batch)
            loss, grad_norm = self.step(batch)
            batch_samples = len(batch["images"])
            p.samples_seen += batch_samples
            p.global_step += 1
            losses.append(loss)
            window_samples += batch_samples
            bar.update()
            if p.global_step % self.args.log_every == 0:
                elapsed = time.perf_counter() - window_start
                lr = self.optimizer.param_groups[0]["lr"]
                scalars = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm.item(),
                           "train/samples_per_sec": window_samples / max(elapsed, 1e-9),
                           "train/data_wait": window_wait / max(elapsed, 1e-9), "train/skipped_images": p.skipped_images}
                if self.scaler.is_enabled():
                    scalars["train/amp_scale"] = self.scaler.get_scale()
                for tag, value in scalars.items():
                    writer.add_scalar(tag, value, p.global_step)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", sps=f"{scalars['train/samples_per_sec']:.0f}")
                if not interactive:
                    print(f"epoch {p.epoch} step {p.global_step} loss {loss:.4f} lr {lr:.2e} "
                          f"{scalars['train/samples_per_sec']:.0f} samples/s, data wait "
                          f"{100 * scalars['train/data_wait']:.0f}%", flush=True)
                window_start, window_samples, window_wait = time.perf_counter(), 0, 0.0
            if self.train.save_every_steps and p.global_step % self.train.save_every_steps == 0:
                self.save([LAST])
            fetch_start = time.perf_counter()
        bar.close()
        if stop.signum:
            return None
        return sum(losses) / len(losses) if losses else float("nan")

    # -- evaluation
    @torch.no_grad()
    def evaluate(self, split: Split, loader: DataLoader, stop: StopFlag | None = None) -> dict | None:
        """Val loss and retrieval over the split's unique images; None when a stop signal interrupts it."""
        self.model.eval()
        image_embeddings, text_embeddings = [], []
        for images in loader:
            if stop and stop.signum:
                self.model.train()
                return None
            with self.autocast():
                image_embeddings.append(self.model.encode_image(self.images_to_device(images)))
        batch = 4 * self.train.batch_size
        for start in range(0, len(split.captions), batch):
            if stop and stop.signum:
                self.model.train()
                return None
            tokens = self.collator.tokenize(split.captions[start:start + batch])
            with self.autocast():
                text_embeddings.append(self.model.encode_text(tokens["input_ids"].to(self.device),
                                                              tokens["attention_mask"].to(self.device)))
        self.model.train()
        image_emb, text_emb = torch.cat(image_embeddings), torch.cat(text_embeddings)
        caption_image = torch.tensor(split.caption_image, device=self.device)
        # Val loss over a fixed order in fixed chunks, so it is comparable across runs and batch sizes.
        order = torch.randperm(len(split), generator=torch.Generator().manual_seed(0)).to(self.device)
        chunks = [chunk for chunk in order.split(EVAL_LOSS_CHUNK) if len(chunk) > 1]
        losses = [self.model.contrastive_loss(image_emb[caption_image[chunk]], text_emb[chunk]).item() for chunk in chunks]
        similarity = image_emb @ text_emb.T  # (num_images, num_captions)
        return {"loss": sum(losses) / len(losses), **retrieval_metrics(similarity, caption_image),
                "similarity": similarity}

    def retrieval_picture(self, similarity: torch.Tensor, count: int = 4) -> torch.Tensor:
        """A few val images beside their top-3 retrieved captions ([+] marks a right one), as (3, H, W)."""
        side, width = 128, 760
        canvas = Image.new("RGB", (width, side * count), "white")
        draw = ImageDraw.Draw(canvas)
        font = ImageFont.load_default(size=15)
        thumbnail = eval_transform(side)
        for row in range(min(count, similarity.shape[0])):
            try:
                pixels = thumbnail(self.val_images.load(row))
                canvas.paste(v2.functional.to_pil_image(pixels), (0, row * side))
            except (OSError, ValueError):
                pass  # an unreadable image leaves its square blank; its captions still show
            for rank, caption_index in enumerate(similarity[row].topk(3).indices.tolist()):
                right = self.val_split.caption_image[caption_index] == row
                text = f"{'[+]' if right else '[ ]'} {self.val_split.captions[caption_index]}"[:80]
                draw.text((side + 10, row * side + 15 + 35 * rank), text, fill="darkgreen" if right else "black", font=font)
        return torch.from_numpy(np.array(canvas)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)

    # -- the whole run
    def fit(self, stop: StopFlag, writer: SummaryWriter) -> int:
        p = self.progress
        while p.epoch < self.train.epochs:
            started = time.perf_counter()
            train_loss = self.train_epoch(stop, writer)
            metrics = None if stop.signum else self.evaluate(self.val_split, self.val_loader, stop)
            if metrics is None:
                return self.stop_now(stop, writer)
            p.val_loss = metrics["loss"]
            for name in ("loss", "i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"):
                writer.add_scalar(f"val/{name}", metrics[name], p.global_step)
            writer.add_image("val/retrieval", self.retrieval_picture(metrics["similarity"]), p.global_step)
            improved = p.best_val is None or metrics["loss"] < p.best_val
            p.best_val = metrics["loss"] if improved else p.best_val
            finished_epoch = p.epoch
            p.epoch, p.samples_seen = p.epoch + 1, 0
            names = [LAST] + ([BEST] if improved else []) + ([checkpointing.snapshot_name(finished_epoch)]
                                                             if self.train.keep_last else [])
            self.save(names)
            if self.train.keep_last:
                checkpointing.rotate_snapshots(self.args.savedir, self.train.keep_last)
            writer.flush()
            print(f"Epoch {finished_epoch}/{self.train.epochs}: train loss {train_loss:.4f}, val loss {metrics['loss']:.4f}"
                  f"{' (best)' if improved else ''}, i2t R@1/5/10 {metrics['i2t_R@1']:.1f}/{metrics['i2t_R@5']:.1f}/"
                  f"{metrics['i2t_R@10']:.1f}, t2i R@1/5/10 {metrics['t2i_R@1']:.1f}/{metrics['t2i_R@5']:.1f}/"
                  f"{metrics['t2i_R@10']:.1f}, {time.perf_counter() - started:.0f} s", flush=True)
            self.last_metrics = metrics
        return 0

    def stop_now(self, stop: StopFlag, writer: SummaryWriter) -> int:
        path = self.save([LAST])
        writer.flush()
        p = self.progress
        print(f"Stopped by {signal.Signals(stop.signum).name} at epoch {p.epoch}, step {p.global_step} "
              f"(sample {p.samples_seen} of {len(self.data.splits['train'])}); saved {path}")
        print(f"Resume with: {resume_command(self.args.argv, path)}", flush=True)
        return 128 + stop.signum


def print_banner(trainer: Trainer, start_epoch: int) -> None:
    splits = trainer.data.splits
    print(f"\nTrain samples: {len(splits['train'])}")
    print(f"Val samples:   {len(splits['val'])}")
    print(f"Device: {trainer.device.type}")
    print(f"Precision: {trainer.train.precision}")
    print(f"Batch size: {trainer.train.batch_size}")
    print(f"Learning rate: {trainer.train.lr}")
    print(f"Training epochs: {start_epoch} -> {trainer.train.epochs}", flush=True)


def print_metrics_table(metrics: dict, split: str) -> None:
    print(f"{split} loss {metrics['loss']:.4f}")
    print(f"{'':16}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'median rank':>14}")
    for direction, label in (("i2t", "image -> text"), ("t2i", "text -> image")):
        print(f"{label:16}" + "".join(f"{metrics[f'{direction}_R@{k}']:8.1f}" for k in (1, 5, 10))
              + f"{metrics[f'{direction}_median_rank']:14.0f}")


def chance_recall_at(k: int, num_images: int, captions_per_image: int) -> tuple[float, float]:
    """Recall@k (in %) of a random ranking: image->text (any of its captions in the top k), text->image."""
    num_captions = num_images * captions_per_image
    miss = math.comb(num_captions - captions_per_image, k) / math.comb(num_captions, k)
    return 100 * (1 - miss), 100 * min(1.0, k / num_images)


def report_resume_plan(checkpoint: dict, overridden: list[str], data: Data) -> None:
    restored = ["settings" if checkpoint.get("config") else "", "RNG" if checkpoint.get("rng_state") else "",
                "data position" if checkpoint.get("data_state") else ""]
    print(f"Plan: restored {', '.join(item for item in restored if item) or 'weights only'} from the checkpoint")
    print(f"      overridden on the command line: {'; '.join(overridden) or 'nothing'}")
    saved_fingerprint = (checkpoint.get("data_state") or {}).get("fingerprint")
    current = data.splits["train"].fingerprint()
    if saved_fingerprint and saved_fingerprint != current:
        print(f"⚠ Training data differs from the checkpoint's: {saved_fingerprint['samples']} samples "
              f"({saved_fingerprint['sha256']}) -> {current['samples']} samples ({current['sha256']})")


def report_demo(trainer: Trainer) -> None:
    metrics = trainer.last_metrics
    num_images = len(trainer.val_split.images)
    chance_i2t, chance_t2i = chance_recall_at(5, num_images, round(len(trainer.val_split) / num_images))
    print(f"Demo retrieval on {num_images} val images: Recall@5 image->text {metrics['i2t_R@5']:.1f}% "
          f"(chance {chance_i2t:.1f}%), text->image {metrics['t2i_R@5']:.1f}% (chance {chance_t2i:.1f}%)")



def find_checkpoint(args: argparse.Namespace) -> tuple[Path | None, dict | None]:
    if not args.resume:
        return None, None
    if args.resume == "auto":
        path = checkpointing.find_latest_checkpoint(args.savedir)
        if path is None:
            print(f"--resume auto: no loadable checkpoint in {args.savedir}; starting a fresh run")
            return None, None
    else:
        path = Path(args.resume)
        path = checkpointing.checkpoint_in_folder(path) if path.is_dir() else path
    return path, checkpointing.load_checkpoint(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = None
    try:
        # setup: where to resume from decides the settings (command line > checkpoint > defaults)
        resume_path, checkpoint = find_checkpoint(args)
        brain, train, overridden = resolve_settings(args, (checkpoint or {}).get("config"))
        validate(args, brain, train)
        device = resolve_device(args.device)
        if train.precision == "auto":  # the checkpoint records the resolved choice
            train = replace(train, precision="fp16" if device.type == "cuda" else "fp32")
        seed_everything(train.seed, args.deterministic)

        # build: data, tokenizer, model, optimizer, precision
        data = load_data(args, brain, train, checkpoint)
        if brain.text_encoder == "scratch":
            brain = replace(brain, text_vocab_size=len(data.tokenizer))
        model = build_model(brain, pretrained=checkpoint is None).to(device)
        if checkpoint is None and is_weights_file(brain.image_weights):
            load_image_weights_file(model, brain.image_weights)
        optimizer = build_optimizer(model, train, device)
        autocast, scaler = resolve_precision(train.precision, device)

        # resume: weights, optimizer, scaler and position; then the RNG, last, so nothing above disturbs it
        progress = Progress(epoch=0, samples_seen=0, global_step=0, best_val=None)
        if checkpoint is not None:
            point = checkpointing.restore_training_state(checkpoint, resume_path, model, optimizer, scaler,
                                                         train.precision, brain.to_dict())
            progress = Progress(point.epoch, point.samples_seen, point.global_step, point.best_val,
                                skipped_images=(checkpoint.get("data_state") or {}).get("skipped_images", 0))
            optimizer.param_groups[0]["weight_decay"] = train.weight_decay  # the run's setting beats the restored group
            print(checkpointing.RULE)
            report_resume_plan(checkpoint, overridden, data)
        trainer = Trainer(args, brain, train, data, model, optimizer, autocast, scaler, device, progress)

        if args.eval_only:
            split = data.splits[args.eval_split]
            loader = make_loader(UniqueImages(split, trainer.image_source(split), brain.image_size),
                                 train.batch_size, args, device, train.seed)
            print_metrics_table(trainer.evaluate(split, loader), args.eval_split)
            return 0
        if progress.epoch >= train.epochs:
            print(f"Nothing left to train: the checkpoint has finished epoch {progress.epoch - 1} and --epochs is "
                  f"{train.epochs}; pass a larger --epochs to train on.")
            return 0
        trainer.build_loaders()
        checkpointing.remove_stale_temporaries(args.savedir)
        print_banner(trainer, progress.epoch)
        if checkpoint and checkpoint.get("rng_state"):
            checkpointing.restore_rng_state(checkpoint["rng_state"])

        # loop
        stop = StopFlag()
        # purge_step drops events a previous run logged after this checkpoint, so curves never overlap.
        writer = SummaryWriter(args.logdir, purge_step=progress.global_step + 1 if checkpoint is not None else 0)
        writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in sorted(trainer.config.items())),
                        progress.global_step)
        status = trainer.fit(stop, writer)

        # close
        writer.close()
        if status == 0 and args.demo:
            report_demo(trainer)
        return status
    except (ConfigError, DatasetError, CheckpointError) as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    except TrainingError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    finally:
        if stop is not None:
            stop.close()


if __name__ == "__main__":
    sys.exit(main())
