"""Write a small, learnable Flickr8k look-alike in any layout the trainer reads (and as Flickr30k and COCO).

Each image is a drawn scene (a background colour, one to three shapes of one colour, grouped at
one position) and its five captions describe exactly that scene in varied wording, so a small
model can learn the pairing and retrieval clearly beats chance. The demo and the tests use it.

    brain-trainer sample-data data/flickr8k_sample --layout token --images 600 --val 100 --test 50
    brain-trainer sample-data data/coco_sample --layout karpathy-coco
    brain-trainer sample-data data/my_images --layout imagefolder
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from brain_trainer.data.layouts import annotation_files_in
from brain_trainer.data.layouts.flickr8k import SPLIT_FILES
from brain_trainer.safe_files import describe, write_bytes

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
SHAPE_SYNONYMS = {
    "circle": ("circle", "round disc", "dot"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "triangle", "wedge"),
}
POSITIONS = ("left", "right", "top", "bottom", "center")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
TEMPLATES = (
    "{count_word} {colour} {shape} on a {background} background",
    "A {background} picture with {count_word} {colour} {shape} at the {position}",
    "There {be} {count_word} {colour} {shape} in the {position} of the image",
    "{count_word} {shape} coloured {colour} toward the {position} of a {background} scene",
    "A drawing of {count_word} {colour} {shape} placed at the {position}",
    "{colour} {shape} , {count_word} of them , on {background} at the {position}",
    "The {position} of this {background} image holds {count_word} {colour} {shape}",
    "Simple art : {count_word} {colour} {shape} over a {background} backdrop",
)


@dataclass(frozen=True)
class Scene:
    background: str
    colour: str
    shape: str
    count: int
    position: str


def random_scene(rng: random.Random) -> Scene:
    return Scene(
        rng.choice(sorted(BACKGROUNDS)),
        rng.choice(sorted(COLOURS)),
        rng.choice(SHAPES),
        rng.randint(1, 3),
        rng.choice(POSITIONS),
    )


def draw_scene(scene: Scene, size: tuple[int, int], rng: random.Random) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    # The group's centre sits in the named region; shapes spread around it without overlapping much.
    cx, cy = {
        "left": (0.25, 0.5),
        "right": (0.75, 0.5),
        "top": (0.5, 0.25),
        "bottom": (0.5, 0.75),
        "center": (0.5, 0.5),
    }[scene.position]
    radius = min(width, height) * rng.uniform(0.09, 0.12)
    offsets = {1: [(0, 0)], 2: [(-1.1, 0), (1.1, 0)], 3: [(-1.2, 0.6), (1.2, 0.6), (0, -1.0)]}[scene.count]
    if scene.position in ("left", "right"):
        offsets = [(dy, dx) for dx, dy in offsets]  # stack vertically in a side third
    for dx, dy in offsets:
        x = cx * width + dx * radius * 1.2 + rng.uniform(-3, 3)
        y = cy * height + dy * radius * 1.2 + rng.uniform(-3, 3)
        box = (x - radius, y - radius, x + radius, y + radius)
        fill = COLOURS[scene.colour]
        if scene.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif scene.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=fill)
    return image


def captions_for(scene: Scene, rng: random.Random) -> list[str]:
    templates = rng.sample(TEMPLATES, 5)
    captions = []
    for template in templates:
        shape = rng.choice(SHAPE_SYNONYMS[scene.shape])
        if scene.count > 1:
            shape = shape.replace("box", "boxe") + "s"
        text = template.format(
            count_word=COUNT_WORDS[scene.count],
            colour=scene.colour,
            shape=shape,
            background=scene.background,
            position=scene.position,
            be="is" if scene.count == 1 else "are",
        )
        captions.append(text[0].upper() + text[1:] + " .")
    return captions


def write_sample_dataset(
    root: Path,
    layout: str = "token",
    images: int = 600,
    val: int = 100,
    test: int = 50,
    size: tuple[int, int] = (320, 240),
    seed: int = 0,
) -> Path:
    """Write `images` scenes (the last `val` + `test` of them held out) in `layout` under `root`."""
    if layout not in WRITERS:
        raise ValueError(f"--layout {layout}: use one of {', '.join(WRITERS)}")
    if val + test >= images:
        raise ValueError(f"--val {val} + --test {test} must leave training images out of --images {images}")
    rng = random.Random(seed)
    scenes = []
    for index in range(images):
        scene = random_scene(rng)
        name = f"{1000000 + index * 7919}_{rng.getrandbits(40):010x}.jpg"
        jpeg = io.BytesIO()  # compressed in memory (a few kB each) until the writer says in which folder
        draw_scene(scene, size, rng).save(jpeg, format="JPEG", quality=90)
        scenes.append((name, jpeg.getvalue(), captions_for(scene, rng)))
    names = [name for name, _, _ in scenes]
    splits = {
        "train": names[: images - val - test],
        "val": names[images - val - test : images - test],
        "test": names[images - test :],
    }
    folder_of = WRITERS[layout](root, splits, {name: captions for name, _, captions in scenes})
    for name, picture, _ in scenes:
        path = root / folder_of(name) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(path, picture)
    return root


def _split_of(splits: dict[str, list[str]]) -> dict[str, str]:
    return {name: split for split, members in splits.items() for name in members}


def _write_token(root: Path, splits: dict, captions: dict) -> Callable[[str], str]:
    text_dir = root / "Flickr8k_text"
    text_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"{name}#{k}\t{caption}" for name in captions for k, caption in enumerate(captions[name])]
    write_bytes(text_dir / "Flickr8k.token.txt", ("\n".join(lines) + "\n").encode())
    for split, file_name in SPLIT_FILES.items():
        write_bytes(text_dir / file_name, ("\n".join(splits[split]) + "\n").encode())
    return lambda name: "Flicker8k_Dataset"


def _karpathy_writer(file_name: str, image_dir: str) -> Callable:
    """Karpathy's JSON; for COCO, `filepath` folders (train2014, val2014) and every other training image as
    `restval` (from val2014), as in Karpathy's COCO split."""
    coco = file_name == "dataset_coco.json"

    def write(root: Path, splits: dict, captions: dict) -> Callable[[str], str]:
        split_of = {name: split for name, split in _split_of(splits).items()}
        if coco:
            split_of.update({name: "restval" for name in splits["train"][1::2]})
        folder_of = {
            name: ("train2014" if split_of[name] == "train" else "val2014") if coco else image_dir for name in captions
        }
        entries = [
            {
                **({"filepath": folder_of[name]} if coco else {}),
                "filename": name,
                "split": split_of[name],
                "sentences": [{"raw": caption, "tokens": caption.lower().split()} for caption in captions[name]],
            }
            for name in captions
        ]
        root.mkdir(parents=True, exist_ok=True)
        write_bytes(root / file_name, json.dumps({"images": entries, "dataset": file_name[8:-5]}).encode())
        return folder_of.__getitem__

    return write


