"""Flickr8k on disk: the three public layouts, splits, images, tokenised batches, the resumable
sampler and the decode-once image cache.

Randomness here is a function, not a stream: the order of epoch e is drawn from (seed, e) and the
augmentation of sample i in epoch e from (seed, e, i), so neither depends on worker count, on the
global RNG or on where a run was resumed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2
from tqdm import tqdm

from brain_trainer.data.augment import TrainAugment, eval_transform
from brain_trainer.runtime.seeding import derive_seed  # its home is the runtime; still importable from here

SPLITS = ("train", "val", "test")
LAYOUTS = ("token", "karpathy", "kaggle")
IMAGE_DIRS = ("Flicker8k_Dataset", "Images")
TEXT_DIRS = (".", "Flickr8k_text")
TOKEN_FILE = "Flickr8k.token.txt"
SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
KARPATHY_FILE = "dataset_flickr8k.json"
KAGGLE_FILE = "captions.txt"
KAGGLE_HELD_OUT = 1000  # val and test images each, on the full 8,091-image set; proportional below
FULL_SET_IMAGES = 8091
WHERE_TO_GET = (
    "get Flickr8k from its distributors (the Kaggle copy 'adityajn105/flickr8k' has Images/ and "
    "captions.txt), or write a small sample set with `brain-trainer sample-data data/flickr8k_sample`"
)
CACHE_FORMAT = 2
TOKEN_LINE = re.compile(r"^(?P<file>.+?)#(?P<k>\d+)\s+(?P<caption>.*)$")


class DatasetError(Exception):
    """A user mistake with the data (missing folder, no layout, bad annotation file): one line."""


# ----------------------------------------------------------------------------- layouts and splits


@dataclass
class Layout:
    kind: str  # one of LAYOUTS
    image_dir: Path
    annotation_files: dict[str, Path]


@dataclass
class Split:
    """The samples of one split: caption i belongs to image `caption_image[i]` of `images`."""

    name: str
    image_dir: Path
    images: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    caption_image: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions)

    def image_paths(self) -> list[Path]:
        return [self.image_dir / name for name in self.images]

    def fingerprint(self) -> dict:
        """Sample count and a hash of (image name, caption) pairs: tells whether a resume sees the same data."""
        digest = hashlib.sha256()
        for caption, image in zip(self.captions, self.caption_image):
            digest.update(f"{self.images[image]}\t{caption}\n".encode())
        return {"samples": len(self), "sha256": digest.hexdigest()[:16]}


def _find_first(root: Path, folders: tuple[str, ...], name: str) -> Path | None:
    return next((root / folder / name for folder in folders if (root / folder / name).is_file()), None)


def detect_layout(root: Path, annotations: str = "auto") -> Layout:
    """Find the layout of `root` (or check the one named): original token files, Karpathy JSON or Kaggle CSV."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"--root_dir {root}: no such folder; {WHERE_TO_GET}")
    image_dir = next((root / name for name in IMAGE_DIRS if (root / name).is_dir()), None)
    found = {
        "token": _find_first(root, TEXT_DIRS, TOKEN_FILE),
        "karpathy": _find_first(root, (".",), KARPATHY_FILE),
        "kaggle": _find_first(root, (".",), KAGGLE_FILE),
    }
    kinds = [annotations] if annotations != "auto" else [kind for kind in LAYOUTS if found[kind]]
    looked_for = (
        f"{TOKEN_FILE} (in {root} or {root / 'Flickr8k_text'}), {KARPATHY_FILE} or {KAGGLE_FILE}, "
        f"and an image folder {' or '.join(IMAGE_DIRS)}"
    )
    if not kinds or not found[kinds[0]]:
        raise DatasetError(f"--root_dir {root}: no Flickr8k annotations found; looked for {looked_for}; {WHERE_TO_GET}")
    if image_dir is None:
        raise DatasetError(f"--root_dir {root}: no image folder ({' or '.join(IMAGE_DIRS)}); {WHERE_TO_GET}")
    kind = kinds[0]
    files = {"captions": found[kind]}
    if kind == "token":
        for split, name in SPLIT_FILES.items():
            path = _find_first(root, TEXT_DIRS, name)
            if path is None:
                raise DatasetError(
                    f"--root_dir {root}: {name} not found beside {found[kind]}; "
                    f"the original release ships the three split lists with {TOKEN_FILE}"
                )
            files[split] = path
    return Layout(kind, image_dir, files)


