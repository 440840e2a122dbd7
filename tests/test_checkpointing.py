"""checkpointing.py against real files in tmp_path: save -> clobber -> load -> equal, atomicity, legacy
variants, the guide's lines, refusals, --resume auto, and the inspect/convert CLI."""
from __future__ import annotations

import argparse
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from brain_trainer import checkpointing as ck
from conftest import ROOT, assert_bitwise_equal
from brain_trainer.trainer import TrainState


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def trained(model: nn.Module) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)
    for _ in range(3):
        loss = model(torch.randn(5, 4)).square().mean()
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return optimizer, scaler


def checkpoint_of(model: nn.Module, optimizer, scaler, epoch: int = 4, global_step: int = 123, best_val=0.75,
                  samples_seen: int = 0, **changes) -> dict:
    state = TrainState(epoch=epoch + 1, samples_seen=samples_seen, global_step=global_step, best_val=best_val,
                       val_loss=0.8)
    fields = dict(model=model, optimizer=optimizer, scaler=scaler, train_state=state.state_dict(),
                  config={"lr": 1e-2, "precision": "fp16", "d_shared": 8}, tokenizer=None,
                  rng_states=[ck.capture_rng_state()], run={"id": "a", "parent": None, "started_ns": 1})
    return ck.make_checkpoint(**{**fields, **changes})


assert_same_tensors = assert_bitwise_equal


# ----------------------------------------------------------------------------- save -> clobber -> load -> equal

