"""The file's schema: what a checkpoint holds, RNG capture and restore, weight-key normalisation, and the
mapping between TrainState and the file's fields."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import torch
from checkpoint_helpers import checkpoint_of, small_model, train_briefly
from torch import nn

from brain_trainer import checkpointing as ck
from brain_trainer.trainer import TrainState


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    ck.save_checkpoint({"rng_state": ck.capture_rng_state()}, str(tmp_path / "rng.pt"))
    expected = (random.random(), np.random.normal(), torch.rand(3))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    ck.restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng_state"])
    got = (random.random(), np.random.normal(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_capturing_the_rng_draws_nothing_from_python_numpy_or_torch():
    def draws():
        return random.random(), float(np.random.random()), torch.rand(1).item()

    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    ck.capture_rng_state()
    after_capture = draws()
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    assert after_capture == draws()


def test_a_checkpoint_holds_plain_types_under_the_plain_module_names(tmp_path):
    model = small_model()
    optimizer, scaler = train_briefly(model)
    path = str(tmp_path / ck.LAST)
    ck.save_checkpoint(checkpoint_of(model, optimizer, scaler), path)
    loaded = torch.load(path, weights_only=True)  # plain types only, or this raises
    assert loaded["format_version"] == ck.FORMAT_VERSION == 3 and loaded["epoch"] == 4 and loaded["global_step"] == 123
    assert list(loaded["model_state_dict"]) == list(model.state_dict())
    assert isinstance(loaded["config"], dict) and "scaler_state_dict" in loaded
    assert len(loaded["rng_state"]) == loaded["world_size"] == 1
    assert set(loaded["rng_state"][0]) == {"python", "numpy", "torch", "cuda"}
    assert set(loaded["versions"]) == {"torch", "transformers"} and loaded["created"]


def test_a_checkpoint_without_loss_scaling_holds_no_scaler_state():
    model = small_model()
    optimizer, _ = train_briefly(model)
    checkpoint = checkpoint_of(model, optimizer, torch.amp.GradScaler("cpu", enabled=False))
    assert "scaler_state_dict" not in checkpoint


def test_wrapper_prefixes_are_dropped_from_weight_names():
    weights = small_model().state_dict()
    wrapped = nn.DataParallel(small_model()).state_dict()
    assert all(key.startswith("module.") for key in wrapped)
    assert list(ck.normalize_keys(wrapped)) == list(weights)
    assert list(ck.normalize_keys({"module._orig_mod.0.weight": 1, "_orig_mod.2.bias": 2})) == ["0.weight", "2.bias"]
    assert list(ck.model_weights({"model_state_dict": wrapped, "epoch": 0}, "x.pt")) == list(weights)


def test_the_file_says_the_last_completed_epoch_and_where_training_stands_in_the_next():
    state = TrainState(
        epoch=3,
        samples_seen=40,
        global_step=77,
        best_val=0.5,
        val_loss=0.6,
        skipped_images=2,
        epoch_loss_sum=12.5,
        epoch_loss_steps=5,
    )
    fields = ck.train_state_fields(state.state_dict())
    assert fields["epoch"] == 2 and fields["global_step"] == 77
    assert fields["data_state"] == {
        "epoch": 3,
        "samples_seen": 40,
        "skipped_images": 2,
        "epoch_loss_sum": 12.5,
        "epoch_loss_steps": 5,
    }
    restored = TrainState()
    restored.load_state_dict(ck.train_state_of(fields))
    assert restored == state


def test_train_state_state_dict_holds_its_own_fields_by_name():
    state = TrainState(epoch=2, samples_seen=8)
    assert state.state_dict() == dataclasses.asdict(state)
    assert set(state.state_dict()) == {field.name for field in dataclasses.fields(TrainState)}


def test_a_format_2_file_without_data_state_starts_the_next_epoch_at_its_first_sample():
    restored = TrainState()
    restored.load_state_dict(ck.train_state_of({"epoch": 4, "global_step": 50, "best_val": 0.3}))
    assert (restored.epoch, restored.samples_seen, restored.global_step, restored.best_val) == (5, 0, 50, 0.3)


def test_a_format_2_rng_state_is_one_process_and_format_3_one_per_rank():
    state = ck.capture_rng_state()
    assert ck.rng_states_of({"rng_state": state}) == [state]
    assert ck.rng_states_of({"rng_state": [state, state]}) == [state, state]
    assert ck.rng_states_of({}) == []
