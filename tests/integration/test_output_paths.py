"""Every file the program writes besides checkpoints (an index, an export, sample data, a contact sheet, a
converted checkpoint, TensorBoard's events): never through a link planted at its name, never over a user's
unrelated file, and a full disk or an impossible path is one line with exit 2 and nothing half-written."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_one_error_line, run_args, run_cli, small_disk, split_folder

from brain_trainer.checkpointing import LAST, load_for_resume
from brain_trainer.inference.index import read_index


@pytest.fixture
def setup(sample_root, trained, tmp_path):
    images, captions, _ = split_folder(sample_root, "val", tmp_path)
    return trained / "ckpt" / LAST, images, captions


def plant_links(folder: Path, names: list[str], outside: Path) -> dict[Path, bytes]:
    """A link at each name, to a file of its own outside the folder; returns those files and their bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    targets = {}
    for name in names:
        target = outside / f"precious-{name.strip('.')}"
        target.write_bytes(f"not yours: {name}".encode())
        (folder / name).symlink_to(target)
        targets[target] = target.read_bytes()
    return targets


def assert_untouched(targets: dict[Path, bytes]) -> None:
    for target, content in targets.items():
        assert target.read_bytes() == content, f"{target} was written through a link"


def fill(folder: Path) -> None:
    """Fill the disk under `folder` to the last byte."""
    descriptor = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(descriptor, b"\0" * 4096):
            pass
    except OSError as error:
        assert error.errno == errno.ENOSPC
    finally:
        os.close(descriptor)


def embed(capsys, checkpoint, images, out, *extra):
    return run_cli(
        capsys, "embed", "--checkpoint", checkpoint, "--images", images, "--out", out, "--num_workers", 0, *extra
    )


# ----------------------------------------------------------------------------- planted links, foreign files


def test_embed_never_writes_through_links_planted_at_the_index_names(setup, tmp_path, capsys):
    checkpoint, images, captions = setup
    out = tmp_path / "index"
    names = ["manifest.json", "image_embeddings.npy", "images.jsonl", "text_embeddings.npy", "captions.jsonl"]
    targets = plant_links(out, names, tmp_path / "outside")

    status, _, err = embed(capsys, checkpoint, images, out, "--captions", captions)
    assert_one_error_line(status, err, "--out", "not a brain-trainer index", "--overwrite")
    status, _, err = embed(capsys, checkpoint, images, out, "--captions", captions, "--overwrite")

    assert status == 0, err
    assert_untouched(targets)
    assert read_index(out).image_embeddings.shape == (4, 32)
    assert not any(path.is_symlink() for path in out.iterdir())


def test_export_never_writes_through_links_planted_at_its_names(trained, tmp_path, capsys):
    out = tmp_path / "export"
    targets = plant_links(out, ["config.json", "model.safetensors", "tokenizer.json"], tmp_path / "outside")

    status, _, err = run_cli(capsys, "export", "--checkpoint", trained / "ckpt" / LAST, "--out", out, "--overwrite")

    assert status == 0, err
    assert_untouched(targets)
    assert json.loads((out / "config.json").read_text())["format"] == "brain-trainer-export"


@pytest.mark.parametrize("command", ["embed", "export"])
def test_an_output_folder_holding_a_users_files_is_refused_without_overwrite(setup, tmp_path, capsys, command):
    checkpoint, images, _ = setup
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / ("manifest.json" if command == "embed" else "config.json")).write_text('{"mine": true}')
    args = ["--checkpoint", checkpoint, "--out", out] + (["--images", images] if command == "embed" else [])

    status, _, err = run_cli(capsys, command, *args)

    assert_one_error_line(status, err, f"--out {out}", "did not write", "--overwrite")
    assert len(list(out.iterdir())) == 2 and (out / "notes.txt").read_text() == "my notes"
    assert json.loads((out / ("manifest.json" if command == "embed" else "config.json")).read_text()) == {"mine": True}


def test_sample_data_never_writes_through_links_planted_at_its_names(tmp_path, capsys):
    root = tmp_path / "data"
    targets = plant_links(root / "Flickr8k_text", ["Flickr8k.token.txt", "Flickr_8k.trainImages.txt"], tmp_path / "o")

    args = ("sample-data", root, "--images", 6, "--val", 1, "--test", 1, "--size", "32x24")
    status, _, err = run_cli(capsys, *args)
    assert_one_error_line(status, err, "already holds", "--overwrite")  # the names are taken: refused first
    assert_untouched(targets)

    status, _, err = run_cli(capsys, *args, "--overwrite")

    assert status == 0, err
    assert_untouched(targets)
    assert (root / "Flickr8k_text" / "Flickr8k.token.txt").read_text().count("\n") == 30


def test_a_grid_never_writes_through_a_link_planted_at_its_name(setup, tmp_path, capsys):
    checkpoint, images, _ = setup
    assert embed(capsys, checkpoint, images, tmp_path / "index")[0] == 0
    targets = plant_links(tmp_path / "sheets", ["sheet.png"], tmp_path / "outside")

    status, _, err = run_cli(
        capsys, "search", "--index", tmp_path / "index", "--text", "red", "--grid", tmp_path / "sheets" / "sheet.png"
    )

    assert status == 0, err
    assert_untouched(targets)
    assert (tmp_path / "sheets" / "sheet.png").read_bytes().startswith(b"\x89PNG")


