"""The command line and the run's settings: the flags, the demo preset, precedence on resume
(command line > checkpoint > demo preset > defaults) and every check of the options, in one place.

Two kinds of values: *settings* of the run (architecture, optimisation, precision, seed, save policy) are saved
in the checkpoint and come back on resume; *options* say where things are and how this process runs (paths,
device, workers, logging) and never come back.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path, PurePosixPath

import torch
import torchvision

from brain_trainer.brain_model import BrainConfig, is_weights_file
from brain_trainer.data.layouts import LAYOUTS
from brain_trainer.runtime.precision import PRECISIONS
from brain_trainer.tracking import DEFAULT_REPORT_TO, TRACKERS, missing_library

DEMO_ROOT = Path("data/flickr8k_sample")
LOGDIR_ROOT = "runs_brain_v2"  # TensorBoard's folder of every run's curves, each in a folder of its own
ANNOTATIONS = ("auto", *LAYOUTS)  # or the path of an annotation file
MAX_SEED = 2**32 - 1  # numpy's seed range
MAX_LOCK_EXPIRY_S = 366 * 86400  # an object store's lock: an expiry further away is not one this program wrote


class ConfigError(Exception):
    """A bad value: one line naming the flag (or the checkpoint field), the value and the fix."""


@dataclass(frozen=True)
class TrainSettings:
    """Settings of the run besides the architecture: saved in the checkpoint and restored on resume."""

    epochs: int = 50
    batch_size: int = 8  # pairs per optimizer step over all processes (the global batch)
    accum_steps: int = 1  # micro-batches per process per step; the loss stays the global batch's (GradCache)
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


@dataclass(frozen=True)
class RunOptions:
    """Where things are and how this process runs; never saved, never restored."""

    root_dir: Path | None
    annotations: str  # auto, a layout name, or an annotation file
    val_fraction: float | None  # held out by the hash split of layouts without split lists (None: 1000/8091)
    test_fraction: float | None
    num_workers: int
    cache_dir: Path | None
    train_shards: str | None  # WebDataset shards to train on (a brace pattern, `::`-joined, local or s3://)
    val_shards: str | None
    shard_cache_gb: float  # bound of the local cache of remote shards (0: ranged reads)
    device: str
    threads: int | None  # intra-op threads per process; None: OMP_NUM_THREADS, else the runtime's rule
    deterministic: bool
    compile: bool
    savedir: str  # a folder or an fsspec URL (s3://bucket/run): resolved by a storage, never parsed as a Path
    resume: str | None
    storage_options: dict  # for an object store's client (endpoint, profile, ...)
    lock_expiry: float  # seconds an object store's lock outlives its last renewal
    overwrite: bool
    sync_saves: bool
    allow_nonfinite: bool
    logdir: str
    log_every: int
    report_to: tuple[str, ...]  # the trackers, in order (docs/tracking.md)
    run_name: str | None
    eval_only: bool
    eval_split: str
    folds: int
    demo: bool
    argv: tuple[str, ...]  # as typed, for the printed resume command
    program: tuple[str, ...]  # the command that started this one (python SCRIPT, brain-trainer train, ...)


@dataclass(frozen=True)
class CommandLine:
    options: RunOptions
    given: dict  # the settings typed on the command line, by name


# A small configuration that trains in about two minutes on 2 CPU cores and needs no download.
DEMO_SETTINGS = {
    "image_encoder": "shufflenet_v2_x0_5",
    "image_weights": "none",
    "image_size": 64,
    "text_encoder": "scratch",
    "scratch_text_width": 128,
    "scratch_text_layers": 2,
    "max_text_len": 24,
    "d_shared": 128,
    "brain_layers": 1,
    "brain_heads": 4,
    "epochs": 8,
    "batch_size": 32,
    "lr": 1e-3,
    "warmup_steps": 30,
    "vocab_size": 600,
}
SETTING_FIELDS = [f for f in fields(BrainConfig) if f.name != "text_vocab_size"] + list(fields(TrainSettings))
SETTING_DEFAULTS = {**BrainConfig().to_dict(), **asdict(TrainSettings())}
FLOAT_SETTINGS = [name for name, value in SETTING_DEFAULTS.items() if isinstance(value, float)]
FLOAT32 = torch.finfo(torch.float32)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(
            f'not JSON ({error.msg}); pass an object like \'{{"key": "value"}}\''
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object ({...})")
    return value


ACCUM_HELP = (
    "take each process's share of the global batch in N micro-batches, for big contrastive batches on "
    "small GPUs: every micro-batch's embeddings are computed without gradient, the InfoNCE loss is taken over "
    "all of them (every process's too), then each micro-batch's forward is re-run with gradient and the same "
    "RNG (GradCache, open_clip's --accum-freq); the update is the one-big-batch update, exactly so for a model "
    "without batch statistics (BatchNorm normalises each micro-batch by its own statistics: close to it). "
    "Costs one extra forward per micro-batch; --batch_size must divide by processes x N; "
    "may change on resume. Memory figures: bench/README.md"
)


# Flags `eval` never reads: left out of its parser (their defaults stay), so its --help is its own and a training
# flag given to eval is refused instead of ignored.
TRAINING_ONLY = frozenset(
    {"epochs", "accum_steps", "lr", "weight_decay", "warmup_steps", "min_lr_ratio", "grad_clip", "seed", "hflip"}
    | {"save_every_steps", "keep_last", "compile", "lock_expiry", "overwrite", "sync_saves", "logdir", "log_every"}
    | {"eval_only", "demo"}
)
EVAL_DESCRIPTION = """`brain-trainer eval`: a checkpoint's retrieval on a split, as training evaluates it at epoch ends.

    brain-trainer eval --resume checkpoints_brain_v2/best_brain_v2.pt --eval_split test

