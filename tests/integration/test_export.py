"""`brain-trainer export`: safetensors + config + tokenizer that `load_brain` loads back to the same model, and
two ONNX towers that onnxruntime runs to within 1e-4 of PyTorch."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from helpers import assert_one_error_line, run_cli, split_folder

from brain_trainer import load_brain
from brain_trainer.data.augment import normalize_images
from brain_trainer.inference.load import file_sha256

CAPTIONS = ["a red circle on a white background", "three blue squares at the left"]


def test_safetensors_export_loads_back_as_the_same_brain(trained, sample_root, tmp_path, capsys):
    checkpoint, out = trained / "ckpt" / "last_brain_v2.pt", tmp_path / "export"
    status, printed, err = run_cli(capsys, "export", "--checkpoint", checkpoint, "--out", out)
    assert status == 0, err
    assert {path.name for path in out.iterdir()} == {"model.safetensors", "config.json", "tokenizer.json"}
    config = json.loads((out / "config.json").read_text())
    assert config["checkpoint_sha256"] == file_sha256(checkpoint) and config["preprocess"]["image_size"] == 32
    original, exported = load_brain(checkpoint), load_brain(out)
    assert not exported.model.training and exported.checkpoint_sha256 == original.checkpoint_sha256
    images, _, _ = split_folder(sample_root, "val", tmp_path)
    pixels = original.preprocess_batch(sorted(images.iterdir()))
    assert torch.equal(
        original.embed_images(pixels), exported.embed_images(exported.preprocess_batch(sorted(images.iterdir())))
    )
    assert torch.equal(original.embed_texts(CAPTIONS), exported.embed_texts(CAPTIONS))
    index = tmp_path / "index"  # an index built with the checkpoint is searched with its export
    assert (
        run_cli(capsys, "embed", "--checkpoint", checkpoint, "--images", images, "--out", index, "--num_workers", "0")[
            0
        ]
        == 0
    )
    status, _, err = run_cli(capsys, "search", "--index", index, "--text", "red", "--checkpoint", out)
    assert status == 0, err


@pytest.mark.slow
def test_onnx_towers_match_pytorch(trained, tmp_path, capsys):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    checkpoint, out = trained / "ckpt" / "last_brain_v2.pt", tmp_path / "onnx"
    status, printed, err = run_cli(capsys, "export", "--checkpoint", checkpoint, "--out", out, "--format", "onnx")
    assert status == 0, err
    differences = [float(value) for value in re.findall(r"max \|onnxruntime - torch\| = (\S+) ", printed)]
    assert len(differences) == 2 and max(differences) <= 1e-4, printed
    brain = load_brain(checkpoint)  # on inputs of our own, at another batch size than the export's
    pixels = torch.randint(0, 256, (5, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    session = onnxruntime.InferenceSession(str(out / "image_tower.onnx"), providers=["CPUExecutionProvider"])
    (image_rows,) = session.run(None, {"images": normalize_images(pixels).numpy()})
    assert np.abs(image_rows - brain.embed_images(pixels).numpy()).max() <= 1e-4
    tokens = brain.tokens(CAPTIONS)
    session = onnxruntime.InferenceSession(str(out / "text_tower.onnx"), providers=["CPUExecutionProvider"])
    (text_rows,) = session.run(None, {name: value.numpy() for name, value in tokens.items()})
    assert np.abs(text_rows - brain.embed_texts(CAPTIONS).numpy()).max() <= 1e-4


def test_export_refuses_what_is_not_a_brain(tmp_path, capsys):
    weights = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, weights)
    assert_one_error_line(
        *run_cli(capsys, "export", "--checkpoint", weights, "--out", tmp_path / "out")[::2], str(weights), "not a brain"
    )
    assert_one_error_line(
        *run_cli(capsys, "export", "--checkpoint", tmp_path, "--out", tmp_path / "out")[::2], "config.json"
    )