def _write_kaggle(root: Path, splits: dict, captions: dict) -> Callable[[str], str]:
    """One CSV, no split lists (the loader derives the split by image)."""
    root.mkdir(parents=True, exist_ok=True)
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["image", "caption"])
    for name in captions:
        writer.writerows([name, caption] for caption in captions[name])
    write_bytes(root / "captions.txt", table.getvalue().encode())
    return lambda name: "Images"


def _write_imagefolder(root: Path, splits: dict, captions: dict) -> Callable[[str], str]:
    """metadata.jsonl, one row per image: file_name (under images/), its captions as a list, its split."""
    root.mkdir(parents=True, exist_ok=True)
    split_of = _split_of(splits)
    rows = [
        {"file_name": f"images/{name}", "captions": captions[name], "split": IMAGEFOLDER_SPLITS[split_of[name]]}
        for name in captions
    ]
    write_bytes(root / "metadata.jsonl", "".join(json.dumps(row) + "\n" for row in rows).encode())
    return lambda name: "images"


IMAGEFOLDER_SPLITS = {"train": "train", "val": "validation", "test": "test"}
WRITERS = {
    "token": _write_token,
    "karpathy": _karpathy_writer("dataset_flickr8k.json", "Images"),
    "kaggle": _write_kaggle,
    "imagefolder": _write_imagefolder,
    "karpathy-flickr30k": _karpathy_writer("dataset_flickr30k.json", "flickr30k-images"),
    "karpathy-coco": _karpathy_writer("dataset_coco.json", ""),
}
SAMPLE_LAYOUTS = tuple(WRITERS)  # a layout of the registry (LAYOUTS), or LAYOUT-SHAPE: that layout shaped as a data set
SHARDS_LAYOUT = "webdataset"  # train and val shards as img2dataset writes them (shards_sample.py)


