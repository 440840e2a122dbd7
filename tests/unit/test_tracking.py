"""The trackers without a run: the run log fans every scalar out to each of them, a failing one is dropped with one
⚠ line, metrics.jsonl's rows and its purge on resume, MLflow's skipping of steps its run already holds, and the
--report_to option."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
import types

import pytest

from brain_trainer import tracking
from brain_trainer.build import Resume
from brain_trainer.config import ConfigError, check_settings, parse_args, resolve_settings
from brain_trainer.run_log import RunLog
from brain_trainer.tracking import TrackedRun, Tracker, Trackers, open_trackers
from brain_trainer.tracking.files import METRICS_FILE, JsonlTracker
from brain_trainer.tracking.mlflow_tracker import MLflowTracker, mlflow_key

TIMED = ("train/samples_per_sec", "train/data_wait", "train/ckpt_stall_ms")  # wall-clock: differ run to run


class Recording(Tracker):
    """A tracker that keeps what it is handed; `fail_at` makes its log raise from that step on."""

    name, title = "recording", "Recording"

    def __init__(self, fail_at: int | None = None):
        self.calls, self.fail_at = [], fail_at

    def log(self, values, step, epoch):
        if self.fail_at is not None and step >= self.fail_at:
            raise ConnectionError("the server went away\nand a second line nobody needs")
        self.calls.append(("log", dict(values), step, epoch))

    def image(self, tag, image, step):
        self.calls.append(("image", tag, step))

    def summary(self, values):
        self.calls.append(("summary", dict(values)))

    def close(self, outcome):
        self.calls.append(("close", outcome))


def logging_to(*trackers: Tracker) -> tuple[RunLog, list[str]]:
    printed: list[str] = []
    log = RunLog()
    log.print = printed.append
    log.trackers = Trackers(list(trackers), warn=log.print)
    return log, printed


def tracked(logdir, purge_step: int = 0) -> TrackedRun:
    return TrackedRun(logdir=str(logdir), folder="ckpt", run_name=None, purge_step=purge_step)


# ----------------------------------------------------------------------------- the fan-out


def test_the_run_log_hands_every_scalar_image_and_summary_to_each_tracker_and_closes_them_with_the_outcome():
    first, second = Recording(), Recording()
    log, _ = logging_to(first, second)
    log.scalars({"train/loss": 1.5}, 3, 0)
    log.image("val/retrieval", object(), 8)
    log.summary(savedir="s3://bucket/run", files=["last_brain_v2.pt"], seconds=1)
    log.close()
    for tracker in (first, second):
        assert tracker.calls == [
            ("log", {"train/loss": 1.5}, 3, 0),
            ("image", "val/retrieval", 8),
            ("summary", {"checkpoint/last_brain_v2.pt": "s3://bucket/run/last_brain_v2.pt"}),
            ("close", "finished"),
        ]


@pytest.mark.parametrize("report, outcome", [("stopped", "stopped"), (None, "failed")])
def test_a_stopped_or_failed_run_closes_its_trackers_as_such(report, outcome):
    tracker = Recording()
    log, _ = logging_to(tracker)
    if report:
        log.stopped(signum=15, where="at step 3", path="last.pt", argv=(), world_size=1, program=("brain-trainer",))
    log.close()
    assert tracker.calls[-1] == ("close", outcome)


def test_a_tracker_that_fails_mid_run_is_dropped_with_one_warning_and_the_others_keep_everything():
    failing, keeper = Recording(fail_at=2), Recording()
    keeper.title = "metrics.jsonl"
    log, printed = logging_to(failing, keeper)
    for step in range(1, 5):
        log.scalars({"train/loss": float(step)}, step, 0)
    log.close()
    assert printed == [
        "⚠ Recording failed (the server went away): the run goes on without it, logging to metrics.jsonl"
    ]
    assert failing.calls == [("log", {"train/loss": 1.0}, 1, 0)]  # nothing after the failure, not even close
    assert [call[2] for call in keeper.calls if call[0] == "log"] == [1, 2, 3, 4]


def test_a_tracker_that_draws_from_pythons_rng_leaves_it_as_it_was():
    class Drawing(Recording):
        def log(self, values, step, epoch):
            random.random()  # as MLflow does when it makes a run

    random.seed(7)
    expected = random.getstate()
    log, _ = logging_to(Drawing())
    log.scalars({"train/loss": 1.0}, 1, 0)
    assert random.getstate() == expected


def test_when_a_tracker_cannot_start_the_ones_already_open_are_closed_as_failed(tmp_path, monkeypatch):
    opened = Recording()

    class Unreachable(Recording):
        @classmethod
        def open(cls, run, warn):
            raise ConfigError("--report_to mlflow: cannot use the MLflow store http://nowhere")

    monkeypatch.setattr(Recording, "open", classmethod(lambda cls, run, warn: opened))
    module = types.ModuleType("two_trackers")
    module.First, module.Second = Recording, Unreachable
    monkeypatch.setitem(sys.modules, "two_trackers", module)
    monkeypatch.setattr(tracking, "TRACKERS", {"first": "two_trackers:First", "second": "two_trackers:Second"})
    with pytest.raises(ConfigError, match="cannot use the MLflow store"):
        open_trackers(("first", "second"), tracked(tmp_path))
    assert opened.calls == [("close", "failed")]


# ----------------------------------------------------------------------------- metrics.jsonl


def rows(logdir) -> list[dict]:
    return [json.loads(line) for line in (logdir / METRICS_FILE).read_text().splitlines()]


def log_steps(tracker: JsonlTracker, steps: range, epoch_end: int = 4) -> None:
    """What the loop logs: the train scalars each step, at the epoch's last step the evaluation and a save."""
    for step in steps:
        tracker.log({"train/loss": 1 / step, "train/samples_per_sec": 100.0 + step}, step, (step - 1) // epoch_end)
        if step % epoch_end == 0:
            tracker.log({"val/loss": 2 / step}, step, (step - 1) // epoch_end)
            tracker.log({"train/ckpt_stall_ms": 3.0}, step, step // epoch_end)


def test_metrics_jsonl_holds_one_row_a_step_with_every_scalar_logged_at_it(tmp_path):
    tracker = JsonlTracker.open(tracked(tmp_path), print)
    log_steps(tracker, range(1, 5))
    assert rows(tmp_path)[2] == {"step": 3, "epoch": 0, "train/loss": 1 / 3, "train/samples_per_sec": 103.0}
    assert rows(tmp_path)[3] == {
        "step": 4,
        "epoch": 0,  # the epoch the step belongs to, though the save after it counts the next
        "train/loss": 0.25,
        "train/samples_per_sec": 104.0,
        "val/loss": 0.5,
        "train/ckpt_stall_ms": 3.0,
    }
    assert len(rows(tmp_path)) == 4  # each row is in the file as soon as it is logged, without a close


@pytest.mark.parametrize("checkpoint_step", [2, 4, 6])
def test_a_resume_drops_the_rows_past_its_checkpoint_so_the_file_equals_the_uninterrupted_one(
    tmp_path, checkpoint_step
):
    (tmp_path / "uninterrupted").mkdir(), (tmp_path / "resumed").mkdir()
    uninterrupted = JsonlTracker.open(tracked(tmp_path / "uninterrupted"), print)
    log_steps(uninterrupted, range(1, 9))
    killed = JsonlTracker.open(tracked(tmp_path / "resumed"), print)
    log_steps(killed, range(1, checkpoint_step + 3))  # logged past the checkpoint, then killed (no close)
    resumed = JsonlTracker.open(tracked(tmp_path / "resumed", purge_step=checkpoint_step + 1), print)
    assert [row["step"] for row in rows(tmp_path / "resumed")] == list(range(1, checkpoint_step + 1))
    log_steps(resumed, range(checkpoint_step + 1, 9))
    timeless = lambda folder: [{k: v for k, v in row.items() if k not in TIMED} for row in rows(folder)]
    assert timeless(tmp_path / "resumed") == timeless(tmp_path / "uninterrupted")


def test_a_step_logged_again_after_a_resume_joins_the_row_the_file_kept(tmp_path):
    """A stop at an epoch's last step saves before the evaluation; the resume evaluates at that same step."""
    stopped = JsonlTracker.open(tracked(tmp_path), print)
    stopped.log({"train/loss": 0.25}, 4, 0)
    stopped.close("stopped")
    resumed = JsonlTracker.open(tracked(tmp_path, purge_step=5), print)
    resumed.log({"val/loss": 0.5}, 4, 0)
    assert rows(tmp_path) == [{"step": 4, "epoch": 0, "train/loss": 0.25, "val/loss": 0.5}]


def test_a_fresh_run_starts_the_file_afresh(tmp_path):
    log_steps(JsonlTracker.open(tracked(tmp_path), print), range(1, 5))
    JsonlTracker.open(tracked(tmp_path, purge_step=0), print).close("finished")
    assert (tmp_path / METRICS_FILE).read_text() == ""


def test_a_row_cut_short_by_a_crash_is_dropped_with_one_warning(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "epoch": 0}\n{"step": 2, "ep')
    printed = []
    JsonlTracker.open(tracked(tmp_path, purge_step=5), printed.append)
    assert rows(tmp_path) == [{"step": 1, "epoch": 0}]
    assert printed == [f"⚠ {tmp_path / METRICS_FILE}: line 2 is not a whole row (a crash while it was written?): "
                       "dropped, with the 0 after it"]  # fmt: skip


def test_a_link_planted_at_metrics_jsonl_is_refused_in_one_line_and_its_target_untouched(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / METRICS_FILE).symlink_to(target)
    with pytest.raises(ConfigError) as refused:
        JsonlTracker.open(tracked(tmp_path / "runs"), print)
    assert str(refused.value) == (
        f"--logdir {tmp_path / 'runs'}: metrics.jsonl is a symbolic link; remove it (or leave jsonl out of --report_to)"
    )
    assert target.read_text() == "keep me\n"


# ----------------------------------------------------------------------------- MLflow without a store


class FakeClient:
    def __init__(self):
        self.batches = []

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self.batches.append([(metric.key, metric.step, metric.value) for metric in metrics])


def test_a_reattached_mlflow_run_gets_only_the_steps_above_the_highest_it_holds_of_each_metric():
    client = FakeClient()
    tracker = MLflowTracker(client, "run", uri="sqlite://", experiment="ckpt", logged_to={"train/loss": 5})
    tracker.log({"train/loss": 1.0, "train/ckpt_stall_ms": 2.0}, 5, 0)  # replayed: the loss is there already
    tracker.log({"train/loss": 1.0}, 6, 0)
    assert client.batches == [[("train/ckpt_stall_ms", 5, 2.0)], [("train/loss", 6, 1.0)]]


def test_mlflow_gets_recall_names_it_accepts():
    assert mlflow_key("val/i2t_R@10") == "val/i2t_R_at_10" and mlflow_key("train/loss") == "train/loss"


# ----------------------------------------------------------------------------- the checkpoint's record, the option


def test_a_checkpoint_without_tracker_runs_resumes_with_none_and_one_with_them_hands_them_on():
    old = Resume("last.pt", {"run": {"id": "a", "parent": None, "started_ns": 1}}, [])
    old.drop_checkpoint()
    new = Resume("last.pt", {"run": {"id": "b", "trackers": {"mlflow": "0f3e", "wandb": "x1y2"}}}, [])
    new.drop_checkpoint()
    assert (old.parent, old.trackers) == ("a", {})
    assert (new.parent, new.trackers) == ("b", {"mlflow": "0f3e", "wandb": "x1y2"})


def test_report_to_defaults_to_tensorboard_and_jsonl_and_takes_a_comma_list_or_none():
    report_to = lambda *argv: parse_args(list(argv)).options.report_to
    assert report_to() == ("tensorboard", "jsonl")
    assert report_to("--report_to", "mlflow, wandb,mlflow") == ("mlflow", "wandb")
    assert report_to("--report_to", "none") == ()


@pytest.mark.parametrize(
    "value, says",
    [("tensorbord", "'tensorbord' is not a tracker; name some of tensorboard, jsonl, mlflow, wandb, or none"),
     ("none,jsonl", "'none,jsonl': give a comma list such as tensorboard,mlflow, or none alone")],
)  # fmt: skip
def test_a_bad_report_to_is_one_line_and_exit_2(value, says, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args(["--report_to", value])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err == f"Error: argument --report_to: {says} (see --help)\n"


def test_a_tracker_whose_library_is_missing_names_the_extra_that_brings_it(monkeypatch):
    command = parse_args(["--demo", "--report_to", "jsonl,wandb"])
    model_config, settings, _, _ = resolve_settings(command.given, None, demo=True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else real_find_spec(name))
    with pytest.raises(ConfigError) as refused:
        check_settings(command.options, model_config, settings)
    assert (
        str(refused.value) == "--report_to wandb: Weights & Biases is not installed: pip install 'brain-trainer[wandb]'"
    )