def test_round_trip_restores_model_optimizer_scaler_and_position(tmp_path):
    model = small_model()
    optimizer, scaler = trained(model)
    path = tmp_path / ck.LAST
    ck.save_checkpoint(checkpoint_of(model, optimizer, scaler), path)
    saved_model, saved_optimizer, saved_scale = model.state_dict(), optimizer.state_dict(), scaler.get_scale()

    clobbered = small_model(seed=9)
    fresh_optimizer = torch.optim.AdamW(clobbered.parameters(), lr=1e-2)
    fresh_scaler = torch.amp.GradScaler("cpu", enabled=True)
    point = TrainState()
    ck.restore_training_state(torch.load(path, weights_only=True), path, clobbered, fresh_optimizer,
                              fresh_scaler, "fp16", {"d_shared": 8}, point, log=lambda line: None)

    assert_same_tensors(clobbered.state_dict(), saved_model)
    assert_same_tensors(fresh_optimizer.state_dict(), saved_optimizer)
    assert fresh_scaler.get_scale() == saved_scale != 65536.0
    assert (point.epoch, point.samples_seen, point.global_step, point.best_val) == (5, 0, 123, 0.75)


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    ck.save_checkpoint({"rng_state": ck.capture_rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.normal(), torch.rand(3))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    ck.restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng_state"])
    got = (random.random(), np.random.normal(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_capturing_the_rng_draws_nothing():
    torch.manual_seed(3)
    ck.capture_rng_state()
    after_capture = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(after_capture, torch.rand(1))


def test_checkpoint_holds_plain_types_and_no_wrapper_prefixes(tmp_path):
    model = small_model()
    optimizer, scaler = trained(model)
    compiled_view = nn.DataParallel(model)  # what a wrapped run holds; we save the plain module
    path = tmp_path / ck.LAST
    ck.save_checkpoint(checkpoint_of(compiled_view.module, optimizer, scaler), path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["format_version"] == 3 and loaded["epoch"] == 4 and loaded["global_step"] == 123
    assert all(not key.startswith(("module.", "_orig_mod.")) for key in loaded["model_state_dict"])
    assert isinstance(loaded["config"], dict) and "scaler_state_dict" in loaded
    assert len(loaded["rng_state"]) == loaded["world_size"] == 1
    assert set(loaded["rng_state"][0]) == {"python", "numpy", "torch", "cuda"}
    assert set(loaded["versions"]) == {"torch", "transformers"} and loaded["created"]


# ----------------------------------------------------------------------------- atomic writes

def test_a_save_that_fails_midway_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / ck.LAST
    ck.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)

    def torn_save(obj, file):
        Path(file).write_bytes(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint({"global_step": 2}, path)
    assert ck.load_checkpoint(path)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [ck.LAST]


def test_a_full_disk_is_one_clear_error_and_the_old_file_stays(tmp_path, monkeypatch):
    path = tmp_path / ck.LAST
    ck.save_checkpoint({"global_step": 1}, path)

    def disk_full(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(ck.CheckpointError, match=r"could not write .*last_brain_v2.pt: No space left on device; "
                                                 r"the previous last_brain_v2.pt is intact"):
        ck.save_checkpoint({"global_step": 2}, path)
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [ck.LAST]


WRITER = """
import sys, torch
from brain_trainer import checkpointing as ck
step = 0
while True:
    step += 1
    ck.save_checkpoint({{"global_step": step, "w": torch.full((4_000_000,), float(step))}}, {path!r})
    print(step, flush=True)
"""


def test_a_process_killed_mid_write_always_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / ck.LAST
    rng = random.Random(0)
    for attempt in range(3):
        writer = subprocess.Popen([sys.executable, "-c", WRITER.format(root=str(ROOT), path=str(path))],
                                  stdout=subprocess.PIPE, text=True)
        writer.stdout.readline()  # at least one complete save
        time.sleep(rng.uniform(0.0, 0.3))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        loaded = ck.load_checkpoint(path)
        assert torch.all(loaded["w"] == float(loaded["global_step"]))
    ck.remove_stale_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [ck.LAST]


def write_at(path: Path, seconds: int) -> None:
    path.write_bytes(b"x")
    os.utime(path, ns=(seconds * 10**9, seconds * 10**9))


def test_rotation_keeps_the_most_recently_written_snapshots_and_never_touches_best_or_last(tmp_path):
    for name in (ck.LAST, ck.BEST):
        write_at(tmp_path / name, 1)
    for seconds, epoch in enumerate((1, 2, 3, 10), start=10):
        write_at(tmp_path / ck.snapshot_name(epoch), seconds)
    removed = ck.rotate_snapshots(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["epoch_001_brain_v2.pt", "epoch_002_brain_v2.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ck.BEST, ck.LAST, "epoch_003_brain_v2.pt",
                                                                 "epoch_010_brain_v2.pt"])


def test_rotation_after_a_resume_from_an_older_epoch_keeps_the_new_snapshot_not_the_abandoned_ones(tmp_path):
    for seconds, epoch in enumerate((0, 1, 2), start=10):  # the abandoned run's epochs 0..2
        write_at(tmp_path / ck.snapshot_name(epoch), seconds)
    write_at(tmp_path / ck.snapshot_name(1), 20)  # the new continuation (resumed at epoch 0) just wrote epoch 1
    removed = ck.rotate_snapshots(tmp_path, keep_last=1, keep=tmp_path / ck.snapshot_name(1))
    assert [p.name for p in tmp_path.iterdir()] == [ck.snapshot_name(1)]
    assert sorted(p.name for p in removed) == [ck.snapshot_name(0), ck.snapshot_name(2)]


# ----------------------------------------------------------------------------- the guide's lines

def restore_lines(checkpoint: dict, model: nn.Module, precision: str = "fp16", architecture=None,
                  scaler_enabled: bool = True) -> tuple[list[str], TrainState]:
    lines: list[str] = []
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=scaler_enabled)
    state = TrainState()
    ck.restore_training_state(checkpoint, Path("x.pt"), model, optimizer, scaler, precision,
                              architecture or {"d_shared": 8}, state, log=lines.append)
    return lines, state


def test_full_checkpoint_prints_every_line_of_the_guide():
    model = small_model()
    optimizer, scaler = trained(model)
    lines, _ = restore_lines(checkpoint_of(model, optimizer, scaler, epoch=42, global_step=158250, best_val=0.2345),
                             small_model(1))
    assert lines == ["=" * 60, "Resuming from checkpoint: x.pt", "=" * 60,
                     "✓ New format checkpoint with full training state", "✓ Model state loaded (strict)",
                     "✓ Optimizer state loaded", "✓ Starting from epoch 43", "✓ Global step restored to 158250",
                     "✓ Best validation loss: 0.2345", "✓ GradScaler state loaded"]


def test_precision_change_drops_or_starts_the_scaler_with_a_warning():
    model = small_model()
    optimizer, scaler = trained(model)
    to_bf16, _ = restore_lines(checkpoint_of(model, optimizer, scaler), small_model(1), "bf16", scaler_enabled=False)
    assert "⚠ GradScaler state dropped: this run uses bf16, which needs no loss scaling" in to_bf16
    no_scaler = torch.amp.GradScaler("cpu", enabled=False)
    from_fp32 = checkpoint_of(model, optimizer, no_scaler, config={"precision": "fp32"})
    to_fp16, _ = restore_lines(from_fp32, small_model(1), "fp16")
    assert "⚠ Fresh GradScaler: the checkpoint was trained in fp32" in to_fp16


@pytest.mark.parametrize("variant", ["bare", "state_dict", "model", "module_prefix", "orig_mod_prefix"])
def test_legacy_weight_files_load_strictly_whatever_their_wrapping(variant):
    weights = small_model().state_dict()
    prefix = {"module_prefix": "module.", "orig_mod_prefix": "_orig_mod."}.get(variant, "")
    prefixed = {prefix + key: value for key, value in weights.items()}
    checkpoint = {variant: prefixed} if variant in ("state_dict", "model") else prefixed
    target = small_model(5)
    lines, point = restore_lines(checkpoint, target)
    assert lines[3:] == ["✓ Old format checkpoint (model weights only)", "✓ Model state loaded (strict)",
                         "⚠ Optimizer state not in checkpoint (starting fresh)", "⚠ Epoch unknown (starting from epoch 0)"]
    assert_same_tensors(target.state_dict(), weights)
    assert (point.epoch, point.global_step, point.best_val) == (0, 0, None)


def test_legacy_file_with_extra_keys_and_a_changed_layer_loads_the_rest_non_strictly():
    old = small_model()
    weights = {**old.state_dict(), "extra.weight": torch.ones(2)}
    weights["2.weight"] = torch.ones(5, 8)  # the head had 5 classes then; now 3
    weights["2.bias"] = torch.ones(5)
    target = small_model(7)
    lines, _ = restore_lines(weights, target)
    assert lines[4:7] == ["⚠ Strict loading failed: 1 unexpected keys, 2 shape mismatches",
                          "  Attempting to load with strict=False...",
                          "✓ Model state loaded (partial - may need fine-tuning)"]
    assert any(line.startswith("  loaded 2/4 tensors") for line in lines)
    assert "  shape mismatch: 2.weight, 2.bias" in lines and "  unexpected: extra.weight" in lines
    assert torch.equal(target[0].weight, old[0].weight)


def test_a_file_that_matches_nothing_is_refused():
    with pytest.raises(ck.CheckpointError, match="none of its 1 tensors match this model"):
        restore_lines({"encoder.layer.weight": torch.ones(3)}, small_model())


def test_a_different_architecture_warns_loads_non_strictly_and_skips_the_optimizer():
    model = small_model()
    optimizer, scaler = trained(model)
    bigger = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5))
    lines, _ = restore_lines(checkpoint_of(model, optimizer, scaler), bigger, architecture={"d_shared": 16})
    assert "⚠ Architecture differs from the checkpoint: d_shared 8 -> 16" in lines
    assert "⚠ Optimizer state not loaded: the model's parameters differ from the checkpoint's (starting fresh)" in lines


# ----------------------------------------------------------------------------- refusals

def test_missing_file_says_not_found_with_the_ls_hint(tmp_path):
    with pytest.raises(ck.CheckpointError, match=r"Checkpoint file not found: .*nope.pt \(check the path: ls -lh"):
        ck.load_checkpoint(tmp_path / "nope.pt")


def test_folder_without_a_checkpoint_is_named(tmp_path):
    with pytest.raises(ck.CheckpointError, match="folder holds no last_brain_v2.pt, best_brain_v2.pt or epoch snapshot"):
        ck.checkpoint_in_folder(tmp_path)


@pytest.mark.parametrize("content, message", [(b"", "empty file"), (b"hello, not a checkpoint", "not a PyTorch checkpoint")])
def test_empty_and_foreign_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(ck.CheckpointError, match=message):
        ck.load_checkpoint(path)


def test_a_truncated_file_is_named(tmp_path):
    path = tmp_path / ck.LAST
    ck.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ck.CheckpointError, match="last_brain_v2.pt: truncated or not a PyTorch checkpoint"):
        ck.load_checkpoint(path)


class Malicious:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model_state_dict": Malicious(marker), "epoch": 1}, path)
    with pytest.raises(ck.CheckpointError, match=r"refused: loading it would need unsafe unpickling of .*system"):
        ck.load_checkpoint(path)
    assert not marker.exists()


# ----------------------------------------------------------------------------- --resume auto and folders

def full(step: int, started_ns: int = 1) -> dict:
    return {"global_step": step, "epoch": 0, "model_state_dict": {}, "run": {"id": str(started_ns), "started_ns": started_ns}}


def test_resume_auto_picks_the_furthest_step_of_the_newest_run_and_names_an_unreadable_file(tmp_path):
    ck.save_checkpoint(full(30), tmp_path / ck.BEST)
    ck.save_checkpoint(full(20), tmp_path / ck.snapshot_name(1))
    ck.save_checkpoint(full(40), tmp_path / ck.LAST)
    assert ck.find_latest_checkpoint(tmp_path, log=lambda line: None).path == tmp_path / ck.LAST
    (tmp_path / ck.LAST).write_bytes((tmp_path / ck.LAST).read_bytes()[:100])
    lines: list[str] = []
    found = ck.find_latest_checkpoint(tmp_path, log=lines.append)
    assert found.path == tmp_path / ck.BEST
    assert len(lines) == 1 and lines[0].startswith("⚠ Skipping ") and "last_brain_v2.pt" in lines[0]
    assert [path for path, _ in found.unreadable] == [tmp_path / ck.LAST]


def test_resume_auto_follows_the_newest_run_not_the_abandoned_one_with_more_steps(tmp_path):
    ck.save_checkpoint(full(24, started_ns=1), tmp_path / ck.BEST)  # the old run went further...
    ck.save_checkpoint(full(16, started_ns=2), tmp_path / ck.LAST)  # ...but this run resumed from its step 8
    assert ck.find_latest_checkpoint(tmp_path, log=lambda line: None).path == tmp_path / ck.LAST


def test_resume_auto_reads_a_file_of_the_old_serialisation_as_an_explicit_resume_does(tmp_path):
    torch.save(full(7), tmp_path / ck.LAST, _use_new_zipfile_serialization=False)
    found = ck.find_latest_checkpoint(tmp_path, log=lambda line: None)
    assert found.path == tmp_path / ck.LAST and found.unreadable == []


def test_resume_from_a_folder_takes_its_newest_checkpoint(tmp_path):
    ck.save_checkpoint(full(5), tmp_path / ck.LAST)
    ck.save_checkpoint(full(9), tmp_path / ck.BEST)
    assert ck.checkpoint_in_folder(tmp_path) == tmp_path / ck.BEST


# ----------------------------------------------------------------------------- CLI

def test_inspect_prints_format_epoch_step_and_config(tmp_path, capsys):
    model = small_model()
    optimizer, scaler = trained(model)
    ck.save_checkpoint(checkpoint_of(model, optimizer, scaler), tmp_path / ck.LAST)
    assert ck.main(["inspect", str(tmp_path / ck.LAST)]) == 0
    out = capsys.readouterr().out
    for expected in ("format:     3", "epoch:      4", "step:       123", "best_val:   0.75", "precision:  fp16",
                     "  d_shared: 8", "tensors:"):
        assert expected in out


def test_convert_wraps_a_legacy_file_that_then_resumes_as_the_current_format(tmp_path, capsys):
    weights = {f"module.{k}": v for k, v in small_model().state_dict().items()}
    torch.save(weights, tmp_path / "old.pt")
    assert ck.main(["convert", str(tmp_path / "old.pt"), str(tmp_path / "new.pt")]) == 0
    converted = torch.load(tmp_path / "new.pt", weights_only=True)
    assert converted["format_version"] == 3 and "0.weight" in converted["model_state_dict"]
    lines, point = restore_lines(converted, small_model(3))
    assert "✓ New format checkpoint with full training state" in lines and point.epoch == 0
    assert ck.main(["convert", str(tmp_path / "old.pt"), str(tmp_path / "new.pt")]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the Checkpointer: snapshot, persist

def held_writer(monkeypatch) -> threading.Event:
    """Hold the background writer at the start of its write until the returned event is set."""
    release, real_save = threading.Event(), ck.save_checkpoint

    def held(checkpoint, path):
        release.wait(timeout=30)
        real_save(checkpoint, path)

    monkeypatch.setattr(ck, "save_checkpoint", held)
    return release


def test_changes_after_the_snapshot_never_reach_the_file(tmp_path, monkeypatch):
    model = small_model()
    optimizer, scaler = trained(model)
    checkpoint = checkpoint_of(model, optimizer, scaler)
    expected_model = {k: v.clone() for k, v in model.state_dict().items()}
    expected_moments = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    release = held_writer(monkeypatch)
    checkpointer = ck.Checkpointer(savedir=tmp_path, background=True)
    checkpointer.save(checkpoint, [ck.LAST])
    for _ in range(2):  # training goes on while the writer waits: weights and Adam moments change in place
        optimizer.zero_grad()
        model(torch.randn(5, 4)).square().mean().backward()
        optimizer.step()
    assert not torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], expected_moments)
    release.set()
    checkpointer.close()
    saved = ck.load_checkpoint(tmp_path / ck.LAST)
    assert_same_tensors(saved["model_state_dict"], expected_model)
    assert torch.equal(saved["optimizer_state_dict"]["state"][0]["exp_avg"], expected_moments)


