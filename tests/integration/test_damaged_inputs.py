"""What every command reads is data from outside: a checkpoint with damaged contents, an export folder, an index,
the S3 lock object and every flag of embed/search/export end in one `Error:` line naming the file, field, flag or
URL and the fix, with exit status 2, before anything is claimed or written; never a traceback."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import assert_one_error_line, run_args, run_cli, split_folder

from brain_trainer.checkpointing import LAST, LOCK_NAME, open_storage

pytestmark = pytest.mark.slow


@pytest.fixture
def setup(sample_root, trained, tmp_path):
    images, _, _ = split_folder(sample_root, "val", tmp_path)
    return trained / "ckpt" / LAST, images


def damaged(checkpoint_path, tmp_path, change) -> str:
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    change(checkpoint)
    path = tmp_path / "damaged.pt"
    torch.save(checkpoint, path)
    return str(path)


def python_rng_of_another_version(checkpoint):
    checkpoint["rng_state"][0]["python"]["version"] = 9


def torch_rng_of_another_size(checkpoint):
    checkpoint["rng_state"][0]["torch"] = torch.zeros(5, dtype=torch.uint8)


def step_of_another_shape(checkpoint):
    state = checkpoint["optimizer_state_dict"]["state"][0]
    state["step"] = torch.ones_like(state["exp_avg"])


def global_step_past_int64(checkpoint):
    checkpoint["global_step"] = 2**64


@pytest.mark.parametrize(
    "change, field",
    [
        (python_rng_of_another_version, "rng_state[0].python"),
        (torch_rng_of_another_size, "rng_state[0].torch"),
        (step_of_another_shape, "optimizer_state_dict.state[0].step"),
        (global_step_past_int64, "global_step"),
    ],
)
def test_a_resume_from_damaged_contents_is_one_line_before_the_folder_is_claimed(
    sample_root, trained, tmp_path, capsys, change, field
):
    last = trained / "ckpt" / LAST
    change_in_place = torch.load(last, weights_only=True)
    change(change_in_place)
    torch.save(change_in_place, last)
    before = last.read_bytes()
    status, out, err = run_cli(capsys, *run_args(sample_root, trained, "--epochs", "2", "--resume", "auto"))
    assert_one_error_line(status, err, str(last), f"field '{field}'")
    assert "Train samples" not in out and last.read_bytes() == before  # refused before the banner and the claim
    status, out, _ = run_cli(capsys, "ckpt", "inspect", last)
    assert status == 2 and f"verdict:    --resume refuses it: field '{field}'" in out


@pytest.mark.parametrize(
    "config, field",
    [({"d_shared": "32"}, "config.d_shared"), ({"image_size": "x"}, "config.image_size"), ({"d_shared": 0}, "0")],
)
def test_embed_and_export_check_a_checkpoints_settings_as_training_does(setup, tmp_path, capsys, config, field):
    checkpoint, images = setup
    path = damaged(checkpoint, tmp_path, lambda c: c["config"].update(config))
    for command in (
        ["embed", "--checkpoint", path, "--images", images, "--out", tmp_path / "index", "--num_workers", "0"],
        ["export", "--checkpoint", path, "--out", tmp_path / "export"],
    ):
        status, _, err = run_cli(capsys, *command)
        assert_one_error_line(status, err, path, field)
    assert not (tmp_path / "index").exists() and not (tmp_path / "export").exists()


def test_a_damaged_tokenizer_in_a_checkpoint_is_one_line(setup, tmp_path, capsys):
    checkpoint, images = setup
    path = damaged(checkpoint, tmp_path, lambda c: c.update(tokenizer=c["tokenizer"][:-30]))
    status, _, err = run_cli(capsys, "embed", "--checkpoint", path, "--images", images, "--out", tmp_path / "i")
    assert_one_error_line(status, err, path, "field 'tokenizer'")


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--num_workers", "-1"], "--num_workers"),
        (["--device", "tpu"], "--device tpu"),
        (["--device", "cuda:99"], "--device cuda:99"),
        (["--batch_size", "0"], "--batch_size"),
    ],
)
def test_embeds_flags_are_checked_like_trainings(setup, tmp_path, capsys, flags, needle):
    checkpoint, images = setup
    status, _, err = run_cli(
        capsys, "embed", "--checkpoint", checkpoint, "--images", images, "--out", tmp_path / "index", *flags
    )
    assert_one_error_line(status, err, needle)
    assert not (tmp_path / "index").exists()


@pytest.fixture
def exported(setup, tmp_path, capsys):
    checkpoint, images = setup
    status, _, err = run_cli(capsys, "export", "--checkpoint", checkpoint, "--out", tmp_path / "export")
    assert status == 0, err
    return tmp_path / "export", images


def truncate_weights(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def damage_tokenizer(folder):
    tokenizer = folder / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text()[:-50])


@pytest.mark.parametrize("damage, needle", [(truncate_weights, "model.safetensors"), (damage_tokenizer, "tokenizer")])
def test_a_damaged_export_folder_is_one_line(exported, tmp_path, capsys, damage, needle):
    folder, images = exported
    damage(folder)
    status, _, err = run_cli(capsys, "embed", "--checkpoint", folder, "--images", images, "--out", tmp_path / "i")
    assert_one_error_line(status, err, str(folder), needle)


@pytest.fixture
def index(setup, tmp_path, capsys):
    checkpoint, images = setup
    out = tmp_path / "index"
    status, _, err = run_cli(
        capsys, "embed", "--checkpoint", checkpoint, "--images", images, "--out", out, "--num_workers", "0"
    )
    assert status == 0, err
    return out


def part(folder, name):
    """The file of an index part, as its manifest publishes it."""
    return folder / json.loads((folder / "manifest.json").read_text()).get("files", {}).get(name, name)


def rows_are_strings(folder):
    part(folder, "images.jsonl").write_text('"a.jpg"\n"b.jpg"\n')


def images_dir_is_a_number(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "images_dir": 5}))


def embeddings_are_strings(folder):
    rows = np.load(part(folder, "image_embeddings.npy")).shape[0]
    np.save(part(folder, "image_embeddings.npy"), np.array(["x"] * rows))


def header_claims_terabytes(folder):
    path = part(folder, "image_embeddings.npy")
    data = path.read_bytes()
    rows = np.load(path).shape[0]
    width = json.loads((folder / "manifest.json").read_text())["width"]
    claimed = data.replace(f"({rows}, {width})".encode(), f"({rows * 10**9}, {width})".encode(), 1)
    assert claimed != data
    path.write_bytes(claimed)  # 11 TiB by its header; the rows and the manifest stay as they were


@pytest.mark.parametrize(
    "damage", [rows_are_strings, images_dir_is_a_number, embeddings_are_strings, header_claims_terabytes]
)
def test_a_damaged_index_is_one_line_naming_it_and_embed(index, capsys, damage):
    damage(index)
    status, _, err = run_cli(capsys, "search", "--index", index, "--text", "a red square")
    assert_one_error_line(status, err, f"--index {index}", "brain-trainer embed")


def test_searchs_flags_are_checked_like_trainings(index, capsys):
    for flags, needle in ((["--device", "tpu"], "--device tpu"), (["-k", "0"], "-k")):
        status, _, err = run_cli(capsys, "search", "--index", index, "--text", "a", *flags)
        assert_one_error_line(status, err, needle)


def test_an_unreadable_lock_object_is_one_line_and_never_taken_over(sample_root, tmp_path, s3, capsys):
    storage = open_storage(s3.url)
    args = run_args(sample_root, tmp_path, "--epochs", "1")
    args[args.index("--savedir") + 1] = s3.url
    lock_url = f"{s3.url}/{LOCK_NAME}"
    for body in (b"[1, 2]", b"not json", b'{"holder": "x", "expires": "soon"}', b'{"holder": "x", "expires": 1e300}'):
        storage.fs.pipe_file(storage.key(LOCK_NAME), body)
        status, _, err = run_cli(capsys, *args)
        assert_one_error_line(status, err, lock_url, "unreadable", f"aws s3 rm {lock_url}")
        assert storage.fs.cat_file(storage.key(LOCK_NAME)) == body


def test_sizes_this_machine_cannot_hold_are_refused_with_the_memory_they_need(sample_root, tmp_path, capsys):
    for flag in ("--d_shared", "--scratch_text_width", "--max_text_len"):
        status, _, err = run_cli(capsys, *run_args(sample_root, tmp_path, flag, str(2**40)))
        assert_one_error_line(status, err, f"--{flag.strip('-')} {2**40}", "GiB")
    status, _, err = run_cli(capsys, "sample-data", tmp_path / "big", "--size", "100000x100000")
    assert status == 2 and "--size 100000x100000" in err and "GiB" in err
    assert not (tmp_path / "big").exists() and not (tmp_path / "ckpt").exists()
