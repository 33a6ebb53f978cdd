"""MLflow tracking (lits.train.tracking) without Ray: where `--mlflow` keeps its store, the per-epoch
logger that Ray Train's controller calls, the run's end, and the one-line errors. A whole training run
tracked in a sqlite store, read back with MlflowClient, is in tests/test_training.py (it shares that
module's Ray)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lits.core.config import TrainConfig
from lits.core.errors import UserError
from lits.train import tracking
from tests.conftest import ROOT

mlflow = pytest.importorskip("mlflow")


def test_without_a_uri_the_store_is_sqlite_in_the_run_folder_and_s3_needs_one(tmp_path):
    out = tmp_path / "run"
    t = tracking.resolve("", str(out))
    assert t == tracking.Tracking(uri=f"sqlite:///{out}/mlflow.db", artifact_location=f"file://{out}/mlartifacts")
    assert tracking.resolve(None, str(out)) == t
    given = tracking.resolve(f"sqlite:///{tmp_path}/elsewhere/m.db", "s3://bucket/run")
    assert given.artifact_location == f"file://{tmp_path}/elsewhere/mlartifacts"
    assert tracking.resolve("http://mlflow:5000", "s3://bucket/run") == tracking.Tracking(uri="http://mlflow:5000")
    with pytest.raises(UserError, match="--output s3://bucket/run is in S3: give a tracking URI"):
        tracking.resolve("", "s3://bucket/run")


def test_each_reported_epoch_is_logged_at_its_step_and_a_resume_continues_the_run(tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(data="-", output=str(out), epochs=3, name="r1")
    t = tracking.resolve("", str(out))
    run_id = tracking.start_run(t, cfg)
    logger = tracking.EpochLogger(t, run_id)
    rows = [{"epoch": e, "val_loss": 1.0 / e, "train_images": 10 * e, "lr": 1e-4} for e in (1, 2, 3)]
    for row in rows:  # as Ray Train's controller calls it: one dict per worker, rank 0 first
        logger.after_report(None, [row, dict(row, val_loss=99.0)], None)
    logger.after_report(None, [{"no": "epoch"}], None)  # a report that is not an epoch's is ignored
    client = mlflow.MlflowClient(t.uri)
    history = client.get_metric_history(run_id, "val_loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert [m.value for m in client.get_metric_history(run_id, "train_images")] == [10, 20, 30]
    assert "epoch" not in client.get_run(run_id).data.metrics
    assert client.get_run(run_id).data.params == {k: str(v) for k, v in cfg.to_dict().items()}

    # the same name and output again (a resume, one more epoch): the same MLflow run
    again = tracking.start_run(t, TrainConfig(data="-", output=str(out), epochs=4, name="r1"))
    assert again == run_id
    run = client.get_run(run_id)
    assert run.data.params["epochs"] == "3" and run.data.tags["lits.resumed.epochs"] == "4"
    # another name is another run
    assert tracking.start_run(t, TrainConfig(data="-", output=str(out), name="r2")) != run_id

    # the end of the run: curves and the exported model as artifacts, the run finished
    (out / "model").mkdir()
    (out / "model" / "weights.pt").write_bytes(b"w" * 10)
    (out / "model" / "config.json").write_text("{}")
    (out / "curves.png").write_bytes(b"png")
    tracking.finish(t, run_id, cfg)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(a.path for a in client.list_artifacts(run_id, "model")) == ["model/config.json", "model/weights.pt"]
    artifacts = client.get_run(run_id).info.artifact_uri  # beside the store, in the run folder
    assert artifacts == f"file://{out}/mlartifacts/{run_id}/artifacts"
    assert (out / "mlartifacts" / run_id / "artifacts" / "curves.png").read_bytes() == b"png"


def test_a_tracking_server_down_never_stops_training(tmp_path, caplog):
    logger = tracking.EpochLogger(tracking.Tracking(uri=f"sqlite:///{tmp_path}/m.db"), "no-such-run")
    logger.after_report(None, [{"epoch": 1, "val_loss": 0.5}], None)
    assert "MLflow: epoch 1 not logged" in caplog.text


def test_without_the_extra_mlflow_is_one_line(tmp_path):
    code = ("import sys; sys.modules['mlflow'] = None; from workflows.train import main; "
            f"sys.exit(main(['--data', {str(tmp_path)!r}, '--output', {str(tmp_path / 'o')!r}, '--mlflow']))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == ("train: error: --mlflow needs MLflow: install lits[mlflow] "
                                                   "(pip install 'lits[mlflow]')")
