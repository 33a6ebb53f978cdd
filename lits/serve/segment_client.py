"""Running one bulk job for `workflows/segment.py`: against a running server over HTTP, or on a
model deployed here for the job's length; then following it with a progress display.

    run_on_server(server, request, wait)     POST /v1/jobs, then GET /v1/jobs/{id} until it ends
    run_locally(cfg, request, concurrency, start_cluster)
                                             deploy the model (no HTTP), submit, follow, undeploy

Both return the job's last status (`jobs.get_job`'s dict; {} when not waiting). What a user reads
goes to stdout (the job's URL) and stderr (progress).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from typing import Callable, Dict, Optional

from lits.serve.access import TOKEN_ENV
from lits.core.config import ServeConfig
from lits.core.errors import UserError

log = logging.getLogger(__name__)


class Progress:
    """A progress bar on a terminal; a line per change (at most every 10 s) otherwise."""

    def __init__(self):
        self.stream = sys.stderr
        self.tty = self.stream.isatty()
        self.last = ("", 0.0)

    def show(self, job: dict) -> None:
        from lits.core.reports import progress_line

        line = progress_line(job)
        if self.tty:
            self.stream.write("\r" + line.ljust(100))
        else:
            counts = json.dumps(job["counts"], sort_keys=True) + job["state"]
            if counts == self.last[0] and time.time() - self.last[1] < 30:
                return
            if counts != self.last[0] and time.time() - self.last[1] < 10 and job["state"] == "running":
                return
            self.last = (counts, time.time())
            self.stream.write(line + "\n")
        self.stream.flush()

    def end(self) -> None:
        if self.tty:
            self.stream.write("\n")


def follow(get: Callable[[], Dict], interval: float = 1.0) -> Dict:
    """Call `get()` every `interval` s, showing progress, until the job it returns has ended."""
    from lits.serve.jobs import FINAL_STATES

    progress = Progress()
    while True:
        job = get()
        progress.show(job)
        if job["state"] in FINAL_STATES:
            progress.end()
            return job
        time.sleep(interval)


def as_uri(uri: str) -> str:
    """A URI the server (or Ray's workers) can read: local paths made absolute."""
    return uri if "://" in uri else os.path.abspath(uri)


# --- against a server --------------------------------------------------------------------------

def call_server(server: str, method: str, path: str, body=None) -> dict:
    """One JSON call to the API at `server` (token from $LITS_API_TOKEN); UserError with the
    server's answer or why it could not be reached."""
    headers = {"Content-Type": "application/json"}
    token = os.environ.get(TOKEN_ENV)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(server.rstrip("/") + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail")
        except ValueError:
            detail = exc.reason
        hint = {401: f"; set {TOKEN_ENV} to the server's token"}.get(exc.code, "")
        raise UserError(f"{server} answered {exc.code} to {method} {path}: {detail}{hint}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise UserError(f"cannot reach {server} ({getattr(exc, 'reason', exc)}); is workflows/serve.py running there?") from exc


def run_on_server(server: str, request: Dict, wait: bool = True) -> Dict:
    """Submit `request` ({'input', 'output', 'overwrite'[, 'concurrency']}) to the server; follow
    the job when `wait` (Ctrl-C leaves it running there: SystemExit(130) with the cancel command)."""
    job_id = call_server(server, "POST", "/v1/jobs", request)["job_id"]
    status_url = f"{server.rstrip('/')}/v1/jobs/{job_id}"
    sys.stdout.write(f"job {job_id} submitted: {status_url}\n")
    sys.stdout.flush()
    if not wait:
        return {}
    try:
        return follow(lambda: call_server(server, "GET", f"/v1/jobs/{job_id}"), interval=2.0)
    except KeyboardInterrupt:
        sys.stderr.write(f"\nthe job goes on on the server; cancel it with: curl -X DELETE {status_url}\n")
        raise SystemExit(130)


# --- self-contained ----------------------------------------------------------------------------

def run_locally(cfg: ServeConfig, request: Dict, concurrency: Optional[int], start_cluster: Callable[[], None],
                quiet: bool = True) -> Dict:
    """Deploy cfg's model without HTTP as a Serve app of its own, run the job there, follow it
    and remove the app. The model and the folders are checked before `start_cluster()` (Ray) is
    paid for. Ctrl-C cancels the job (finished volumes stay) and exits 130."""
    from lits.model import inference
    from lits.serve import jobs, serving
    from lits.core import storage

    spec, _ = inference.load_spec(cfg.model)  # before paying for Ray
    storage.require(request["input"])
    storage.check_writable(request["output"])
    start_cluster()
    if quiet:  # Serve's start-up and shutdown chatter would bury the progress bar
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    app_name = f"lits-segment-{uuid.uuid4().hex[:8]}"
    log.info("deploying model %s as Serve app %s", spec.model_id, app_name)
    serving.deploy(cfg, http=False, app_name=app_name)
    job_id = None
    try:
        # Volume tasks run in the app's volume pool (the CPUs the replica does not hold) and, on a
        # cluster, on CPU nodes that join (the job asks the autoscaler for them); by default as many
        # at once as they have room for.
        job = serving.job_spec(cfg, app_name, storage.normalise(request["input"]), storage.normalise(request["output"]),
                               bool(request.get("overwrite")), concurrency)
        job_id = jobs.submit_job(job)
        log.info("job %s started: %s -> %s", job_id, job.input, job.output)
        return follow(lambda: jobs.get_job(job_id))
    except KeyboardInterrupt:
        if job_id:
            jobs.cancel_job(job_id)
            sys.stderr.write(f"\ncancelling job {job_id}; outputs written so far are complete and stay\n")
            follow(lambda: jobs.get_job(job_id))
        raise SystemExit(130)
    finally:
        serving.undeploy(app_name)


def exit_status(job: Dict, evaluation: Optional[Dict] = None) -> int:
    """0 when the job succeeded with no failed volume (and the evaluation, if any, had no failure), else 1."""
    status = 0 if job["state"] == "succeeded" and not job["counts"]["failed"] else 1
    if evaluation is not None and evaluation["failed"]:
        status = 1
    return status
