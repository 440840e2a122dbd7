"""`load_brain`: a trained brain from a checkpoint file or an exported folder, in eval mode, with the
preprocessing and the tokenizer its evaluation uses, so embeddings made here are the evaluation's embeddings.

The evaluation decodes each image (through the decode-once cache when the run used it: JPEG draft decoding
at the shorter side `image_size`, then a resize), resizes its shorter side to `image_size`, takes the centre,
normalises on the device, and encodes under the run's autocast; `Brain` does exactly that.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2

from brain_trainer.brain_model import BrainConfig, BrainModel
from brain_trainer.checkpointing import CheckpointError, is_full_checkpoint, load_for_resume, model_weights
from brain_trainer.checkpointing.validate import check_settings_of
from brain_trainer.config import ConfigError
from brain_trainer.data.annotations import DatasetError
from brain_trainer.data.augment import eval_transform, images_to_device
from brain_trainer.data.images import decode_image
from brain_trainer.data.text import CaptionCollator, tokenizer_from_json
from brain_trainer.model_factory import build_model
from brain_trainer.runtime.precision import PRECISIONS, autocast

EXPORT_CONFIG, EXPORT_WEIGHTS, EXPORT_TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"
EXPORT_TOKENIZER_DIR = "tokenizer"  # a pretrained text encoder's tokenizer, as save_pretrained writes it
EXPORT_FORMAT = "brain-trainer-export"
ImageInput = str | Path | Image.Image | torch.Tensor  # what embed_images takes, each or as a list


class InferenceError(Exception):
    """A user mistake with a checkpoint, an index, a folder or a query: one line naming it and the fix."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Preprocess:
    """The evaluation's image preprocessing: an image -> uint8 (3, image_size, image_size)."""

    image_size: int
    decode_side: int | None  # the image cache's shorter side when the run evaluated through it, else None

    def load(self, path: Path) -> torch.Tensor:
        """Raises UnreadableImage when the file cannot be decoded."""
        return eval_transform(self.image_size)(decode_image(path, self.decode_side))

    def pixels(self, image: ImageInput) -> torch.Tensor:
        """A path (decoded as the evaluation decodes files), a PIL image, or uint8 pixels (3, H, W) or
        (B, 3, H, W) -> uint8 (3 or B x 3, image_size, image_size); pixels already that size pass unchanged."""
        if isinstance(image, (str, Path)):
            return self.load(Path(image))
        if isinstance(image, Image.Image):
            image = v2.functional.to_image(ImageOps.exif_transpose(image).convert("RGB"))
        if not (
            torch.is_tensor(image) and image.dtype == torch.uint8 and image.dim() in (3, 4) and image.shape[-3] == 3
        ):
            kind = f"a {image.dtype} tensor {tuple(image.shape)}" if torch.is_tensor(image) else type(image).__name__
            raise InferenceError(
                f"embed_images: got {kind}; pass file paths, PIL images or uint8 RGB pixels (3, H, W) or (B, 3, H, W)"
            )
        if self.decode_side is not None:  # the cache's resize, which a file gets in `load`
            image = v2.functional.resize(image, [self.decode_side], antialias=True)
        return eval_transform(self.image_size)(image)

    @classmethod
    def of_run(cls, config: dict) -> Preprocess:
        size = int(config["image_size"])
        return cls(size, size if config.get("cache_images", True) else None)


