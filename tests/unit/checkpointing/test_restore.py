"""Restoring a run: save -> clobber -> load -> equal for weights, optimizer, scaler and position; the resume
guide's ✓/⚠ lines for full, legacy, partial and foreign files; optimizer state in the weights' layout."""

from __future__ import annotations

import pytest
import torch
from checkpoint_helpers import assert_bitwise_equal, checkpoint_of, restore, small_model, train_briefly
from torch import nn

from brain_trainer import checkpointing as ck
from brain_trainer.run_log import RULE, RunLog
from brain_trainer.trainer import TrainState


def test_a_round_trip_restores_model_optimizer_scaler_and_position(tmp_path):
    model = small_model()
    optimizer, scaler = train_briefly(model)
    path = str(tmp_path / ck.LAST)
    ck.save_checkpoint(checkpoint_of(model, optimizer, scaler, samples_seen=24), path)
    saved_model, saved_optimizer, saved_scale = model.state_dict(), optimizer.state_dict(), scaler.get_scale()

    clobbered = small_model(seed=9)
    assert not torch.equal(clobbered[0].weight, model[0].weight)
    fresh_optimizer = torch.optim.AdamW(clobbered.parameters(), lr=1e-2)
    fresh_scaler = torch.amp.GradScaler("cpu", enabled=True)
    point = TrainState()
    lines = ck.restore_training_state(
        checkpoint=ck.load_for_resume(path),
        path=path,
        model=clobbered,
        optimizer=fresh_optimizer,
        scaler=fresh_scaler,
        precision="fp16",
        architecture={"d_shared": 8},
        state=point,
    )

    assert_bitwise_equal(clobbered.state_dict(), saved_model)
    assert_bitwise_equal(fresh_optimizer.state_dict(), saved_optimizer)
    assert fresh_scaler.get_scale() == saved_scale != 65536.0
    assert (point.epoch, point.samples_seen, point.global_step, point.best_val, point.val_loss) == (
        5,
        24,
        123,
        0.75,
        0.8,
    )
    assert "✓ Starting from epoch 5, sample 24 (mid-epoch)" in lines


def test_a_full_checkpoint_gives_every_line_of_the_guide_under_its_header(capsys):
    """The contract test of docs/resume.md: a full checkpoint gives exactly these ten lines."""
    model = small_model()
    optimizer, scaler = train_briefly(model)
    lines, _ = restore(
        checkpoint_of(model, optimizer, scaler, epoch=42, global_step=158250, best_val=0.2345), small_model(1)
    )
    assert lines == [
        "✓ New format checkpoint with full training state",
        "✓ Model state loaded (strict)",
        "✓ Optimizer state loaded",
        "✓ Starting from epoch 43",
        "✓ Global step restored to 158250",
        "✓ Best validation loss: 0.2345",
        "✓ GradScaler state loaded",
    ]
    capsys.readouterr()
    RunLog().resume_block(location="x.pt", lines=lines, checkpoint=None, overridden=[], fingerprint={})
    assert capsys.readouterr().out.splitlines() == [RULE, "Resuming from checkpoint: x.pt", RULE, *lines, RULE]


def test_restoring_prints_nothing(capsys):
    model = small_model()
    optimizer, scaler = train_briefly(model)
    restore(checkpoint_of(model, optimizer, scaler), small_model(1))
    assert capsys.readouterr() == ("", "")


def test_a_precision_change_drops_or_starts_the_scaler_with_a_warning():
    model = small_model()
    optimizer, scaler = train_briefly(model)
    to_bf16, _ = restore(checkpoint_of(model, optimizer, scaler), small_model(1), "bf16", scaler_enabled=False)
    assert to_bf16[-1] == "⚠ GradScaler state dropped: this run uses bf16, which needs no loss scaling"
    no_scaler = torch.amp.GradScaler("cpu", enabled=False)
    from_fp32 = checkpoint_of(model, optimizer, no_scaler, config={"precision": "fp32"})
    to_fp16, _ = restore(from_fp32, small_model(1), "fp16")
    assert to_fp16[-1] == "⚠ Fresh GradScaler: the checkpoint was trained in fp32"
    fp32_to_fp32, _ = restore(from_fp32, small_model(1), "fp32", scaler_enabled=False)
    assert not any("GradScaler" in line for line in fp32_to_fp32)


