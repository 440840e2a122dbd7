"""The loop's pieces: the schedule, the train state's round trip, and the real optimisation step of a Trainer
assembled as the CLI assembles it, in each precision."""

from __future__ import annotations

import contextlib
import math
import sys

import pytest
import torch
from helpers import run_args

from brain_trainer import build
from brain_trainer.checkpointing import train_state_fields, train_state_of
from brain_trainer.config import TrainSettings, parse_args
from brain_trainer.run_log import RunLog
from brain_trainer.runtime import Runtime
from brain_trainer.trainer import TrainingError, TrainState, learning_rate


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    settings = TrainSettings(lr=1e-3, warmup_steps=9, min_lr_ratio=0.1)
    assert learning_rate(0, settings, 100) == pytest.approx(1e-4)
    assert learning_rate(8, settings, 100) == pytest.approx(9e-4)
    assert learning_rate(9, settings, 100) == pytest.approx(1e-3)
    assert learning_rate(100, settings, 100) == pytest.approx(1e-4)
    middle = 9 + (100 - 9) / 2
    assert learning_rate(middle, settings, 100) == pytest.approx(1e-4 + 0.5 * 9e-4)


def test_train_state_saves_into_the_file_layout_clobbers_loads_and_is_equal():
    state = TrainState(
        epoch=3,
        samples_seen=40,
        global_step=77,
        best_val=0.5,
        val_loss=0.6,
        skipped_images=2,
        epoch_loss_sum=12.25,
        epoch_loss_steps=5,
    )
    fields = train_state_fields(state.state_dict())
    assert fields["epoch"] == 2 and fields["data_state"]["epoch"] == 3, "the file's `epoch` is the last completed one"
    restored = TrainState(epoch=9, global_step=1)
    restored.load_state_dict(train_state_of(fields))
    assert restored == state and restored.epoch_loss() == pytest.approx(2.45)


def test_a_checkpoint_without_a_data_position_resumes_at_the_next_epoch_start():
    restored = TrainState()
    restored.load_state_dict(train_state_of({"epoch": 4, "global_step": 50, "best_val": None}))
    assert (restored.epoch, restored.samples_seen, restored.global_step) == (5, 0, 50)


@pytest.fixture
def runtime():
    runtime = Runtime.start("cpu")
    yield runtime
    runtime.close()


@pytest.fixture
def assembled_trainer():
    """Makes a Trainer by the CLI's own build (nothing re-implemented), closed with the test."""
    with contextlib.ExitStack() as held:

        def assemble(runtime: Runtime, *argv: str):
            return held.enter_context(build.build(parse_args(list(argv)), runtime, RunLog(enabled=False))).trainer

        yield assemble


@pytest.mark.parametrize(
    "precision, computed_in", [("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)]
)
def test_the_real_step_computes_in_its_precision_and_updates_the_weights(
    sample_root, tmp_path, runtime, precision, computed_in, assembled_trainer
):
    """On the CPU too, fp16 is real: the layers compute in float16 and the GradScaler is on. A step whose scaled
    gradients overflow changes no weight and halves the scale; a step that does not overflow updates the weights."""
    trainer = assembled_trainer(runtime, *run_args(sample_root, tmp_path, "--precision", precision, "--dropout", "0"))
    dtypes = set()
    for module in trainer.model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            module.register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
    batch = next(iter(trainer.loaders.train))
    updates = 0
    for _ in range(6):  # fp16's first steps may overflow at the initial scale: the scaler skips them and backs off
        before = [p.detach().clone() for p in trainer.model.parameters()]
        scale = trainer.scaler.get_scale() if trainer.scaler.is_enabled() else None
        loss, grad_norm = trainer.step(batch)
        assert math.isfinite(loss)
        changed = sum(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))
        if math.isfinite(grad_norm.item()):
            assert changed > len(before) // 2, "a step without overflow updates the weights"
            updates += 1
        else:
            assert precision == "fp16", "only fp16 overflows"
            assert changed == 0, "the scaler skips the step whose gradients overflowed"
            assert trainer.scaler.get_scale() == scale / 2, "and halves its scale"
    assert dtypes == {computed_in}
    assert updates >= 1
    assert trainer.scaler.is_enabled() == (precision == "fp16")
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(
        learning_rate(0, trainer.settings, trainer.total_steps)
    )


def test_weights_that_turned_nan_are_never_saved(sample_root, tmp_path, runtime, assembled_trainer):
    trainer = assembled_trainer(runtime, *run_args(sample_root, tmp_path))
    with torch.no_grad():
        trainer.model.logit_scale.fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"the weights hold NaN or inf at step 0; not saved"):
        trainer.save()
    trainer.checkpointer.close()
    assert not (tmp_path / "ckpt" / "last_brain_v2.pt").exists()


DEVICE_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


@pytest.mark.parametrize("accum_steps", ["1", "2"])
def test_the_step_reads_nothing_back_from_the_device(
    sample_root, tmp_path, runtime, monkeypatch, accum_steps, assembled_trainer
):
    """Every read of a tensor's value by the project's code is a host-device sync on a GPU: none in a step."""
    trainer = assembled_trainer(runtime, *run_args(sample_root, tmp_path, "--accum_steps", accum_steps))
    batch = next(iter(trainer.loaders.train))
    reads = []
    for name in DEVICE_READS:

        def spy(self, *args, _original=getattr(torch.Tensor, name), _name=name, **kwargs):
            caller = sys._getframe(1)
            if "brain_trainer" in caller.f_code.co_filename:
                reads.append(f"{_name} at {caller.f_code.co_filename}:{caller.f_lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    for _ in range(2):
        loss, grad_norm = trainer.step(batch)
    monkeypatch.undo()
    assert reads == []
    assert loss.dim() == 0 and math.isfinite(loss.item()) and math.isfinite(grad_norm.item())


def test_a_non_finite_loss_is_read_at_the_next_log_step_and_named_by_its_step(
    sample_root, tmp_path, runtime, assembled_trainer
):
    trainer = assembled_trainer(runtime, *run_args(sample_root, tmp_path, "--log_every", "4"))
    loss, calls = trainer.loss, []

    def poisoned(*outputs):
        calls.append(1)
        return loss(*outputs) * (float("nan") if len(calls) == 2 else 1.0)

    trainer.loss = poisoned
    with pytest.raises(TrainingError, match=r"^loss is nan at step 2 \(fp32\); lower --lr"):
        trainer.train_epoch()
    assert trainer.state.global_step == 4, "read at the log step, without a sync at the bad step"
    assert trainer.state.epoch_loss_steps == 1, "only the good step before it counts"
    trainer.checkpointer.close()
    assert not (tmp_path / "ckpt" / "last_brain_v2.pt").exists()