@dataclass
class Brain:
    """A trained brain in eval mode; `embed_images` and `embed_texts` return float32 L2-normalised rows."""

    model: BrainModel
    config: dict  # the run's settings (architecture and training), as the checkpoint holds them
    tokenizer: object
    tokenizer_json: str | None  # the scratch tokenizer, or None for a pretrained one
    checkpoint_sha256: str  # of the checkpoint file the weights come from (an export keeps its source's)
    source: Path
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess.of_run(self.config)

    @property
    def width(self) -> int:
        return self.model.config.d_shared

    @property
    def caption_batch(self) -> int:
        """Captions per forward pass: the evaluation's (4x the run's batch), so the padding is the same."""
        return 4 * int(self.config.get("batch_size", 8))

    def to(self, device: torch.device, precision: str = "auto") -> Brain:
        """On `device`, encoding under `precision` (auto: the run's, what its evaluation uses)."""
        precision = self.config.get("precision", "fp32") if precision == "auto" else precision
        if precision not in PRECISIONS:
            raise InferenceError(f"--precision {precision}: choose auto, {', '.join(PRECISIONS)}")
        model = self.model.to(device)
        if device.type == "cuda":
            model.image_encoder.to(memory_format=torch.channels_last)  # as the trainer prepares it
        return replace(self, model=model, device=device, precision=precision)

    def autocast(self):
        return autocast(self.precision, self.device)()

    @torch.no_grad()
    def embed_images(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """Images -> (B, d) float32 L2-normalised rows on the device, preprocessed as the evaluation does: file
        paths, PIL images or uint8 (3, H, W) tensors (one, or a list), or a uint8 (B, 3, H, W) batch
        (`preprocess_batch`'s output passes unchanged). Paths get the evaluation's pixels exactly; a PIL image of a
        JPEG misses the draft decoding a path gets when the run cached its images (its last digits differ).
        Raises OSError for a file that cannot be decoded, InferenceError for anything else."""
        images = images if isinstance(images, (list, tuple)) else [images]
        if not images:
            return torch.zeros(0, self.width, device=self.device)
        pixels = [self.preprocess.pixels(image) for image in images]
        pixels = torch.cat([one.reshape(-1, *one.shape[-3:]) for one in pixels])  # (3, S, S) and (B, 3, S, S) alike
        with self.autocast():
            return self.model.encode_image(images_to_device(pixels, self.device)).float()

    @torch.no_grad()
    def embed_texts(self, texts: str | list[str]) -> torch.Tensor:
        """A caption or a list of them -> (len, d) float32 on the device, tokenised as the evaluation tokenises them."""
        tokens = self.tokens(texts)
        with self.autocast():
            return self.model.encode_text(
                tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
            ).float()

    def tokens(self, texts: str | list[str]) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask (B, L) int64: padded to the longest, cut at the run's max_text_len."""
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(text, str) for text in texts):
            raise InferenceError(f"embed_texts: pass a caption or a list of captions (strings), not {texts!r:.60}")
        return CaptionCollator(self.tokenizer, int(self.model.config.max_text_len)).tokenize(texts)

    def preprocess_batch(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """File paths, PIL images or uint8 (3, H, W) tensors -> uint8 (B, 3, S, S), the evaluation's pixels."""
        return torch.stack([self.preprocess.pixels(image) for image in images])


def load_brain(source: str | Path, device: str | torch.device = "cpu", precision: str = "auto") -> Brain:
    """The brain in `source` (a checkpoint file, or a folder written by `brain-trainer export`) in eval mode.

    Raises InferenceError (or CheckpointError) with one line when `source` is not a brain.
    """
    path = Path(source)
    if path.is_dir() and (path / EXPORT_CONFIG).is_file():
        brain = _from_export(path)
    elif path.is_dir():
        raise InferenceError(
            f"{path}: a folder without {EXPORT_CONFIG}; pass a checkpoint file or a folder "
            f"written by brain-trainer export"
        )
    else:
        brain = _from_checkpoint(path)
    return brain.to(torch.device(device), precision)


def _from_checkpoint(path: Path) -> Brain:
    try:
        checkpoint = load_for_resume(path)
        check_settings_of(checkpoint, str(path))
    except CheckpointError as error:  # its lines name the trainer's flag; here the file came by --checkpoint
        raise InferenceError(str(error).replace("--resume", "--checkpoint")) from None
    config = checkpoint.get("config")
    if not is_full_checkpoint(checkpoint) or not isinstance(config, dict) or "d_shared" not in config:
        raise InferenceError(
            f"{path}: not a brain checkpoint (no run config naming the architecture); pass a "
            f"checkpoint written by brain-trainer train"
        )
    tokenizer_json = checkpoint.get("tokenizer")
    return _assemble(
        config=config,
        weights=model_weights(checkpoint, path),
        tokenizer_json=tokenizer_json,
        sha256=file_sha256(path),
        source=path,
    )


def _from_export(folder: Path) -> Brain:
    from safetensors.torch import load_file

    try:
        meta = json.loads((folder / EXPORT_CONFIG).read_text())
        assert meta["format"] == EXPORT_FORMAT
        config, sha256 = meta["config"], meta["checkpoint_sha256"]
        assert isinstance(config, dict) and isinstance(sha256, str)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise InferenceError(
            f"{folder / EXPORT_CONFIG}: not a brain-trainer export config; export the "
            f"checkpoint again (brain-trainer export)"
        ) from None
    weights_file, tokenizer_file = folder / EXPORT_WEIGHTS, folder / EXPORT_TOKENIZER
    if not weights_file.is_file():
        raise InferenceError(f"{folder}: no {EXPORT_WEIGHTS}; export with --format safetensors")
    tokenizer_json = tokenizer_file.read_text() if tokenizer_file.is_file() else None
    try:
        check_settings_of({"config": config}, str(folder / EXPORT_CONFIG))
        weights = load_file(weights_file)
    except CheckpointError as error:
        raise InferenceError(f"{error}; export the checkpoint again") from None
    except Exception as error:  # safetensors' SafetensorError: a truncated or foreign file
        raise InferenceError(
            f"{weights_file}: truncated or not a safetensors file ({_first_detail(error)}); export the checkpoint again"
        ) from None
    return _assemble(
        config=config,
        weights=weights,
        tokenizer_json=tokenizer_json,
        sha256=sha256,
        source=folder,
        tokenizer_dir=folder / EXPORT_TOKENIZER_DIR,
    )


def _first_detail(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[1] if len(lines) > 1 else lines[0] if lines else type(error).__name__)[:160]


def _tokenizer(model_config: BrainConfig, tokenizer_json: str | None, tokenizer_dir: Path | None):
    if model_config.text_encoder == "scratch":
        return tokenizer_from_json(tokenizer_json)
    from brain_trainer.data.text import pretrained_tokenizer

    named = str(tokenizer_dir) if tokenizer_dir is not None and tokenizer_dir.is_dir() else model_config.text_encoder
    return pretrained_tokenizer(named)


def _assemble(
    *,
    config: dict,
    weights: dict,
    tokenizer_json: str | None,
    sha256: str,
    source: Path,
    tokenizer_dir: Path | None = None,
) -> Brain:
    model_config = BrainConfig.from_dict(config)
    if model_config.text_encoder == "scratch" and not isinstance(tokenizer_json, str):
        raise InferenceError(f"{source}: a scratch-text brain without its tokenizer; use the checkpoint the run wrote")
    try:
        tokenizer = _tokenizer(model_config, tokenizer_json, tokenizer_dir)
    except (ConfigError, DatasetError, CheckpointError):
        raise
    except Exception as error:  # the tokenizers library raises a bare Exception for JSON it cannot read
        raise InferenceError(
            f"{source}: its tokenizer does not load ({_first_detail(error)}); export or train it again"
        ) from None
    tokenizer_json = tokenizer_json if model_config.text_encoder == "scratch" else None
    model = build_model(model_config, pretrained=False)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise InferenceError(
            f"{source}: its weights do not fit its own config ({_first_detail(error)}); "
            f"it is not a brain this program can load"
        ) from None
    return Brain(
        model=model.eval(),
        config=config,
        tokenizer=tokenizer,
        tokenizer_json=tokenizer_json,
        checkpoint_sha256=sha256,
        source=source,
    )
