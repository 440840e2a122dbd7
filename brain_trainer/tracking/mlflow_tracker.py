"""MLflow (`--report_to mlflow`): the store is MLflow's own setting, MLFLOW_TRACKING_URI (a server, or
sqlite:///path/mlflow.db); the experiment is MLFLOW_EXPERIMENT_NAME, else the run's folder name.

One MLflow run per training run: the checkpoint records its id and a resume reattaches it. MLflow keeps every
value logged at a step, so a step replayed after a resume (logged before a kill, past the checkpoint) would be
a duplicate: at reattach the tracker asks the run's history once for the highest step of each metric and logs
only steps above it. The replayed values are the ones already there, bit for bit (the resume is exact), so
nothing is lost.
"""

from __future__ import annotations

import os
import re
import time

from brain_trainer.config import ConfigError
from brain_trainer.tracking import TrackedRun, Tracker, Warn, one_line

STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}
TURN_OFF = "or leave mlflow out of --report_to"


def mlflow_key(name: str) -> str:
    """MLflow's names admit letters, digits, `_-. :/` only: `val/i2t_R@1` is logged as `val/i2t_R_at_1`."""
    return re.sub(r"[^/\w.\- :]", "_", name.replace("@", "_at_"))


class MLflowTracker(Tracker):
    name, title = "mlflow", "MLflow"

    def __init__(self, client, run_id: str, *, uri: str, experiment: str, logged_to: dict[str, int] | None = None):
        self.client, self.run_id, self.uri, self.experiment = client, run_id, uri, experiment
        self.reattached = logged_to is not None
        self.logged_to = logged_to or {}  # a reattached run's highest step, by metric

    @classmethod
    def open(cls, run: TrackedRun, warn: Warn) -> MLflowTracker:
        try:
            import mlflow
            from mlflow import MlflowClient
        except ImportError as error:
            raise ConfigError(f"--report_to mlflow: {one_line(error)}: pip install 'brain-trainer[mlflow]'") from None
        uri = mlflow.get_tracking_uri()
        try:
            client = MlflowClient(uri)
            found = _active_run(client, run.run_ids.get("mlflow"))
            if found is not None:
                client.update_run(found.info.run_id, status="RUNNING")
                experiment = client.get_experiment(found.info.experiment_id).name
                return cls(client, found.info.run_id, uri=uri, experiment=experiment, logged_to=_steps(client, found))
            if "mlflow" in run.run_ids:
                warn(f"⚠ MLflow run {run.run_ids['mlflow']} (the checkpoint's) is not in {uri}: starting a new one")
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or run.folder
            existing = client.get_experiment_by_name(experiment)
            experiment_id = existing.experiment_id if existing else client.create_experiment(experiment)
            created = client.create_run(experiment_id, run_name=run.run_name)
            return cls(client, created.info.run_id, uri=uri, experiment=experiment)
        except Exception as error:  # a server that does not answer, a store that cannot be written, a bad URI
            hint = " (a sqlite store needs sqlalchemy and alembic)" if isinstance(error, ImportError) else ""
            raise ConfigError(
                f"--report_to mlflow: cannot use the MLflow store {uri} ({one_line(error)}){hint}; "
                f"set MLFLOW_TRACKING_URI to one that works, {TURN_OFF}"
            ) from None

    def log(self, values: dict[str, float], step: int, epoch: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), now, step)
            for key, value in ((mlflow_key(name), value) for name, value in values.items())
            if step > self.logged_to.get(key, -1)
        ]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def config(self, config: dict, step: int) -> None:
        """Parameters, once per MLflow run (MLflow refuses to change one): a reattached run keeps its own."""
        from mlflow.entities import Param

        if not self.reattached:
            self.client.log_batch(self.run_id, params=[Param(key, str(value)) for key, value in sorted(config.items())])

    def summary(self, values: dict[str, float | str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(mlflow_key(key), str(value)) for key, value in values.items()])

    def where(self) -> str:
        return f"MLflow: run {self.run_id} of experiment {self.experiment!r} in {self.uri}"

    def close(self, outcome: str) -> None:
        self.client.set_terminated(self.run_id, STATUS[outcome])


def _active_run(client, run_id: str | None):
    """The checkpoint's MLflow run, or None where the store has no such run (or it was deleted)."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        found = client.get_run(run_id)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return found if found.info.lifecycle_stage == "active" else None


def _steps(client, found) -> dict[str, int]:
    """The highest step the run holds of each of its metrics: one history query per metric, at reattach."""
    return {
        key: max(metric.step for metric in client.get_metric_history(found.info.run_id, key))
        for key in found.data.metrics
    }