def test_an_epoch_end_is_written_once_and_the_other_names_are_links_to_it(tmp_path):
    model = small_model()
    optimizer, scaler = trained(model)
    checkpointer = ck.Checkpointer(savedir=tmp_path, keep_last=1, background=True)
    checkpointer.save(checkpoint_of(model, optimizer, scaler, epoch=0), [ck.LAST, ck.BEST, ck.snapshot_name(0)])
    checkpointer.save(checkpoint_of(model, optimizer, scaler, epoch=1), [ck.LAST, ck.snapshot_name(1)])
    checkpointer.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [ck.BEST, ck.snapshot_name(1), ck.LAST], "rotation kept the newest snapshot only"
    assert (tmp_path / ck.LAST).stat().st_ino == (tmp_path / ck.snapshot_name(1)).stat().st_ino
    assert (tmp_path / ck.BEST).stat().st_ino != (tmp_path / ck.LAST).stat().st_ino
    assert ck.load_checkpoint(tmp_path / ck.BEST)["epoch"] == 0 and ck.load_checkpoint(tmp_path / ck.LAST)["epoch"] == 1


def test_a_link_refused_by_the_file_system_falls_back_to_a_durable_copy(tmp_path, monkeypatch):
    ck.save_checkpoint({"global_step": 3}, tmp_path / ck.LAST)

    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    ck.publish_copy(tmp_path / ck.LAST, tmp_path / ck.BEST)
    assert ck.load_checkpoint(tmp_path / ck.BEST)["global_step"] == 3
    assert (tmp_path / ck.BEST).stat().st_ino != (tmp_path / ck.LAST).stat().st_ino