def read_text(path: Path) -> str:
    """The file as text; utf-8-sig drops a BOM. A byte that is not UTF-8 is one line naming the file and offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DatasetError(
            f"{path}: byte {error.start} (0x{data[error.start]:02x}) is not UTF-8 ({error.reason}); "
            f"re-save the file as UTF-8"
        ) from None


def _read_lines(path: Path) -> list[str]:
    # splitlines() takes CRLF and LF alike; blank lines are not data.
    return [line.strip() for line in read_text(path).splitlines() if line.strip()]


def _parse_token_layout(layout: Layout) -> tuple[dict[str, list[str]], dict[str, list[str]], Counter]:
    captions: dict[str, list[str]] = {}
    skipped = Counter()
    for line in _read_lines(layout.annotation_files["captions"]):
        match = TOKEN_LINE.match(line)
        if match is None or not match["caption"].strip():
            skipped["unparseable caption lines"] += 1
            continue
        # The key is the whole file name before '#': '2258277193_586949ec62.jpg.1' stays its own key.
        captions.setdefault(match["file"].strip(), []).append(match["caption"].strip())
    split_images = {split: list(dict.fromkeys(_read_lines(layout.annotation_files[split]))) for split in SPLITS}
    return captions, split_images, skipped


def _karpathy_entry(entry) -> tuple[str, str, list[str]]:
    """(file name, split, captions) of one images[] entry; ValueError saying what is wrong with it."""
    if not isinstance(entry, dict):
        raise ValueError(f"is {type(entry).__name__}, not an object")
    for key, kind in (("filename", str), ("split", str), ("sentences", list)):
        if not isinstance(entry.get(key), kind):
            raise ValueError(f"'{key}' is {entry.get(key)!r:.40}, not a {kind.__name__}")
    raws = [sentence.get("raw") if isinstance(sentence, dict) else None for sentence in entry["sentences"]]
    if not all(isinstance(raw, str) for raw in raws):
        raise ValueError(f"a sentence's 'raw' is {next(r for r in raws if not isinstance(r, str))!r:.40}, not a str")
    # Karpathy's splits for COCO also have 'restval', which is training data.
    split = {"restval": "train"}.get(entry["split"], entry["split"])
    return entry["filename"], split, [raw.strip() for raw in raws if raw.strip()]


def _parse_karpathy_layout(layout: Layout) -> tuple[dict[str, list[str]], dict[str, list[str]], Counter]:
    """A malformed images[] entry is skipped into the summary warning, the first one named."""
    path = layout.annotation_files["captions"]
    try:
        entries = json.loads(read_text(path))["images"]
        if not isinstance(entries, list):
            raise TypeError(f"'images' is a {type(entries).__name__}, not a list")
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DatasetError(
            f"{path}: not a Karpathy split file (images[].filename, .split, .sentences[].raw): {error}"
        ) from None
    captions, split_of, skipped, first_bad = {}, {}, Counter(), None
    for position, entry in enumerate(entries):
        try:
            name, split, entry_captions = _karpathy_entry(entry)
        except ValueError as error:
            first_bad = first_bad or f"images[{position}]: {error}"
            skipped["malformed entries"] += 1
            continue
        captions[name], split_of[name] = entry_captions, split
    if first_bad:
        skipped[f"malformed entries (first: {first_bad})"] = skipped.pop("malformed entries")
    split_images = {split: [name for name in captions if split_of[name] == split] for split in SPLITS}
    return captions, split_images, skipped


def kaggle_split(images: list[str]) -> dict[str, list[str]]:
    """Deterministic split by image: order by a hash of the name, hold out val then test (1,000 each on the
    full set, proportionally fewer on smaller sets); the rest is train. An image lands in exactly one split."""
    ordered = sorted(images, key=lambda name: hashlib.sha256(name.encode()).hexdigest())
    held_out = max(1, round(KAGGLE_HELD_OUT * len(images) / FULL_SET_IMAGES)) if len(images) >= 3 else 0
    return {"val": ordered[:held_out], "test": ordered[held_out : 2 * held_out], "train": ordered[2 * held_out :]}


def _parse_kaggle_layout(layout: Layout) -> tuple[dict[str, list[str]], dict[str, list[str]], Counter]:
    path = layout.annotation_files["captions"]
    captions: dict[str, list[str]] = {}
    skipped = Counter()
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    header = [column.strip().lower() for column in next(reader, [])]
    if header[:2] != ["image", "caption"]:
        raise DatasetError(f"{path}: expected a CSV header 'image,caption', found {','.join(header)!r}")
    for row in reader:
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            skipped["unparseable caption lines"] += int(any(cell.strip() for cell in row))
            continue
        captions.setdefault(row[0].strip(), []).append(",".join(row[1:]).strip())
    return captions, kaggle_split(list(captions)), skipped


PARSERS = {"token": _parse_token_layout, "karpathy": _parse_karpathy_layout, "kaggle": _parse_kaggle_layout}


def load_splits(root: Path, annotations: str = "auto") -> dict[str, Split]:
    """Parse `root` into train/val/test splits of (image, caption) samples, skipping what cannot be used.

    The image list comes from the annotations, never from a folder glob (so `__MACOSX/._x.jpg` forks and
    stray files are never samples). Skipped entries are summed up in one warning.
    """
    layout = detect_layout(root, annotations)
    captions, split_images, skipped = PARSERS[layout.kind](layout)
    splits = {name: Split(name, layout.image_dir) for name in SPLITS}
    in_a_split = set()
    for name in SPLITS:
        split = splits[name]
        for image in split_images[name]:
            in_a_split.add(image)
            if image not in captions:
                skipped["split-list images without captions"] += 1
            elif not (layout.image_dir / image).is_file():
                skipped["images missing from the image folder"] += 1
            else:
                split.images.append(image)
                for caption in captions[image]:
                    split.captions.append(caption)
                    split.caption_image.append(len(split.images) - 1)
    unsplit = [image for image in captions if image not in in_a_split]
    if unsplit:
        skipped["captioned images in no split list (not used)"] += len(unsplit)
    if skipped:
        details = ", ".join(f"{count} {what}" for what, count in sorted(skipped.items()))
        warnings.warn(f"{layout.annotation_files['captions']}: skipped {details}", stacklevel=2)
    if not splits["train"].captions:
        raise DatasetError(
            f"--root_dir {root}: the train split has no usable samples "
            f"(no listed image with captions was found in {layout.image_dir})"
        )
    return splits


# ----------------------------------------------------------------------------- images


class ImageSource(Protocol):
    def load(self, image_index: int) -> torch.Tensor:
        """The image as a uint8 (3, H, W) tensor; raises OSError or ValueError when it cannot be read."""


def decode_image(path: Path, shorter_side: int | None = None) -> torch.Tensor:
    """Decode a file to uint8 RGB (3, H, W), optionally resized so its shorter side is `shorter_side`.

    Raises OSError for every file that cannot be an image of the set, a decompression bomb (a small file that
    claims more pixels than PIL's limit) included, so every reader substitutes it like any unreadable image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _decode(path, shorter_side)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise OSError(f"{path.name}: {error}") from None


def _decode(path: Path, shorter_side: int | None) -> torch.Tensor:
    with Image.open(path) as image:
        if shorter_side is not None:
            image.draft("RGB", (shorter_side, shorter_side))  # JPEG DCT scaling: decode at >= the size we keep
        # Cameras store rotation as an EXIF tag: turn the pixels upright, as every viewer shows them.
        pixels = v2.functional.to_image(ImageOps.exif_transpose(image).convert("RGB"))
    if shorter_side is not None:
        pixels = v2.functional.resize(pixels, [shorter_side], antialias=True)
    return pixels


class JpegImages:
    """Decodes each image from its file on every access."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def load(self, image_index: int) -> torch.Tensor:
        return decode_image(self.paths[image_index])


class CachedImages:
    """Decoded uint8 pixels in one memory-mapped file, shared by all loader workers through the page cache."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.index = np.load(folder / "index.npy")  # (N, 3): byte offset, height, width; height 0 = unreadable
        self.names = json.loads((folder / "meta.json").read_text())["images"]
        self._pixels: np.memmap | None = None  # opened lazily, so each worker process maps it itself

    def load(self, image_index: int) -> torch.Tensor:
        if self._pixels is None:
            self._pixels = np.memmap(self.folder / "pixels.u8", dtype=np.uint8, mode="r")
        offset, height, width = (int(v) for v in self.index[image_index])
        if height == 0:
            raise OSError(f"{self.names[image_index]} could not be decoded when the cache was built")
        hwc = self._pixels[offset : offset + height * width * 3].reshape(height, width, 3)
        return torch.from_numpy(np.array(hwc)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W), a private copy


class _DecodeForCache(Dataset):
    def __init__(self, paths: list[Path], shorter_side: int):
        self.paths, self.shorter_side = paths, shorter_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor | None:
        try:
            return decode_image(self.paths[index], self.shorter_side).permute(1, 2, 0).contiguous()  # (H, W, 3)
        except (OSError, ValueError, SyntaxError):
            return None


def cache_key(paths: list[Path], shorter_side: int) -> str:
    digest = hashlib.sha256(f"format={CACHE_FORMAT} side={shorter_side}\n".encode())
    for path in paths:
        stat = path.stat() if path.exists() else None  # a replaced file has a new mtime, even at the same size
        digest.update(f"{path.name}\t{stat.st_size if stat else -1}\t{stat.st_mtime_ns if stat else -1}\n".encode())
    return digest.hexdigest()[:16]


class Interrupted(Exception):
    """A stop signal arrived while the image cache was being built: nothing to save."""


def build_image_cache(
    paths: list[Path],
    shorter_side: int,
    cache_dir: Path,
    num_workers: int = 0,
    progress: bool = True,
    should_stop=lambda: False,
) -> CachedImages:
    """Return the cache of `paths` at `shorter_side`, building it first if no complete one exists.

    The folder name is a hash of the cache format, the size and the image list (names and file sizes), so
    a change of any of them builds a new cache. It is built under a temporary name and renamed into place
    when complete, so a half-built cache is never found. Raises OSError when it cannot be written, and
    Interrupted (leaving no partial cache) when `should_stop()` turns true.
    """
    final = Path(cache_dir) / f"images_{shorter_side}px_{cache_key(paths, shorter_side)}"
    if (final / "meta.json").is_file():
        return CachedImages(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    building = final.parent / f".{final.name}.tmp-{os.getpid()}"
    building.mkdir()
    try:
        index = np.zeros((len(paths), 3), dtype=np.int64)
        offset = 0
        # Its own generator: an iterator would otherwise draw from the global torch RNG, and only on the run that
        # builds the cache, so two runs of one command would no longer match bit for bit.
        loader = DataLoader(
            _DecodeForCache(paths, shorter_side),
            batch_size=None,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(0),
        )
        with open(building / "pixels.u8", "wb") as pixels_file:
            for image_index, pixels in enumerate(
                tqdm(loader, desc=f"Caching images at {shorter_side}px", disable=not progress, unit="img")
            ):
                if should_stop():
                    raise Interrupted("the image cache build")
                if pixels is not None:
                    pixels_file.write(pixels.numpy().tobytes())
                    index[image_index] = (offset, pixels.shape[0], pixels.shape[1])
                    offset += pixels.numel()
            pixels_file.flush()
            os.fsync(pixels_file.fileno())
        np.save(building / "index.npy", index)
        (building / "meta.json").write_text(
            json.dumps({"format": CACHE_FORMAT, "shorter_side": shorter_side, "images": [path.name for path in paths]})
        )
        if final.exists():  # another process finished the same cache first
            shutil.rmtree(building)
        else:
            os.rename(building, final)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return CachedImages(final)


class Flickr8kDataset(Dataset):
    """Training samples of one split. A key is (epoch, index) from `ResumableSampler` (or a bare index, for
    epoch 0): the augmentation of sample i in epoch e is seeded by (seed, e, i) alone.

    An image that cannot be read is replaced by the next readable sample (image and caption together), and
    the sample reports the file in `bad_files`, so the trainer can warn once and count it.
    """

    def __init__(self, split: Split, images: ImageSource, augment: TrainAugment, seed: int = 0):
        self.split, self.images, self.augment, self.seed = split, images, augment, seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        bad_files = []
        for candidate in range(index, index + len(self)):
            sample = candidate % len(self)
            image_index = self.split.caption_image[sample]
            if self.split.images[image_index] in bad_files:
                continue  # the same unreadable image under its next caption
            try:
                pixels = self.images.load(image_index)
                break
            except (OSError, ValueError, SyntaxError):
                bad_files.append(self.split.images[image_index])
        else:
            raise DatasetError(f"{self.split.image_dir}: no image of the {self.split.name} split can be read")
        return {
            "image": self.augment(pixels, derive_seed(self.seed, epoch, index)),
            "caption": self.split.captions[sample],
            "bad_files": bad_files,
        }


class UniqueImages(Dataset):
    """Each image of a split once, resized and centre-cropped (for retrieval over unique images)."""

    def __init__(self, split: Split, images: ImageSource, size: int):
        self.split, self.images, self.transform = split, images, eval_transform(size)

    def __len__(self) -> int:
        return len(self.split.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool]:
        """(pixels, readable): an unreadable image is scored as black, and counted by the evaluation."""
        try:
            return self.transform(self.images.load(index)), True
        except (OSError, ValueError, SyntaxError):
            return self.transform(torch.zeros(3, 8, 8, dtype=torch.uint8)), False


# ----------------------------------------------------------------------------- text


class CaptionCollator:
    """Stacks images and tokenises captions, padded to the longest in the batch and cut at `max_text_len`."""

    def __init__(self, tokenizer, max_text_len: int):
        self.tokenizer, self.max_text_len = tokenizer, max_text_len

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(
            captions, padding="longest", truncation=True, max_length=self.max_text_len, return_tensors="pt"
        )
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    def __call__(self, samples: list[dict]) -> dict:
        # Augmented images are channels-last in memory: stacked as (H, W, 3) views the copy is plain (20x faster
        # than a strided one), and the batch comes out (B, 3, H, W) in channels-last memory, as CNNs prefer.
        images = torch.stack([s["image"].permute(1, 2, 0) for s in samples]).permute(0, 3, 1, 2)
        return {
            "images": images,
            **self.tokenize([s["caption"] for s in samples]),
            "bad_files": [name for s in samples for name in s["bad_files"]],
        }


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def train_caption_tokenizer(captions: list[str], vocab_size: int = 4000):
    """A WordPiece tokenizer for `--text_encoder scratch`, built from `captions` deterministically.

    The `tokenizers` WordPiece trainer is not deterministic: where the vocabulary limit cuts through
    merges of equal frequency, it learns different token sets on different runs (huggingface/tokenizers#1794),
    so two runs of one command could not be compared. Here the vocabulary is the special tokens, every
    character seen (as a word start and as a `##` continuation, so no word is ever [UNK]), then whole words
    by falling frequency, ties broken by spelling, up to `vocab_size`.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(
        word for caption in captions for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(caption))
    )
    characters = sorted({character for word in words for character in word})
    pieces = [*SPECIAL_TOKENS, *characters, *(f"##{c}" for c in characters)]
    known = set(pieces)
    by_frequency = [w for w, _ in sorted(words.items(), key=lambda item: (-item[1], item[0])) if w not in known]
    vocab = {token: index for index, token in enumerate([*pieces, *by_frequency][: max(vocab_size, len(pieces))])}
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer, tokenizer.pre_tokenizer, tokenizer.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return tokenizer_from_json(tokenizer.to_str())


def tokenizer_from_json(tokenizer_json: str):
    """The Hugging Face tokenizer for a scratch tokenizer saved as JSON (as checkpoints hold it)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json),
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        clean_up_tokenization_spaces=False,
    )  # said, so no version warns about its default