# ----------------------------------------------------------------------------- impossible paths, full disks


def test_an_output_under_a_file_is_one_line_for_every_command(setup, tmp_path, capsys):
    checkpoint, images, _ = setup
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    under = a_file / "out"

    assert_one_error_line(*embed(capsys, checkpoint, images, under)[::2], f"--out {under}", "a_file")
    assert_one_error_line(*run_cli(capsys, "export", "--checkpoint", checkpoint, "--out", under)[::2], "--out")
    assert_one_error_line(
        *run_cli(capsys, "ckpt", "convert", checkpoint, under / "new.pt")[::2], "a file is in the way"
    )
    assert_one_error_line(*run_cli(capsys, "sample-data", under, "--images", 6, "--val", 1, "--test", 1)[::2], "out")
    assert embed(capsys, checkpoint, images, tmp_path / "index")[0] == 0
    status, _, err = run_cli(
        capsys, "search", "--index", tmp_path / "index", "--text", "red", "--grid", under / "s.png"
    )
    assert_one_error_line(status, err, f"--grid {under / 's.png'}")
    assert a_file.read_text() == "x"


def test_a_full_disk_mid_embed_leaves_the_old_index_answering(setup, tmp_path, capsys):
    checkpoint, images, captions = setup
    out = tmp_path / "disk" / "index"
    with small_disk(tmp_path / "disk", "size=1m") as mounted:
        if not mounted:
            pytest.skip("mounting a small tmpfs needs root")  # CI runs as root
        assert embed(capsys, checkpoint, images, out)[0] == 0
        before = read_index(out)
        fill(tmp_path / "disk")

        status, _, err = embed(capsys, checkpoint, images, out, "--captions", captions, "--dtype", "float16")

        assert_one_error_line(status, err, f"--out {out}", "No space left on device", "unchanged")
        after = read_index(out)
        assert after.manifest == before.manifest and np.array_equal(after.image_embeddings, before.image_embeddings)
        assert sorted(path.name for path in out.iterdir()) == sorted(
            ["manifest.json", *before.manifest["files"].values()]
        ), "nothing half-written is left"
        os.unlink(tmp_path / "disk" / "filler")


@pytest.mark.parametrize("command", ["export", "convert", "sample-data"])
def test_a_full_disk_is_one_line_and_nothing_half_written(trained, tmp_path, capsys, command):
    checkpoint = trained / "ckpt" / LAST
    weights = tmp_path / "old_weights.pt"  # what convert takes: a legacy file of weights only
    torch.save(torch.load(checkpoint, weights_only=True)["model_state_dict"], weights)
    with small_disk(tmp_path / "disk", "size=64k") as mounted:
        if not mounted:
            pytest.skip("mounting a small tmpfs needs root")
        out = tmp_path / "disk" / "out"
        args = {
            "export": ["export", "--checkpoint", checkpoint, "--out", out],
            "convert": ["ckpt", "convert", weights, out / "new.pt"],
            "sample-data": ["sample-data", out, "--images", 200, "--val", 1, "--test", 1, "--size", "64x48"],
        }[command]
        status, _, err = run_cli(capsys, *args)
        assert status == 2 and "No space left on device" in err and "Traceback" not in err, err
        assert err.count("\n") == 1, err
        leftovers = [path.name for path in out.rglob("*") if path.is_file() and ".tmp-" in path.name]
        assert not leftovers
        if command == "export":
            assert not (out / "config.json").exists(), "an export without its config is not taken for complete"


# ----------------------------------------------------------------------------- TensorBoard's events


@pytest.mark.slow
def test_a_full_logdir_saves_the_run_and_stops_it_with_exit_2_resumable(sample_root, tmp_path, capsys):
    from brain_trainer import train as cli

    args = run_args(sample_root, tmp_path, "--epochs", "2")
    with small_disk(tmp_path / "runs", "size=16k") as mounted:
        if not mounted:
            pytest.skip("mounting a small tmpfs needs root")
        status = cli.main(args)
        err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"Error: --logdir {tmp_path / 'runs'}") and "No space left on device" in lines[0]
    assert "--resume auto" in lines[0]
    saved = load_for_resume(str(tmp_path / "ckpt" / LAST))
    assert saved["global_step"] >= 8, "the run saved where it stopped"


def test_a_logdir_that_is_a_link_is_refused_in_one_line(sample_root, tmp_path, capsys):
    from brain_trainer import train as cli

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs").symlink_to(tmp_path / "elsewhere")
    status = cli.main(run_args(sample_root, tmp_path, "--epochs", "1"))
    err = capsys.readouterr().err
    assert_one_error_line(status, err, f"--logdir {tmp_path / 'runs'}", "symbolic link")
    assert not list((tmp_path / "elsewhere").iterdir())