def test_a_failed_background_write_is_reported_and_the_previous_file_stays(tmp_path, monkeypatch):
    checkpointer = ck.Checkpointer(savedir=tmp_path, background=True)
    checkpointer.save({"global_step": 1, "w": torch.ones(3)}, [ck.LAST])
    checkpointer.wait()

    def disk_full(obj, file):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4416 vs 4352")

    monkeypatch.setattr(torch, "save", disk_full)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    checkpointer.save({"global_step": 2, "w": torch.ones(3)}, [ck.LAST])
    for _ in range(100):
        if checkpointer.failed():
            break
        time.sleep(0.05)
    assert checkpointer.failed()
    with pytest.raises(ck.CheckpointError, match=r"could not write .*last_brain_v2.pt: No space left on device \(.*\); "
                                                 r"the previous last_brain_v2.pt is intact"):
        checkpointer.wait()
    monkeypatch.undo()
    assert ck.load_checkpoint(tmp_path / ck.LAST)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [ck.LAST]
    checkpointer.close()


KILL_DURING_PERSIST = """
import json, os, random, signal, sys, time
import torch
from brain_trainer import checkpointing as ck
from pathlib import Path

folder, rng, results = Path({folder!r}), random.Random(0), []
for trial in range({trials}):
    child = os.fork()
    if child == 0:  # a run that saves as fast as it can, every save in the background
        checkpointer = ck.Checkpointer(savedir=folder, background=True)
        step = 0
        while True:
            step += 1
            checkpointer.save({{"global_step": step, "w": torch.full((1_000_000,), float(step))}}, [ck.LAST, ck.BEST])
    time.sleep(0.05 + rng.uniform(0.0, 0.3))
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    last, best = ck.load_checkpoint(folder / ck.LAST), ck.load_checkpoint(folder / ck.BEST)
    results.append(bool(torch.all(last["w"] == last["global_step"])) and bool(torch.all(best["w"] == best["global_step"])))
    ck.remove_stale_temporaries(folder)
print(json.dumps({{"trials": len(results), "all_loadable_and_whole": all(results),
                   "left": sorted(p.name for p in folder.iterdir())}}))
"""