# ----------------------------------------------------------------------------- the resumable sampler


class ResumableSampler(Sampler[tuple[int, int]]):
    """Yields this process's (epoch, index) keys of one epoch, starting `samples_seen` samples into its order.

    The order of epoch e is a permutation drawn from (seed, e). Its whole state is (epoch, samples_seen),
    counted in samples over all processes, not in batches, so a resume with another batch size or world size
    starts at the right sample; skipped samples are never loaded. The rest of the order is cut into global
    batches of `global_batch` samples (a short last one is dropped), and process r takes slice r of each:
    gathered in rank order, the processes' rows are the one-process batch, row for row.
    """

    def __init__(self, num_samples: int, seed: int, global_batch: int, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} does not divide by {world_size} processes")
        self.num_samples, self.seed, self.global_batch = num_samples, seed, global_batch
        self.rank, self.local_batch = rank, global_batch // world_size
        self.epoch, self.samples_seen = 0, 0

    def set_position(self, epoch: int, samples_seen: int = 0) -> None:
        self.epoch, self.samples_seen = epoch, samples_seen

    def epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=generator)

    def steps_left(self) -> int:
        return max(0, self.num_samples - self.samples_seen) // self.global_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        remaining = self.epoch_order(self.epoch)[self.samples_seen :]
        for step in range(self.steps_left()):
            start = step * self.global_batch + self.rank * self.local_batch
            for index in remaining[start : start + self.local_batch].tolist():
                yield self.epoch, index

    def __len__(self) -> int:
        return self.steps_left() * self.local_batch
