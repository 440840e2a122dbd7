"""The two ONNX towers of `brain-trainer export --format onnx`, each checked against the PyTorch model with
onnxruntime on the same inputs before the export counts as done."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from brain_trainer.data.augment import normalize_images
from brain_trainer.inference.load import Brain, InferenceError
from brain_trainer.safe_files import private_folder, publish

IMAGE_TOWER, TEXT_TOWER = "image_tower.onnx", "text_tower.onnx"
TOLERANCE = 1e-4  # fp32: the largest absolute difference of an embedding value allowed
PROBE_CAPTIONS = [
    "a red circle on a white background",
    "two dogs",
    "A picture with three blue squares at the left of a gray scene, seen from far away",
]


class ExportMismatch(Exception):
    """onnxruntime's embeddings differ from PyTorch's by more than TOLERANCE."""


class ImageTower(nn.Module):
    def __init__(self, brain: Brain):
        super().__init__()
        self.model = brain.model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


class TextTower(nn.Module):
    def __init__(self, brain: Brain):
        super().__init__()
        self.model = brain.model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask)


def _onnx_modules():
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise InferenceError(
            f"--format onnx needs {error.name}: pip install 'brain-trainer[export]' (onnx, onnxruntime, onnxscript)"
        ) from None
    return onnx, onnxruntime


def _export_tower(tower: nn.Module, inputs: dict[str, torch.Tensor], path: Path, dynamic: dict) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's remarks on the fast paths it replaces
        torch.onnx.export(
            tower.eval(),
            tuple(inputs.values()),
            str(path),
            input_names=list(inputs),
            output_names=["embeddings"],
            dynamic_axes=dynamic,
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def check_tower(tower: nn.Module, inputs: dict[str, torch.Tensor], path: Path) -> float:
    """The largest |onnxruntime - PyTorch| over the tower's embeddings of `inputs`, and of their first two rows
    (another batch size than the traced one: the batch axis is dynamic)."""
    onnx, onnxruntime = _onnx_modules()
    onnx.checker.check_model(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    difference = 0.0
    for batch in (inputs, {name: value[:2] for name, value in inputs.items()}):
        (ours,) = session.run(None, {name: value.numpy() for name, value in batch.items()})
        with torch.no_grad():
            theirs = tower(*batch.values()).numpy()
        difference = max(difference, float(np.abs(ours - theirs).max()))
    return difference


def export_onnx(brain: Brain, out: Path) -> dict:
    """Both towers, each exported and then checked; raises ExportMismatch (and removes the file) above TOLERANCE."""
    _onnx_modules()
    side = brain.preprocess.image_size
    pixels = torch.randint(0, 256, (3, 3, side, side), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    tokens = brain.tokens(PROBE_CAPTIONS)
    towers = (
        (IMAGE_TOWER, ImageTower(brain), {"images": normalize_images(pixels)}, {"images": {0: "batch"}}),
        (
            TEXT_TOWER,
            TextTower(brain),
            tokens,
            {"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"}},
        ),
    )
    for name, tower, inputs, dynamic in towers:
        with private_folder(out) as scratch:  # the exporter opens its own file: never at a name someone could plant
            _export_tower(tower, inputs, scratch / name, {**dynamic, "embeddings": {0: "batch"}})
            difference = check_tower(tower, inputs, scratch / name)
            if difference <= TOLERANCE:
                publish(scratch / name, out / name)
        path = out / name
        print(
            f"{'✓' if difference <= TOLERANCE else '✗'} {path}: max |onnxruntime - torch| = {difference:.2e} "
            f"(limit {TOLERANCE:.0e}, fp32)"
        )
        if not difference <= TOLERANCE:
            raise ExportMismatch(
                f"{path}: onnxruntime differs from PyTorch by {difference:.2e} > {TOLERANCE:.0e}; not written"
            )
    return {"image_tower": IMAGE_TOWER, "text_tower": TEXT_TOWER}