@pytest.mark.parametrize("variant", ["bare", "state_dict", "model", "module_prefix", "orig_mod_prefix"])
def test_legacy_weight_files_load_strictly_whatever_their_wrapping(variant):
    weights = small_model().state_dict()
    prefix = {"module_prefix": "module.", "orig_mod_prefix": "_orig_mod."}.get(variant, "")
    prefixed = {prefix + key: value for key, value in weights.items()}
    checkpoint = {variant: prefixed} if variant in ("state_dict", "model") else prefixed
    target = small_model(5)
    lines, point = restore(checkpoint, target)
    assert lines == [
        "✓ Old format checkpoint (model weights only)",
        "✓ Model state loaded (strict)",
        "⚠ Optimizer state not in checkpoint (starting fresh)",
        "⚠ Epoch unknown (starting from epoch 0)",
    ]
    assert_bitwise_equal(target.state_dict(), weights)
    assert (point.epoch, point.global_step, point.best_val) == (0, 0, None)


def test_a_legacy_file_with_extra_keys_and_a_changed_layer_loads_the_rest_non_strictly():
    old = small_model()
    weights = {**old.state_dict(), "extra.weight": torch.ones(2)}
    weights["2.weight"] = torch.ones(5, 8)  # the head had 5 classes then; now 3
    weights["2.bias"] = torch.ones(5)
    target = small_model(7)
    head_before = target[2].weight.clone()
    lines, _ = restore(weights, target)
    assert lines[1:4] == [
        "⚠ Strict loading failed: 1 unexpected keys, 2 shape mismatches",
        "  Attempting to load with strict=False...",
        "✓ Model state loaded (partial - may need fine-tuning)",
    ]
    assert any(line.startswith("  loaded 2/4 tensors") for line in lines)
    assert "  shape mismatch: 2.weight, 2.bias" in lines and "  unexpected: extra.weight" in lines
    assert torch.equal(target[0].weight, old[0].weight) and torch.equal(target[2].weight, head_before)


def test_load_model_weights_reports_what_it_loaded():
    old = small_model()
    weights = {key: value for key, value in old.state_dict().items() if key != "2.bias"}
    report = ck.load_model_weights(small_model(3), weights, "x.pt")
    assert not report.strict and report.loaded == 3 and report.missing == ["2.bias"]
    assert report.unexpected == report.mismatched == [] and 0.9 < report.loaded_fraction < 1.0
    assert report.lines[0] == "⚠ Strict loading failed: 1 missing keys" and "  missing: 2.bias" in report.lines
    assert ck.load_model_weights(small_model(3), old.state_dict(), "x.pt").lines == ["✓ Model state loaded (strict)"]


def test_a_file_that_matches_nothing_is_refused():
    with pytest.raises(
        ck.CheckpointError, match=r"^x.pt: none of its 1 tensors match this model \(e.g. encoder.layer.weight\)"
    ):
        restore({"encoder.layer.weight": torch.ones(3)}, small_model())


def test_a_different_architecture_warns_loads_non_strictly_and_skips_the_optimizer():
    model = small_model()
    optimizer, scaler = train_briefly(model)
    bigger = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5))
    lines, point = restore(checkpoint_of(model, optimizer, scaler), bigger, architecture={"d_shared": 16})
    assert "⚠ Architecture differs from the checkpoint: d_shared 8 -> 16" in lines
    assert "⚠ Optimizer state not loaded: the model's parameters differ from the checkpoint's (starting fresh)" in lines
    assert torch.equal(bigger[0].weight, model[0].weight) and point.global_step == 123


def test_restored_optimizer_state_takes_the_strides_of_channels_last_weights(tmp_path):
    conv = nn.Conv2d(3, 4, 3)
    optimizer = torch.optim.AdamW(conv.parameters(), lr=1e-2)
    conv(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    path = str(tmp_path / "contiguous.pt")
    ck.save_checkpoint(
        {"model_state_dict": conv.state_dict(), "optimizer_state_dict": optimizer.state_dict(), "epoch": 0}, path
    )  # written by a run whose weights were contiguous
    resumed = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)  # as CUDA runs hold their CNN weights
    fresh = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    lines = ck.restore_training_state(
        checkpoint=ck.load_checkpoint(path),
        path=path,
        model=resumed,
        optimizer=fresh,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        precision="fp32",
        architecture={},
        state=TrainState(),
    )
    state = fresh.state[resumed.weight]
    assert "✓ Optimizer state loaded" in lines
    assert resumed.weight.stride() != conv.weight.stride()
    assert state["exp_avg"].stride() == state["exp_avg_sq"].stride() == resumed.weight.stride()
    assert torch.equal(state["exp_avg"], optimizer.state[conv.weight]["exp_avg"])