def test_sigkill_during_background_persists_always_leaves_loadable_whole_checkpoints(tmp_path):
    ck.save_checkpoint({"global_step": 0, "w": torch.zeros(1_000_000)}, tmp_path / ck.LAST)
    ck.save_checkpoint({"global_step": 0, "w": torch.zeros(1_000_000)}, tmp_path / ck.BEST)
    script = KILL_DURING_PERSIST.format(root=str(ROOT), folder=str(tmp_path), trials=50)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"trials": 50, "all_loadable_and_whole": True, "left": [ck.BEST, ck.LAST]}


# ----------------------------------------------------------------------------- one run per folder

def test_a_second_run_on_a_folder_is_refused_naming_the_first(tmp_path):
    first = ck.claim_savedir(tmp_path, resume=None, overwrite=False, unreadable=[])
    holder = subprocess.run([sys.executable, "-c", f"import sys; from brain_trainer import checkpointing as ck; "
                             f"ck.claim_savedir(ck.Path({str(tmp_path)!r}), resume=None, overwrite=False, unreadable=[])"],
                            capture_output=True, text=True)
    assert f"another run (PID {os.getpid()} on " in holder.stderr
    first.release()
    ck.claim_savedir(tmp_path, resume=None, overwrite=False, unreadable=[]).release()