The architecture, the tokenizer and the data's location come from the checkpoint (the command line wins)."""


class _Flags:
    """An argument group that leaves out the flags in `skip`, keeping their defaults."""

    def __init__(self, parser: argparse.ArgumentParser, title: str, skip: frozenset = frozenset()):
        self.parser, self.group, self.skip = parser, parser.add_argument_group(title), skip

    def add_argument(self, *flags: str, **options) -> None:
        name = options.get("dest", flags[-1].lstrip("-").replace("-", "_"))
        if name in self.skip:
            default = options.get("default", False if options.get("action") == "store_true" else None)
            self.parser.set_defaults(**{name: default})
        else:
            self.group.add_argument(*flags, **options)


def _report_to(text: str) -> tuple[str, ...]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        if name not in TRACKERS and name != "none":
            raise argparse.ArgumentTypeError(f"{name!r} is not a tracker; name some of {', '.join(TRACKERS)}, or none")
    if not names or "none" in names and len(names) > 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a comma list such as tensorboard,mlflow, or none alone")
    return tuple(dict.fromkeys(name for name in names if name != "none"))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and status 2, like every other user mistake
        self.exit(2, f"Error: {message} (see --help)\n")


def _setting(group: _Flags, name: str, kind=None, **options) -> None:
    """A setting: saved in the checkpoint, None when not given (so a resume takes the checkpoint's)."""
    help_text = f"{options.pop('help')} (default: {SETTING_DEFAULTS[name]}; on resume: the checkpoint's)"
    if kind is bool:
        group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None, help=help_text)
    else:
        group.add_argument(f"--{name}", type=kind, default=None, help=help_text, **options)


def _data_flags(data: _Flags) -> None:
    """The data: where it is, how it is read and split, the images' and captions' shape."""
    data.add_argument(
        "--root_dir",
        type=Path,
        help=f"data folder ({', '.join(LAYOUTS)} layout; docs/data.md); on resume and in eval: the "
        f"checkpoint's (default with --annotations FILE: the file's folder)",
    )
    data.add_argument(
        "--annotations",
        default="auto",
        help=f"layout to read ({', '.join(LAYOUTS)}) or an annotation file such as dataset_coco.json or "
        f"metadata.jsonl (default: auto, detected in --root_dir)",
    )
    for split in ("val", "test"):
        data.add_argument(
            f"--{split}_fraction",
            type=float,
            help=f"layouts without split lists (kaggle, imagefolder without a split column): the fraction of "
            f"images held out as {split}, at least 1 (default: 1000/8091, the Kaggle Flickr8k split's)",
        )
    data.add_argument(
        "--num_workers", type=int, default=2, help="data loader processes per training process (default: 2)"
    )
    data.add_argument(
        "--cache_dir",
        type=Path,
        help="image cache, shard index and shard cache folder (default: ROOT_DIR/.brain_cache, else .brain_cache)",
    )
    data.add_argument(
        "--train_shards",
        help="train on WebDataset shards instead of ROOT_DIR's train split: a brace pattern such as "
        "'data/cc/{00000..00099}.tar' or 's3://bucket/cc/{00000..41455}.tar', several joined with '::' "
        "(docs/data.md); on resume: the checkpoint's",
    )
    data.add_argument("--val_shards", help="validate on WebDataset shards (default: ROOT_DIR's val split)")
    data.add_argument(
        "--shard_cache_gb",
        type=float,
        default=20.0,
        help="remote shards: local cache bound in GB, shared by a machine's processes (0: read each sample's "
        "bytes from the store) (default: 20)",
    )
    _setting(data, "image_size", int, help="image side in pixels")
    _setting(data, "max_text_len", int, help="captions are cut at this many tokens")
    _setting(data, "hflip", bool, help="random horizontal flips (off: captions say left and right)")
    _setting(data, "cache_images", bool, help="decode each image once into a memory-mapped cache")