def check_size(width: int, height: int) -> None:
    """An image size this machine can draw (a few copies of width x height x 3 bytes), before anything is written."""
    if width < 1 or height < 1:
        raise ValueError(f"--size {width}x{height}: both sides must be at least 1 pixel")
    need, memory = 4 * width * height * 3, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > memory:
        raise ValueError(
            f"--size {width}x{height}: drawing one image needs about {need / 2**30:.0f} GiB, more than this "
            f"machine's {memory / 2**30:.0f} GiB; choose a smaller size (the default is 320x240)"
        )


def main(argv: list[str] | None = None, prog: str = "brain-trainer sample-data") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", type=Path, help="folder to write the data set into (created if absent)")
    parser.add_argument(
        "--layout",
        choices=(*SAMPLE_LAYOUTS, SHARDS_LAYOUT),
        default="token",
        help="the annotation layout to write: a layout the trainer reads, or karpathy-flickr30k / karpathy-coco "
        "(Karpathy's JSON named and shaped as for Flickr30k / COCO), or webdataset: train and val tar shards "
        "for --train_shards/--val_shards (default: token)",
    )
    parser.add_argument("--images", type=int, default=600, help="how many images to draw (default: 600)")
    parser.add_argument("--val", type=int, default=100, help="of them, held out for validation (default: 100)")
    parser.add_argument(
        "--test",
        type=int,
        default=50,
        help="of them, held out for testing (default: 50; webdataset writes no test shard: they join train)",
    )
    parser.add_argument("--size", default="320x240", help="image size WIDTHxHEIGHT in pixels (default: 320x240)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn scenes and captions (default: 0)")
    parser.add_argument(
        "--overwrite", action="store_true", help="write into a folder that already holds annotation files"
    )
    args = parser.parse_args(argv)
    found = annotation_files_in(args.root)
    if found and not args.overwrite:
        print(
            f"Error: {args.root} already holds {', '.join(path.name for path in found)}; pass --overwrite to "
            f"replace them, or name another folder",
            file=sys.stderr,
        )
        return 2
    if args.layout == SHARDS_LAYOUT:
        return _write_shards(args)
    try:
        width, height = (int(part) for part in args.size.lower().split("x"))
        check_size(width, height)
        write_sample_dataset(args.root, args.layout, args.images, args.val, args.test, (width, height), args.seed)
    except ValueError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk, a file in the way: each file is whole or absent
        print(f"Error: sample-data {describe(error, error.filename or args.root)}", file=sys.stderr)
        return 2
    print(f"Wrote {args.images} images ({args.layout} layout) to {args.root}")
    return 0


def _write_shards(args: argparse.Namespace) -> int:
    from brain_trainer.data.shards_sample import write_sample_shards

    try:
        width, height = (int(part) for part in args.size.lower().split("x"))
        train, val = write_sample_shards(args.root, args.images, args.val, size=(width, height), seed=args.seed)
    except ValueError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    print(f"Wrote {args.images} images as shards to {args.root}: --train_shards '{train}' --val_shards '{val}'")
    return 0