def test_a_fresh_run_into_a_folder_with_checkpoints_needs_consent(tmp_path):
    ck.save_checkpoint(full(12), tmp_path / ck.LAST)
    with pytest.raises(ck.CheckpointError, match=r"already holds a run's checkpoints \(last_brain_v2.pt; newest at step "
                                                 r"12\); continue it with --resume auto, or pass --overwrite"):
        ck.claim_savedir(tmp_path, resume=None, overwrite=False, unreadable=[])
    outside = tmp_path.parent / "elsewhere.pt"
    with pytest.raises(ck.CheckpointError, match=r"holds another run's checkpoints \(last_brain_v2.pt\), which this run "
                                                 r"would replace as it saves; pass --overwrite"):
        ck.claim_savedir(tmp_path, resume=outside, overwrite=False, unreadable=[])
    ck.claim_savedir(tmp_path, resume=tmp_path / ck.LAST, overwrite=False, unreadable=[]).release()
    ck.claim_savedir(tmp_path, resume=None, overwrite=True, unreadable=[]).release()
    assert ck.load_checkpoint(tmp_path / ck.LAST)["global_step"] == 12, "claiming writes nothing over a checkpoint"


def test_only_temporaries_whose_writer_is_gone_are_removed(tmp_path):
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()  # reaped: its PID names no process now
        mine = tmp_path / f".{ck.LAST}.tmp-{alive.pid}"
        stale = tmp_path / f".{ck.LAST}.tmp-{dead.pid}"
        mine.write_bytes(b"in flight")
        stale.write_bytes(b"left by a crash")
        assert ck.remove_stale_temporaries(tmp_path) == [stale]
        assert mine.exists()
    finally:
        alive.kill()
        alive.wait()


def test_a_folder_that_cannot_be_written_is_found_at_startup(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ck.CheckpointError, match=r"--savedir .*a_file/ckpt: cannot be written \(.*\); choose a folder"):
        ck.probe_folder(blocker / "ckpt", "savedir")


# ----------------------------------------------------------------------------- startup checks of a checkpoint