def _model_flags(model: _Flags) -> None:
    """The architecture: the encoders and the shared core."""
    _setting(model, "image_encoder", str, help="torchvision CNN classifier, e.g. resnet50, resnet18, convnext_tiny")
    _setting(model, "image_weights", str, help="DEFAULT, a torchvision weights name, a local .pth file, or none")
    _setting(model, "text_encoder", str, help="Hugging Face model name or local folder, or scratch")
    _setting(
        model,
        "vocab_size",
        int,
        help="--text_encoder scratch: the most WordPiece tokens to learn from the training captions (special "
        "tokens, every character, then whole words by frequency); the size learnt is the checkpoint's "
        "text_vocab_size (ckpt inspect): smaller when the captions hold fewer distinct words, larger only when "
        "their characters alone outnumber it",
    )
    _setting(model, "scratch_text_width", int, help="hidden size of the scratch text encoder")
    _setting(model, "scratch_text_layers", int, help="layers of the scratch text encoder")
    _setting(model, "d_shared", int, help="width of the shared space and the brain core")
    _setting(model, "brain_layers", int, help="shared transformer layers")
    _setting(model, "brain_heads", int, help="attention heads in the brain core")
    _setting(model, "dropout", float, help="dropout in the brain core and scratch text encoder")


def _optimisation_flags(optimisation: _Flags) -> None:
    """The optimiser and the schedule."""
    _setting(optimisation, "epochs", int, help="train until this many epochs are done")
    _setting(optimisation, "batch_size", int, help="pairs per step over all processes (must divide by their number)")
    _setting(optimisation, "accum_steps", int, help=ACCUM_HELP)
    _setting(optimisation, "lr", float, help="peak learning rate (AdamW, linear warmup, cosine decay)")
    _setting(optimisation, "weight_decay", float, help="AdamW weight decay on matrices")
    _setting(optimisation, "warmup_steps", int, help="linear warmup steps")
    _setting(optimisation, "min_lr_ratio", float, help="final lr as a fraction of --lr")
    _setting(optimisation, "grad_clip", float, help="clip the gradient norm at this value (0: no clipping)")
    _setting(optimisation, "seed", int, help=f"seed of every random choice in the run, 0 to {MAX_SEED}")


def _device_flags(device: _Flags) -> None:
    """Precision, device and threads."""
    _setting(
        device,
        "precision",
        str,
        choices=("auto",) + PRECISIONS,
        help="autocast precision; auto: fp16 on CUDA, fp32 on CPU",
    )
    device.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="default: cuda if available (cuda:LOCAL_RANK under torchrun)",
    )
    device.add_argument(
        "--threads",
        type=int,
        help="intra-op threads of each process (default: OMP_NUM_THREADS if set, else the cores this process "
        "may use, shared by the processes on its node, less one per loader worker; at least 1). A resume "
        "is bitwise exact only at the checkpoint's count",
    )
    device.add_argument("--deterministic", action="store_true", help="deterministic CUDA kernels (slower)")
    device.add_argument("--compile", action="store_true", help="torch.compile the model (checkpoints stay plain)")


