"""Experiment tracking in MLflow (the optional extra `lits[mlflow]`): a training run's parameters,
its metrics epoch by epoch, curves.png and the exported model.

- Where: `Tracking.uri`, any MLflow tracking URI (sqlite:///…, http(s)://…); train.py's `--mlflow`
  alone keeps a sqlite store in the run folder, OUT/mlflow.db, its artifacts beside it in
  OUT/mlartifacts/ (a local OUT only: sqlite needs a local file).
- When: the parameters (the TrainConfig) as the run starts, on the driver; each epoch's metrics live,
  by `EpochLogger`, a Ray Train V2 UserCallback that Ray Train's controller (an actor on the driver's
  node) calls once every worker has reported the epoch, at step = the epoch (1-based, as in
  metrics.csv); curves.png and model/ (weights.pt, config.json) as artifacts once the model is
  exported, on the driver. Ray 2.60's MLflowLoggerCallback is a Ray Tune callback, which Train V2
  refuses.
- Resume: the run is tagged `lits.run` = OUT/<name>; re-running the same name and output continues the
  same MLflow run (parameters that changed, e.g. --epochs, are recorded as `lits.resumed.<key>` tags:
  MLflow keeps a parameter's first value). Epochs a restarted worker group trains again are logged
  again at their step, as metrics.csv rewrites their rows.
- Failures of the tracking server while training are logged as warnings: tracking never stops a run.

mlflow is imported inside the functions: without the extra, lits trains as before, and `--mlflow`
fails with one line.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from ray.train.v2.api.callback import UserCallback

from lits.core import storage
from lits.core.config import TrainConfig
from lits.core.errors import UserError

log = logging.getLogger(__name__)

EXPERIMENT = "lits"
RUN_TAG = "lits.run"


@dataclass(frozen=True)
class Tracking:
    """Where a training run is tracked.

    Attributes:
        uri: the MLflow tracking URI.
        artifact_location: where a new experiment keeps its artifacts (None: the store's default).
        experiment: the MLflow experiment's name.
    """

    uri: str
    artifact_location: Optional[str] = None
    experiment: str = EXPERIMENT


def require_mlflow():
    """The mlflow module, or UserError naming the extra to install."""
    try:
        import mlflow
    except ImportError as exc:
        raise UserError("--mlflow needs MLflow: install lits[mlflow] (pip install 'lits[mlflow]')") from exc
    return mlflow


def resolve(uri: Optional[str], output: str) -> Tracking:
    """The Tracking of `--mlflow [URI]`: `uri` as given, or (None or '') a sqlite store in `output`.

    Raises:
        UserError: no extra installed; no URI with an s3:// output (sqlite needs a local file).
    """
    require_mlflow()
    if uri:
        if uri.startswith("sqlite:///"):  # artifacts beside the database file
            folder = os.path.dirname(os.path.abspath(uri[len("sqlite:///"):]))
            return Tracking(uri=uri, artifact_location="file://" + os.path.join(folder, "mlartifacts"))
        return Tracking(uri=uri)
    out = storage.normalise(output)
    if storage.is_s3(out):
        raise UserError(f"--mlflow without a URI keeps a sqlite store in the run folder, and --output {output} is "
                        "in S3: give a tracking URI, e.g. --mlflow sqlite:////local/path/mlflow.db or "
                        "--mlflow http://mlflow-server:5000")
    return Tracking(uri="sqlite:///" + os.path.join(out, "mlflow.db"),
                    artifact_location="file://" + os.path.join(out, "mlartifacts"))


def _client(tracking: Tracking):
    require_mlflow()
    from mlflow import MlflowClient

    if tracking.uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(os.path.abspath(tracking.uri[len("sqlite:///"):])), exist_ok=True)
    return MlflowClient(tracking_uri=tracking.uri)


def start_run(tracking: Tracking, cfg: TrainConfig) -> str:
    """Create (or, for a run being resumed, find) the MLflow run of `cfg`; log its parameters.

    Returns:
        The MLflow run id.
    """
    from mlflow.entities import Param, RunTag

    client = _client(tracking)
    experiment = client.get_experiment_by_name(tracking.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(
        tracking.experiment, artifact_location=tracking.artifact_location)
    key = storage.join(storage.normalise(cfg.output), cfg.name)
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{key}'", max_results=1,
                               order_by=["attributes.start_time DESC"])
    params = {k: str(v) for k, v in cfg.to_dict().items()}
    if found:
        run = found[0]
        client.update_run(run.info.run_id, status="RUNNING")
        changed = {k: v for k, v in params.items() if run.data.params.get(k, v) != v}
        new = [Param(k, v) for k, v in params.items() if k not in run.data.params]
        client.log_batch(run.info.run_id, params=new, tags=[RunTag(f"lits.resumed.{k}", v) for k, v in changed.items()])
        log.info("MLflow: resuming run %s at %s", run.info.run_id, tracking.uri)
        return run.info.run_id
    run = client.create_run(experiment_id, run_name=cfg.name, tags={RUN_TAG: key})
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    log.info("MLflow: run %s at %s", run.info.run_id, tracking.uri)
    return run.info.run_id


def epoch_metrics(row: Dict, timestamp_ms: int) -> List:
    """An epoch's reported row as MLflow Metrics at step = its 'epoch' (numbers only)."""
    from mlflow.entities import Metric

    step = int(row["epoch"])
    return [Metric(k, float(v), timestamp_ms, step) for k, v in sorted(row.items())
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)]


class EpochLogger(UserCallback):
    """Logs each epoch's metrics (rank 0's reported row) to the MLflow run `run_id`, live.

    Runs in Ray Train's controller, on the driver's node: the sqlite file of a local store is there.
    """

    def __init__(self, tracking: Tracking, run_id: str):
        self.tracking = tracking
        self.run_id = run_id
        self._client = None

    def after_report(self, run_context, metrics: List[Dict], checkpoint) -> None:
        if not metrics or "epoch" not in metrics[0]:
            return
        try:
            if self._client is None:
                self._client = _client(self.tracking)
            self._client.log_batch(self.run_id, metrics=epoch_metrics(metrics[0], int(time.time() * 1000)))
        except Exception as exc:  # a tracking server down must not stop training
            log.warning("MLflow: epoch %s not logged to %s: %s", metrics[0].get("epoch"), self.tracking.uri, exc)


def finish(tracking: Tracking, run_id: str, cfg: TrainConfig, status: str = "FINISHED") -> None:
    """Log OUT/curves.png and OUT/model/ (read through lits.core.storage: local or S3) as the run's
    artifacts 'curves.png' and 'model/', and end the run with `status`."""
    client = _client(tracking)
    out = storage.normalise(cfg.output)
    with tempfile.TemporaryDirectory(prefix="lits-mlflow-") as tmp:
        curves = storage.join(out, "curves.png")
        if storage.exists(curves):
            with open(os.path.join(tmp, "curves.png"), "wb") as f:
                f.write(storage.read_bytes(curves))
            client.log_artifact(run_id, os.path.join(tmp, "curves.png"))
        model = storage.join(out, "model")
        if status == "FINISHED" and storage.exists(storage.join(model, "config.json")):
            os.makedirs(os.path.join(tmp, "model"))
            for name in ("weights.pt", "config.json"):
                with open(os.path.join(tmp, "model", name), "wb") as f:
                    f.write(storage.read_bytes(storage.join(model, name)))
            client.log_artifacts(run_id, os.path.join(tmp, "model"), "model")
    client.set_terminated(run_id, status=status)
