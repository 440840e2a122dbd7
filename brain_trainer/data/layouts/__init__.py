"""The registry of annotation layouts, the one list of layout names the flags, the sample data and inference
read. A layout is one `LayoutSpec` entry in `LAYOUTS` and one reader (`path, root -> Captions`) in a module of
this package; detection, splitting, the skip summary and the split summary are shared (`load_splits`).

    token        Flickr8k's original release: Flickr8k.token.txt + three split lists
    karpathy     Karpathy's dataset_{flickr8k,flickr30k,coco}.json (COCO's filepath, restval as train)
    kaggle       the Kaggle Flickr8k copy: captions.txt (image,caption), hash split
    imagefolder  metadata.jsonl / metadata.csv beside your images (file_name, text, optional split)
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from brain_trainer.data.annotations import (
    HELD_OUT_FRACTION,
    SPLITS,
    Captions,
    DatasetError,
    Split,
    hash_split,
    read_text,
    skip_summary,
)
from brain_trainer.data.layouts import flickr8k, imagefolder, karpathy


@dataclass(frozen=True)
class LayoutSpec:
    files: tuple[str, ...]  # annotation file names, in the order they are looked for
    text_dirs: tuple[str, ...]  # folders under --root_dir where they are looked for
    image_dirs: tuple[str, ...]  # image folders under --root_dir, in order (unless the reader says where)
    read: Callable[[Path, Path], Captions]  # (annotation file, root) -> its captions
    is_file: Callable[[Path, str], bool]  # (path, text): a file of another name holds this layout
    split_lists: Callable[[Path, Path], dict[str, list[str]]] | None = None  # splits from files beside it


FLICKR_IMAGE_DIRS = ("Flicker8k_Dataset", "Images")
LAYOUTS: dict[str, LayoutSpec] = {  # detection tries them in this order
    "token": LayoutSpec(
        (flickr8k.TOKEN_FILE,),
        flickr8k.TEXT_DIRS,
        FLICKR_IMAGE_DIRS,
        flickr8k.read_token_file,
        lambda path, text: flickr8k.is_token_text(text),
        flickr8k.token_split_lists,
    ),
    "karpathy": LayoutSpec(
        karpathy.FILES,
        (".",),
        ("Images", "flickr30k-images", "Flicker8k_Dataset"),
        karpathy.read_karpathy_file,
        lambda path, text: path.suffix.lower() == ".json",
    ),
    "kaggle": LayoutSpec(
        (flickr8k.KAGGLE_FILE,),
        (".",),
        FLICKR_IMAGE_DIRS,
        flickr8k.read_kaggle_file,
        lambda path, text: flickr8k.is_kaggle_text(text),
    ),
    "imagefolder": LayoutSpec(
        imagefolder.FILES,
        (".",),
        (),
        imagefolder.read_metadata_file,
        lambda path, text: path.suffix.lower() in (".jsonl", ".csv"),
    ),
}
WHERE_TO_GET = (
    "get Flickr8k from its distributors (the Kaggle copy 'adityajn105/flickr8k' has Images/ and "
    "captions.txt), or write a small sample set with `brain-trainer sample-data data/flickr8k_sample`"
)


@dataclass
class Layout:
    kind: str  # a key of LAYOUTS
    root: Path
    image_dir: Path | None  # None: the annotation file says where the images are
    annotation_files: dict[str, Path]


def layout_of_file(path: Path) -> str | None:
    """The layout an annotation file holds, by its name, then by its content; None for none of them."""
    by_name = next((kind for kind, spec in LAYOUTS.items() if path.name in spec.files), None)
    if by_name:
        return by_name
    text = read_text(path)
    return next((kind for kind, spec in LAYOUTS.items() if spec.is_file(path, text)), None)


def _looked_for(root: Path) -> str:
    files = []
    for spec in LAYOUTS.values():
        folders = " or ".join(str(root / folder) for folder in spec.text_dirs)
        files += [f"{name} (in {folders})" if len(spec.text_dirs) > 1 else name for name in spec.files]
    return ", ".join(files[:-1]) + f" or {files[-1]}"


def detect_layout(root: Path, annotations: str = "auto") -> Layout:
    """The layout of `root`: the one named (a layout name or an annotation file), or the first found."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"--root_dir {root}: no such folder; {WHERE_TO_GET}")
    if annotations not in ("auto", *LAYOUTS):
        path = Path(annotations)
        kind = layout_of_file(path) if path.is_file() else None
        if kind is None:
            raise DatasetError(
                f"--annotations {annotations}: not an annotation file of a known layout ({', '.join(LAYOUTS)}); "
                f"name one of {', '.join(name for spec in LAYOUTS.values() for name in spec.files)}"
            )
        return _layout(kind, root, path)
    kinds = [annotations] if annotations != "auto" else list(LAYOUTS)
    for kind in kinds:
        spec = LAYOUTS[kind]
        found = [root / d / name for name in spec.files for d in spec.text_dirs if (root / d / name).is_file()]
        if found:
            return _layout(kind, root, found[0])
    raise DatasetError(f"--root_dir {root}: no annotations found; looked for {_looked_for(root)}; {WHERE_TO_GET}")