def _checkpoint_flags(saving: _Flags) -> None:
    """Where checkpoints go, when they are written, what a resume may replace."""
    saving.add_argument(
        "--savedir",
        default="checkpoints_brain_v2",
        help="checkpoint folder, or an object-store URL such as s3://bucket/run (default: checkpoints_brain_v2)",
    )
    saving.add_argument(
        "--storage_options",
        type=_json_object,
        default={},
        help="JSON options for the object store's client, e.g. '{\"endpoint_url\": "
        '"http://127.0.0.1:9000"}\' (s3fs; AWS_ENDPOINT_URL and AWS_PROFILE work too; default: none)',
    )
    saving.add_argument(
        "--resume",
        help="checkpoint file, a folder holding one, or auto (newest in --savedir); eval needs it, train without it "
        "starts a fresh run",
    )
    saving.add_argument(
        "--lock_expiry",
        type=float,
        default=120.0,
        help="object stores only: a run's lock on the prefix lapses this many seconds after its "
        "last renewal (renewed every third of it), so a killed run's prefix frees itself "
        "(default: 120)",
    )
    saving.add_argument(
        "--overwrite",
        action="store_true",
        help="let this run replace the checkpoints another run left in --savedir, and hide its curves in --logdir",
    )
    saving.add_argument(
        "--sync_saves",
        action="store_true",
        help="write checkpoints in the training loop instead of a background writer",
    )
    saving.add_argument(
        "--allow_nonfinite", action="store_true", help="load a checkpoint whose weights hold NaN or inf (for forensics)"
    )
    _setting(saving, "save_every_steps", int, help="also save last_brain_v2.pt every N steps (0: epoch ends only)")
    _setting(saving, "keep_last", int, help="keep this many epoch_NNN_brain_v2.pt snapshots")


def _logging_flags(logging: _Flags) -> None:
    """Logging, trackers and evaluation."""
    logging.add_argument(
        "--logdir",
        help=f"TensorBoard's and metrics.jsonl's folder, local (default: {LOGDIR_ROOT}/NAME, NAME the last part "
        f"of --savedir: each checkpoint folder's curves apart, side by side in tensorboard --logdir {LOGDIR_ROOT}); "
        "a folder holding another run's events is refused unless --overwrite",
    )
    logging.add_argument("--log_every", type=int, default=50, help="log train scalars every N steps (default: 50)")
    logging.add_argument(
        "--report_to",
        type=_report_to,
        default=DEFAULT_REPORT_TO,
        help=f"where the scalars go, a comma list of {', '.join(TRACKERS)}, or none (default: "
        f"{','.join(DEFAULT_REPORT_TO)}); mlflow and wandb take their own environment variables (docs/tracking.md)",
    )
    logging.add_argument("--run_name", help="the run's name in MLflow and W&B (default: theirs)")
    logging.add_argument("--eval_only", action="store_true", help="evaluate the --resume checkpoint and exit")
    logging.add_argument(
        "--eval_split",
        choices=("val", "test"),
        default="val",
        help="split to evaluate (eval, --eval_only; default: val)",
    )
    logging.add_argument(
        "--folds",
        type=int,
        default=1,
        help="eval: also report recall averaged over K consecutive folds of the split's images, e.g. 5 on COCO's "
        "5,000 test images for the '1K test' figures (default: 1, the whole split only)",
    )
    logging.add_argument("--demo", action="store_true", help=demo_help())


