"""The runtime with one process: every collective is the identity; precision resolves once; the stop flag."""

from __future__ import annotations

import signal

import torch

from brain_trainer.runtime import STOP_SIGNALS, Runtime


def one_process() -> Runtime:
    return Runtime(device=torch.device("cpu"))


def test_with_one_process_every_collective_is_the_identity():
    runtime = one_process()
    try:
        tensor = torch.arange(6.0).reshape(3, 2)
        assert runtime.all_gather(tensor) is tensor
        assert runtime.gather_shards(tensor, 3) is tensor and runtime.shard(3) == range(0, 3)
        assert runtime.sum(2.5) == 2.5 and runtime.mean(2.5) == 2.5
        assert runtime.gather_objects({"a": 1}) == [{"a": 1}] and runtime.broadcast("x") == "x"
        assert runtime.on_main(lambda: 7) == 7 and runtime.is_main
        assert runtime.agree_to_stop() == (None, False) and runtime.agree_to_stop(True) == (None, True)
    finally:
        runtime.close()


def test_shards_cover_a_set_that_does_not_divide_exactly_once():
    shards = []
    for rank in range(3):  # the runtime each of three processes holds (no process group is needed to shard)
        runtime = Runtime(device=torch.device("cpu"), rank=rank, world_size=3)
        try:
            shards.append(list(runtime.shard(10)))
        finally:
            runtime.close()
    assert shards == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_precision_resolves_to_autocast_and_a_scaler_only_for_fp16():
    runtime = one_process()
    try:
        _, fp32_scaler = runtime.precision("fp32")
        assert not fp32_scaler.is_enabled()
        bf16_autocast, bf16_scaler = runtime.precision("bf16")
        assert not bf16_scaler.is_enabled()
        with bf16_autocast():
            assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16
        _, fp16_scaler = runtime.precision("fp16")
        assert fp16_scaler.is_enabled()
    finally:
        runtime.close()


def test_a_stop_signal_is_held_until_the_step_boundary_and_handlers_are_restored():
    before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    runtime = one_process()
    try:
        signal.raise_signal(signal.SIGUSR1)
        assert runtime.stop.signum == signal.SIGUSR1 and runtime.agree_to_stop() == (signal.SIGUSR1, False)
    finally:
        runtime.close()
        after = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
        for signum, handler in before.items():  # whatever close did, the next test finds the handlers it had
            signal.signal(signum, handler)
    assert after == before
