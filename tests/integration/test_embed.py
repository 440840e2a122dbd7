"""`brain-trainer embed`: the index it writes, re-runs that embed only what changed, another checkpoint
rebuilding, unreadable images, caption files in every layout, and bad inputs as one line with exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, assert_one_error_line, run_cli, split_folder

from brain_trainer import __version__, load_brain
from brain_trainer.inference.index import read_index
from brain_trainer.inference.load import file_sha256


@pytest.fixture
def setup(sample_root, trained, tmp_path):
    images, captions, _ = split_folder(sample_root, "val", tmp_path)
    return trained / "ckpt" / "last_brain_v2.pt", images, captions, tmp_path / "index"


def embed(capsys, checkpoint, images, index, *extra):
    return run_cli(
        capsys, "embed", "--checkpoint", checkpoint, "--images", images, "--out", index, "--num_workers", "0", *extra
    )


def test_index_holds_normalised_embeddings_metadata_and_manifest(setup, capsys):
    checkpoint, images, captions, index = setup
    status, out, err = embed(capsys, checkpoint, images, index, "--captions", captions)
    assert status == 0, err
    assert "Embedded 4 images (0 unchanged, 0 dropped, 0 unreadable) and 20 captions" in out
    built = read_index(index)
    manifest = built.manifest
    assert manifest["checkpoint"]["sha256"] == file_sha256(checkpoint) and manifest["normalized"] is True
    assert (manifest["width"], manifest["dtype"], manifest["program_version"]) == (32, "float32", __version__)
    assert manifest["counts"] == {"images": 4, "captions": 20, "unreadable": 0}
    assert manifest["config"]["d_shared"] == 32 and manifest["config"]["image_size"] == 32
    assert built.image_embeddings.dtype == np.float32 and built.text_embeddings.shape == (20, 32)
    for rows in (built.image_embeddings, built.text_embeddings):
        assert np.allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-5)
    first = sorted(images.iterdir())[0]
    assert built.images[0] == {"path": first.name, "size": first.stat().st_size, "mtime_ns": first.stat().st_mtime_ns}
    assert built.captions[0]["image"] == first.name and built.captions[0]["text"]
    brain = load_brain(checkpoint)  # the stored rows are the model's embeddings (alone, not in a batch of 4: to 1e-6)
    alone = brain.embed_images(brain.preprocess_batch([first]))[0]
    assert torch.allclose(alone, torch.from_numpy(built.image_embeddings[0]), rtol=0, atol=1e-6)


def test_rerun_embeds_only_new_or_changed_files_and_drops_deleted(setup, capsys):
    checkpoint, images, _, index = setup
    embed(capsys, checkpoint, images, index)
    before = read_index(index)
    status, out, _ = embed(capsys, checkpoint, images, index)
    assert status == 0 and "Embedded 0 images (4 unchanged, 0 dropped, 0 unreadable)" in out
    touched, deleted = sorted(images.iterdir())[1:3]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    deleted.unlink()
    status, out, _ = embed(capsys, checkpoint, images, index)
    assert status == 0 and "Embedded 1 image (2 unchanged, 1 dropped, 0 unreadable)" in out, out
    after = read_index(index)
    assert [row["path"] for row in after.images] == [p.name for p in sorted(images.iterdir())]
    assert after.images[1]["mtime_ns"] == touched.stat().st_mtime_ns
    assert np.array_equal(after.image_embeddings[[0, 2]], before.image_embeddings[[0, 3]])  # kept, not re-embedded
    assert np.allclose(after.image_embeddings[1], before.image_embeddings[1], rtol=0, atol=1e-6)  # same pixels again


def test_another_checkpoint_rebuilds_the_index(setup, tmp_path, capsys):
    checkpoint, images, _, index = setup
    embed(capsys, checkpoint, images, index)
    other = tmp_path / "other.pt"
    state = torch.load(checkpoint, weights_only=True)
    state["model_state_dict"]["image_proj.bias"] += 0.5
    torch.save(state, other)
    status, out, _ = embed(capsys, other, images, index)
    assert status == 0 and "built with another checkpoint" in out and "Embedded 4 images (0 unchanged" in out
    assert read_index(index).manifest["checkpoint"]["sha256"] == file_sha256(other)


def test_unreadable_image_is_one_warning_and_left_out(setup, capsys):
    checkpoint, images, _, index = setup
    (images / "nested").mkdir()
    (images / "nested" / "broken.png").write_bytes(b"\x89PNG not really")
    (images / ".hidden.jpg").write_bytes(b"not an image, and hidden")
    status, out, err = embed(capsys, checkpoint, images, index, "--dtype", "float16")
    assert status == 0 and "Embedded 4 images (0 unchanged, 0 dropped, 1 unreadable)" in out
    warnings = [line for line in err.splitlines() if line.startswith("⚠")]
    assert len(warnings) == 1 and "nested/broken.png" in warnings[0]
    built = read_index(index)
    assert built.manifest["counts"]["unreadable"] == 1 and built.manifest["unreadable"] == ["nested/broken.png"]
    assert built.image_embeddings.dtype == np.float16 and len(built.images) == 4


def test_bad_inputs_are_one_line(setup, tmp_path, capsys):
    checkpoint, images, _, index = setup
    empty = tmp_path / "empty"
    empty.mkdir()
    weights_only = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, weights_only)
    text_file = tmp_path / "notes.pt"
    text_file.write_text("not a checkpoint")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n")
    cases = [
        ((checkpoint, empty, index), ["--images", "no jpg"]),
        ((checkpoint, tmp_path / "missing", index), ["--images", "no such folder"]),
        ((weights_only, images, index), [str(weights_only), "not a brain"]),
        ((text_file, images, index), [str(text_file)]),
        ((tmp_path / "nothing.pt", images, index), ["nothing.pt"]),
        ((checkpoint, images, index, "--captions", blank), ["--captions", "no captions"]),
        ((checkpoint, images, index, "--batch_size", 0), ["--batch_size"]),
    ]
    for args, needles in cases:
        assert_one_error_line(*embed(capsys, *args)[::2], *needles)
    assert not index.exists()


@pytest.mark.slow
def test_embed_in_a_subprocess(setup):
    checkpoint, images, captions, index = setup
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "brain_trainer",
            "embed",
            "--checkpoint",
            str(checkpoint),
            "--images",
            str(images),
            "--captions",
            str(captions),
            "--out",
            str(index),
            "--num_workers",
            "1",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"Index {index}: 4 images, 20 captions, 32-wide float32 embeddings"