@pytest.mark.parametrize("field, value, message", [
    ("epoch", -5, "field 'epoch' is -5 (expected an integer >= -1)"),
    ("epoch", "3", "field 'epoch' is '3' (expected an integer >= -1)"),
    ("global_step", "ten", "field 'global_step' is 'ten' (expected an integer >= 0)"),
    ("data_state", {"samples_seen": 0}, "field 'data_state.epoch' is None (expected an integer >= 0)"),
    ("rng_state", [{"torch": 1}], "field 'rng_state[0]' is 'dict'"),
    ("best_val", float("nan"), "field 'best_val' is nan (expected a finite number or None)"),
    ("format_version", 99, "format 99 was written by a newer brain-trainer"),
])
def test_a_damaged_field_is_one_line_naming_the_file_and_the_field(tmp_path, field, value, message):
    model = small_model()
    optimizer, scaler = trained(model)
    checkpoint = checkpoint_of(model, optimizer, scaler)
    checkpoint[field] = value
    ck.save_checkpoint(checkpoint, tmp_path / "damaged.pt")
    with pytest.raises(ck.CheckpointError) as refusal:
        ck.load_for_resume(tmp_path / "damaged.pt")
    assert str(refusal.value).startswith(f"{tmp_path / 'damaged.pt'}: ") and message in str(refusal.value)


def test_weights_holding_nan_are_refused_unless_asked_for(tmp_path):
    model = small_model()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    ck.save_checkpoint({"model_state_dict": model.state_dict(), "epoch": 0}, tmp_path / "nan.pt")
    with pytest.raises(ck.CheckpointError, match=r"1 weight tensors hold NaN or inf \(e.g. 0.weight\)"):
        ck.load_for_resume(tmp_path / "nan.pt")
    assert torch.isnan(ck.load_for_resume(tmp_path / "nan.pt", allow_nonfinite=True)["model_state_dict"]["0.weight"]).any()


def test_a_plain_pickle_is_refused_without_inviting_unsafe_loading(tmp_path):
    import pickle

    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}, protocol=4))
    with pytest.raises(ck.CheckpointError) as refusal:
        ck.load_checkpoint(path)
    assert "not a PyTorch checkpoint that loads safely" in str(refusal.value)
    assert "weights_only=False" not in str(refusal.value)


def test_convert_refuses_a_full_checkpoint_rather_than_dropping_its_state(tmp_path, capsys):
    model = small_model()
    optimizer, scaler = trained(model)
    ck.save_checkpoint(checkpoint_of(model, optimizer, scaler), tmp_path / "full.pt")
    assert ck.main(["convert", str(tmp_path / "full.pt"), str(tmp_path / "out.pt")]) == 2
    assert "is already a full training checkpoint" in capsys.readouterr().err and not (tmp_path / "out.pt").exists()


def test_convert_trust_unpickles_a_file_safe_loading_refuses(tmp_path):
    weights = small_model().state_dict()
    torch.save({"state_dict": weights, "args": argparse.Namespace(lr=1)}, tmp_path / "old.pt")
    with pytest.raises(ck.CheckpointError, match="refused: loading it would need unsafe unpickling"):
        ck.load_checkpoint(tmp_path / "old.pt")
    assert ck.main(["convert", "--trust", str(tmp_path / "old.pt"), str(tmp_path / "new.pt")]) == 0
    assert_same_tensors(ck.load_checkpoint(tmp_path / "new.pt")["model_state_dict"], weights)


def test_restored_optimizer_state_takes_the_strides_of_channels_last_weights(tmp_path):
    conv = nn.Conv2d(3, 4, 3)
    optimizer = torch.optim.AdamW(conv.parameters(), lr=1e-2)
    conv(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    ck.save_checkpoint({"model_state_dict": conv.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
                        "epoch": 0}, tmp_path / "contiguous.pt")  # written by a run whose weights were contiguous
    resumed = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)  # as CUDA runs hold their CNN weights
    fresh = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    lines: list[str] = []
    ck.restore_training_state(ck.load_checkpoint(tmp_path / "contiguous.pt"), tmp_path / "contiguous.pt", resumed,
                              fresh, torch.amp.GradScaler("cpu", enabled=False), "fp32", {}, TrainState(), lines.append)
    state = fresh.state[resumed.weight]
    assert "✓ Optimizer state loaded" in lines
    assert state["exp_avg"].stride() == state["exp_avg_sq"].stride() == resumed.weight.stride()
    assert torch.equal(state["exp_avg"], optimizer.state[conv.weight]["exp_avg"])


def test_a_snapshot_keeps_the_strides_of_channels_last_tensors(tmp_path):
    weight = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    checkpointer = ck.Checkpointer(savedir=tmp_path, background=True)
    checkpointer.save({"w": weight}, [ck.LAST])
    checkpointer.close()
    saved = ck.load_checkpoint(tmp_path / ck.LAST)["w"]
    assert saved.stride() == weight.stride() and torch.equal(saved, weight)