def _layout(kind: str, root: Path, path: Path) -> Layout:
    image_dir = next((root / name for name in LAYOUTS[kind].image_dirs if (root / name).is_dir()), None)
    return Layout(kind, root, image_dir, {"captions": path})


@dataclass(frozen=True)
class DataSource:
    """Where a run's data is and how it is split: what a checkpoint records so `eval` and a resume find it."""

    root_dir: Path
    annotations: str = "auto"  # auto, a layout name, or an annotation file
    val_fraction: float | None = None  # layouts without split lists: held-out fractions (None: the default)
    test_fraction: float | None = None

    def record(self) -> dict:
        named_file = self.annotations not in ("auto", *LAYOUTS)
        return {
            "root_dir": str(Path(self.root_dir).absolute()),
            "annotations": str(Path(self.annotations).absolute()) if named_file else self.annotations,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
        }


def load_splits(
    root: Path, annotations: str = "auto", *, val_fraction: float | None = None, test_fraction: float | None = None
) -> dict[str, Split]:
    """Parse `root` into train/val/test splits of (image, caption) samples, skipping what cannot be used."""
    return read_splits(DataSource(Path(root), annotations, val_fraction, test_fraction))[0]


def read_splits(source: DataSource) -> tuple[dict[str, Split], str]:
    """The splits and the one-line split summary. The image list comes from the annotations, never from a folder
    glob (so `__MACOSX/._x.jpg` forks and stray files are never samples). Skipped entries are summed up in one
    warning."""
    layout = detect_layout(source.root_dir, source.annotations)
    spec, path = LAYOUTS[layout.kind], layout.annotation_files["captions"]
    captions = spec.read(path, layout.root)
    image_dir = captions.image_dir or layout.image_dir
    if image_dir is None:
        raise DatasetError(
            f"--root_dir {layout.root}: no image folder ({' or '.join(spec.image_dirs)}) beside {path.name}; "
            f"{WHERE_TO_GET}"
        )
    if spec.split_lists is not None:
        split_images = spec.split_lists(path, layout.root)
    elif captions.split_of is not None:
        split_images = {name: [i for i in captions.by_image if captions.split_of.get(i) == name] for name in SPLITS}
    else:
        fractions = (source.val_fraction or HELD_OUT_FRACTION, source.test_fraction or HELD_OUT_FRACTION)
        split_images = hash_split(list(captions.by_image), *fractions)
    splits = _assemble(split_images, captions, image_dir)
    if line := skip_summary(path, captions.skipped):
        warnings.warn(line, stacklevel=3)
    if not splits["train"].captions:
        raise DatasetError(
            f"--root_dir {layout.root}: the train split has no usable samples "
            f"(no listed image with captions was found in {image_dir})"
        )
    counts = ", ".join(f"{name} {len(s.images)} images / {len(s)} captions" for name, s in splits.items())
    return splits, f"Data: {path} ({layout.kind} layout): {'; '.join([counts, *captions.notes])}"


def _assemble(split_images: dict[str, list[str]], captions: Captions, image_dir: Path) -> dict[str, Split]:
    """The splits' samples: listed images with captions whose file exists; what is not is counted as skipped."""
    splits, in_a_split, skipped = {name: Split(name, image_dir) for name in SPLITS}, set(), Counter()
    for name in SPLITS:
        split = splits[name]
        for image in split_images[name]:
            in_a_split.add(image)
            if image not in captions.by_image:
                skipped["split-list images without captions"] += 1
            elif not (image_dir / image).is_file():
                skipped["images missing from the image folder"] += 1
            else:
                split.images.append(image)
                split.captions.extend(captions.by_image[image])
                split.caption_image.extend([len(split.images) - 1] * len(captions.by_image[image]))
    unsplit = sum(image not in in_a_split for image in captions.by_image)
    if unsplit:
        skipped["captioned images in no split list (not used)"] += unsplit
    captions.skipped.update(skipped)
    return splits


def annotation_files_in(root: Path) -> list[Path]:
    """The annotation files of every layout that `root` holds where detection looks for them."""
    return [
        root / folder / name
        for spec in LAYOUTS.values()
        for name in spec.files
        for folder in spec.text_dirs
        if (root / folder / name).is_file()
    ]