def parse_args(
    argv: list[str] | None = None,
    description: str = "",
    program: tuple[str, ...] = ("brain-trainer", "train"),
    eval_only: bool = False,
) -> CommandLine:
    """Settings default to None here: None means "not given", so that on resume the checkpoint's value
    applies (see `resolve_settings`)."""
    parser = _Parser(
        prog=" ".join(program),
        description=EVAL_DESCRIPTION if eval_only else description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = lambda title: _Flags(parser, title, TRAINING_ONLY if eval_only else frozenset())

    _data_flags(group("data"))
    _model_flags(group("model"))
    _optimisation_flags(group("optimisation"))
    _device_flags(group("precision and device"))
    _checkpoint_flags(group("checkpointing"))
    _logging_flags(group("logging and evaluation"))
    parser.set_defaults(eval_only=eval_only)  # `brain-trainer eval` is train's --eval_only
    args = vars(parser.parse_args(argv))
    given = {f.name: args.pop(f.name) for f in SETTING_FIELDS if args[f.name] is not None}
    for f in SETTING_FIELDS:
        args.pop(f.name, None)
    if args["demo"] and args["root_dir"] is None:
        args["root_dir"] = DEMO_ROOT
    args["logdir"] = args["logdir"] or default_logdir(args["savedir"])
    if args["root_dir"] is None and args["annotations"] not in ANNOTATIONS:
        args["root_dir"] = Path(args["annotations"]).parent
    args["argv"] = tuple(sys.argv[1:] if argv is None else argv)
    args["program"] = tuple(program)
    return CommandLine(RunOptions(**args), given)


def default_logdir(savedir: str) -> str:
    """runs_brain_v2/NAME, NAME the checkpoint folder's last part: a run in another folder gets curves of its own
    (as Lightning's lightning_logs/version_N), and a resume into the same folder finds its own again."""
    name = PurePosixPath(savedir.rstrip("/")).name if "://" in savedir else os.path.basename(os.path.abspath(savedir))
    return f"{LOGDIR_ROOT}/{name or 'run'}"


def with_saved_data(command: CommandLine, saved: dict | None) -> tuple[CommandLine, str | None]:
    """`--root_dir` (and `--annotations`) and the shards from the checkpoint when none is given, with the line
    that says so; the command line wins, and a checkpoint that does not say where its data is leaves the options
    as they are."""
    options = command.options
    saved = saved if isinstance(saved, dict) else {}
    shards = {name: saved[name] for name in ("train_shards", "val_shards") if isinstance(saved.get(name), str)}
    if options.root_dir is not None or options.train_shards is not None or not (saved.get("root_dir") or shards):
        return command, None
    options = replace(options, **shards)
    if isinstance(saved.get("root_dir"), str):
        annotations = saved.get("annotations") if options.annotations == "auto" else options.annotations
        fractions = {
            name: getattr(options, name) if getattr(options, name) is not None else saved.get(name)
            for name in ("val_fraction", "test_fraction")
        }
        options = replace(
            options,
            root_dir=Path(saved["root_dir"]),
            annotations=annotations if isinstance(annotations, str) else "auto",
            **{name: value if isinstance(value, float) else None for name, value in fractions.items()},
        )
    where = " and ".join(str(value) for value in (saved.get("root_dir"), *shards.values()) if value)
    note = f"Data: {where} (from the checkpoint; pass --root_dir or --train_shards to use other data)"
    return CommandLine(options, command.given), note


def demo_help() -> str:
    """--demo's help, generated from DEMO_SETTINGS so that it lists all of what the preset changes."""
    preset = ", ".join(f"--{name} {value}" for name, value in DEMO_SETTINGS.items())
    return (
        f"train a small model on generated data in {DEMO_ROOT} (written if absent), as --root_dir {DEMO_ROOT} "
        f"{preset} (each unless given on the command line or restored from a checkpoint)"
    )


def _expected_type(name: str) -> tuple[type, ...]:
    default = SETTING_DEFAULTS[name]
    return (int, float) if isinstance(default, float) else (type(default),)


def _check_saved_value(name: str, value, source: str, overridable: bool = True) -> None:
    kinds = _expected_type(name)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        fix = f"pass --{name} to override it, or resume from another file" if overridable else "use another file"
        raise ConfigError(
            f"{source}: field 'config.{name}' is {value!r} (expected a {kinds[-1].__name__}); "
            f"the checkpoint is damaged: {fix}"
        )


def resolve_settings(
    given: dict, saved: dict | None, demo: bool, source: str = "", overridable: bool = True
) -> tuple[BrainConfig, TrainSettings, list[str], dict[str, str]]:
    """Command line > checkpoint config > demo settings (with --demo) > defaults.

    Returns the architecture, the training settings, the overrides ("lr 0.001 -> 0.0005") and, for each setting
    that came from the checkpoint, its source, so an error about it can say where it came from.
    """
    defaults = {**SETTING_DEFAULTS, **(DEMO_SETTINGS if demo else {})}
    saved = saved or {}
    values, overridden, from_checkpoint = {}, [], {}
    for name in [f.name for f in SETTING_FIELDS]:
        if name in given:
            values[name] = given[name]
            if name in saved and saved[name] != given[name]:
                overridden.append(f"{name} {saved[name]} -> {given[name]}")
        elif name in saved:
            _check_saved_value(name, saved[name], source, overridable)
            values[name], from_checkpoint[name] = saved[name], source
        else:
            values[name] = defaults[name]
    vocab = saved.get("text_vocab_size", 0)
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 0:
        raise ConfigError(f"{source}: field 'config.text_vocab_size' is {vocab!r} (expected an integer >= 0)")
    values["text_vocab_size"] = vocab
    model_config = BrainConfig.from_dict(values)
    settings = TrainSettings(**{f.name: values[f.name] for f in fields(TrainSettings)})
    return model_config, settings, overridden, from_checkpoint


def check_settings(
    options: RunOptions,
    model_config: BrainConfig,
    settings: TrainSettings,
    world_size: int = 1,
    from_checkpoint: dict[str, str] | None = None,
) -> None:
    """Every check of the options, in one place; raises ConfigError naming the flag, the value and the fix
    (and the checkpoint, when the value came from one)."""
    need = _need(from_checkpoint or {})
    need(
        options.root_dir is not None or (options.train_shards and options.val_shards),
        "root_dir",
        "(missing)",
        "give the Flickr8k folder, or use --demo"
        + (" (the checkpoint does not say where its data is)" if options.resume else "")
        + ("; with --train_shards, give --root_dir or --val_shards for validation" if options.train_shards else ""),
    )
    check_run_settings(model_config, settings, world_size, from_checkpoint)
    need(options.num_workers >= 0, "num_workers", options.num_workers, "must not be negative")
    need(options.threads is None or options.threads >= 1, "threads", options.threads, "must be at least 1")
    need(options.log_every >= 1, "log_every", options.log_every, "must be a positive integer")
    _check_data_options(options, need)
    _check_shard_options(options, need)
    for name in options.report_to:
        need(missing_library(name) is None, "report_to", name, missing_library(name))
    need(
        3 <= options.lock_expiry <= MAX_LOCK_EXPIRY_S,
        "lock_expiry",
        options.lock_expiry,
        "must be at least 3 seconds (and at most a year)",
    )
    _check_folders(options, need)
    _check_image_encoder(model_config, need)
    _check_micro_batch(model_config, settings, world_size, need)
    need(
        options.device != "cuda" or torch.cuda.is_available(),
        "device",
        options.device,
        "CUDA is not available on this machine; use --device cpu",
    )
    need(not options.eval_only or options.resume, "eval_only", "", "needs --resume PATH (the checkpoint to evaluate)")


def _check_folders(options: RunOptions, need) -> None:
    """--savedir and --logdir name folders (or, --savedir only, a store); neither is a file."""
    for flag in ("savedir", "logdir"):
        folder = getattr(options, flag)
        if "://" not in folder or folder.startswith("file://"):
            folder = Path(folder.removeprefix("file://"))
            need(not folder.exists() or folder.is_dir(), flag, folder, "is a file; name a folder")
    need(
        "://" not in options.logdir or options.logdir.startswith("file://"),
        "logdir",
        options.logdir,
        "TensorBoard writes to a local folder; sync it to the store yourself (see docs/scaling.md)",
    )


def _need(from_checkpoint: dict[str, str], overridable: bool = True):
    """The check that raises one ConfigError line naming the flag, the value, the fix and where it came from."""

    def need(ok: bool, flag: str, value, fix: str) -> None:
        if not ok:
            override = f"; pass --{flag} to override" if overridable else ""
            where = f" (from {from_checkpoint[flag]}{override})" if flag in from_checkpoint else ""
            raise ConfigError(f"--{flag} {value}: {fix}{where}")

    return need


def check_run_settings(
    model_config: BrainConfig,
    settings: TrainSettings,
    world_size: int = 1,
    from_checkpoint: dict[str, str] | None = None,
    overridable: bool = True,
) -> None:
    """The settings' checks, for training and every command reading a checkpoint (`overridable`: it has flags)."""
    need = _need(from_checkpoint or {}, overridable)
    values = {**model_config.to_dict(), **asdict(settings)}
    for flag in (
        "epochs",
        "image_size",
        "max_text_len",
        "d_shared",
        "brain_layers",
        "brain_heads",
        "scratch_text_width",
        "scratch_text_layers",
    ):
        need(values[flag] >= 1, flag, values[flag], "must be a positive integer")
    need(
        settings.batch_size >= 2,
        "batch_size",
        settings.batch_size,
        "must be at least 2 (contrastive pairs need negatives)",
    )
    need(
        settings.batch_size % world_size == 0,
        "batch_size",
        settings.batch_size,
        f"the global batch must divide by the {world_size} processes; use a multiple of {world_size}",
    )
    need(
        settings.accum_steps >= 1,
        "accum_steps",
        settings.accum_steps,
        "must be a positive integer (1: no accumulation)",
    )
    parts = world_size * settings.accum_steps
    need(
        settings.batch_size % parts == 0,
        "accum_steps",
        settings.accum_steps,
        f"--batch_size {settings.batch_size} must divide into {world_size} process(es) x {settings.accum_steps} "
        f"micro-batches; use a batch size that is a multiple of {parts}",
    )
    _check_optimisation(settings, values, need)
    _check_architecture(model_config, settings, need)
    _check_model_size(model_config, settings, need)


def _check_optimisation(settings: TrainSettings, values: dict, need) -> None:
    """The optimizer's settings: positive, finite, and what float32 holds."""
    need(settings.lr > 0 and math.isfinite(settings.lr), "lr", settings.lr, "must be a positive number such as 2e-4")
    need(0 < settings.min_lr_ratio <= 1, "min_lr_ratio", settings.min_lr_ratio, "must be in (0, 1]")
    for flag in ("weight_decay", "warmup_steps", "grad_clip", "save_every_steps", "keep_last"):
        value = getattr(settings, flag)
        need(value >= 0 and math.isfinite(value), flag, value, "must be a number >= 0")
    need(0 <= settings.seed <= MAX_SEED, "seed", settings.seed, f"must be in 0 .. {MAX_SEED}")
    for flag in FLOAT_SETTINGS:  # the optimizer and the model hold these as float32
        need(
            fits_float32(values[flag]),
            flag,
            values[flag],
            f"is out of the float32 range the optimizer computes in ({FLOAT32.tiny:.1e} to {FLOAT32.max:.1e}, or 0)",
        )


def _check_architecture(model_config: BrainConfig, settings: TrainSettings, need) -> None:
    """The model's own constraints: ranges, divisibility, the vocabulary, the precision."""
    need(0 <= model_config.dropout < 1, "dropout", model_config.dropout, "must be in [0, 1)")
    need(model_config.image_size >= 32, "image_size", model_config.image_size, "must be at least 32 pixels")
    need(
        model_config.d_shared % model_config.brain_heads == 0,
        "d_shared",
        model_config.d_shared,
        f"must be divisible by --brain_heads {model_config.brain_heads}",
    )
    width = model_config.scratch_text_width
    need(
        width < 64 or width % 64 == 0,
        "scratch_text_width",
        width,
        "must be below 64 or a multiple of 64 (one attention head per 64 channels)",
    )
    need(settings.vocab_size >= 100, "vocab_size", settings.vocab_size, "must be at least 100")
    need(
        settings.precision in ("auto",) + PRECISIONS,
        "precision",
        settings.precision,
        f"use one of {', '.join(PRECISIONS)}",
    )


def memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def model_bytes(model_config: BrainConfig, vocab_size: int) -> dict[str, int]:
    """Bytes of the weights, gradients and AdamW's two moments (16 a parameter) each size setting accounts for:
    the shared core's d_shared^2 terms, the scratch text encoder's width^2 and vocabulary, its position table."""
    d, width = model_config.d_shared, model_config.scratch_text_width
    scratch = model_config.text_encoder == "scratch"
    tokens = (model_config.image_size // 32) ** 2  # the image grid the core attends over
    parameters = {
        "d_shared": model_config.brain_layers * 12 * d * d + d * ((width if scratch else 1024) + 2048 + tokens),
        "scratch_text_width": model_config.scratch_text_layers * 12 * width * width + vocab_size * width,
        "max_text_len": max(model_config.max_text_len, 8) * width,
    }
    return {flag: 16 * count if scratch or flag == "d_shared" else 0 for flag, count in parameters.items()}


def _check_model_size(model_config: BrainConfig, settings: TrainSettings, need) -> None:
    """A model that cannot be allocated is refused at startup, naming the setting that makes it so large."""
    needed = model_bytes(model_config, settings.vocab_size)
    flag, total, available = max(needed, key=needed.get), sum(needed.values()), memory_bytes()
    need(
        total <= available,
        flag,
        getattr(model_config, flag),
        f"a model this size needs about {total / 2**30:,.0f} GiB for its weights, gradients and AdamW moments, "
        f"more than this machine's {available / 2**30:,.0f} GiB; use a smaller value",
    )


def _check_micro_batch(model_config: BrainConfig, settings: TrainSettings, world_size: int, need) -> None:
    """BatchNorm cannot train on one value per channel: a micro-batch of one image whose map is 1x1 somewhere."""
    per_process = settings.batch_size // world_size
    if settings.accum_steps == 1 or per_process // settings.accum_steps >= 2:
        return
    if _batchnorm_values_per_image(model_config) == 1:
        largest = max(
            steps for steps in range(1, per_process + 1) if per_process % steps == 0 and per_process // steps >= 2
        )
        need(
            False,
            "accum_steps",
            settings.accum_steps,
            f"micro-batches of 1 per process, and a BatchNorm in --image_encoder {model_config.image_encoder} "
            f"sees a 1x1 map at --image_size {model_config.image_size}, which it cannot train on; the smallest "
            f"micro-batch it accepts is 2: use --accum_steps {largest} or a larger --batch_size",
        )


def _batchnorm_values_per_image(model_config: BrainConfig) -> int | None:
    """The fewest values per channel a BatchNorm of the encoder sees for one image (None: it has no BatchNorm, or
    cannot take this image size, which building the model then says)."""
    classifier = torchvision.models.get_model(model_config.image_encoder, weights=None).eval()
    seen: list[int] = []
    for module in classifier.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.register_forward_hook(lambda _, inputs, __: seen.append(inputs[0][0, 0].numel()))
    try:
        with torch.no_grad():
            classifier(torch.zeros(1, 3, model_config.image_size, model_config.image_size))
    except (RuntimeError, AssertionError, ValueError):
        return None
    return min(seen, default=None)


def fits_float32(value: float) -> bool:
    """True when float32 holds `value`: finite there, and not flushed to 0 unless it is 0."""
    held = float(torch.tensor(value, dtype=torch.float32))
    return math.isfinite(held) and (held != 0 or value == 0)


def _check_image_encoder(model_config: BrainConfig, need) -> None:
    models = torchvision.models.list_models(module=torchvision.models)
    need(
        model_config.image_encoder in models,
        "image_encoder",
        model_config.image_encoder,
        "not a torchvision classification model; try resnet50, resnet18 or convnext_tiny",
    )
    weights = model_config.image_weights
    if is_weights_file(weights):
        need(Path(weights).is_file(), "image_weights", weights, "no such file; give a torchvision weights file or none")
    elif weights not in ("DEFAULT", "none"):
        known = [w.name for w in torchvision.models.get_model_weights(model_config.image_encoder)]
        need(
            weights.split(".")[-1] in known,
            "image_weights",
            weights,
            f"use DEFAULT, none, a local .pth file or one of {', '.join(known)}",
        )


def _check_data_options(options: RunOptions, need) -> None:
    annotations = options.annotations
    need(
        annotations in ANNOTATIONS or Path(annotations).is_file(),
        "annotations",
        annotations,
        f"no such file; give auto, a layout ({', '.join(LAYOUTS)}) or an annotation file",
    )
    for flag in ("val_fraction", "test_fraction"):
        value = getattr(options, flag)
        need(value is None or 0 < value < 0.5, flag, value, "must be a fraction of the images in (0, 0.5)")
    need(options.folds >= 1, "folds", options.folds, "must be a positive integer (1: the whole split only)")


def _check_shard_options(options: RunOptions, need) -> None:
    need(
        options.val_shards is None or options.train_shards is not None,
        "val_shards",
        options.val_shards,
        "needs --train_shards (validation from shards goes with training from shards)",
    )
    for flag in ("train_shards", "val_shards"):
        value = getattr(options, flag)
        need(
            value is None or value.strip(), flag, repr(value), "give a shard pattern such as 'data/{00000..00099}.tar'"
        )
    need(
        options.shard_cache_gb >= 0 and math.isfinite(options.shard_cache_gb),
        "shard_cache_gb",
        options.shard_cache_gb,
        "must be a number of GB >= 0 (0: no cache, ranged reads)",
    )
    need(
        not (options.train_shards and options.eval_only and options.eval_split == "test" and options.root_dir is None),
        "eval_split",
        "test",
        "the test split comes from --root_dir; give it (shards hold train and val only)",
    )
