#!/usr/bin/env python
"""The whole product on this machine, with the embedded defaults (`make demo`, `make demo S3=1`):

    synthesize -> prepare -> train (CPU) -> serve (HTTP) -> bulk segmentation job -> evaluate

The job segments the 4 unseen phantoms and a real CT series in DICOM (TotalSegmentator's example,
tests/data, Apache 2.0): a DICOM-SEG and a NIfTI mask come back for it, and its liver is compared
with TotalSegmentator's in world coordinates (agreement with another model, not accuracy).

Each step is the real command (printed before it runs), so what works here is what a user types.
Each prints its own lines (stage, progress, a line per epoch, summary tables); --verbose passes
--verbose to every step: Ray's own records and a line per item of every progress.
With --s3 an embedded S3-compatible server (moto, on 127.0.0.1) holds every input and output, and
the results are mirrored to OUTPUT/s3-mirror/ at the end so the pictures can be opened.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request


HERE = os.path.dirname(os.path.abspath(__file__))
TOKEN = "demo-token"
REAL_SERIES = os.path.join(os.path.dirname(HERE), "tests", "data", "dicom-ct-series")
REAL_LIVER = os.path.join(os.path.dirname(HERE), "tests", "data", "dicom-ct-series-liver.nii.gz")
REAL_NAME = "real-ct-dicom"  # its folder under new-scans/, and the name of its outputs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step(title: str, script: str, *args: str, env=None) -> float:
    """Run workflows/<script>.py with `args` (printed first); its seconds."""
    command = [sys.executable, os.path.join(HERE, f"{script}.py"), *args]
    print(f"=== {title}\n$ python workflows/{script}.py {shlex.join(args)}", flush=True)
    started = time.time()
    code = subprocess.call(command, env=env)
    if code not in (0,):
        raise SystemExit(f"demo: step '{title}' failed (exit {code}); its messages are above")
    return time.time() - started


def start_server(model: str, port: int, allow: str, env, verbose: bool) -> subprocess.Popen:
    args = ["--model", model, "--port", str(port), "--allow-prefix", allow, "--cpus-per-volume", "0.5"]
    args += ["--verbose"] if verbose else []
    print(f"=== serve the model (background)\n$ LITS_API_TOKEN=... python workflows/serve.py {shlex.join(args)}", flush=True)
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "serve.py"), *args], env=dict(env, LITS_API_TOKEN=TOKEN),
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    line = proc.stdout.readline()
    if not line.startswith("serving model"):
        proc.wait(timeout=60)
        raise SystemExit("demo: the server did not start; its messages are above")
    print(line.strip(), flush=True)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as r:
        print("GET /healthz ->", r.read().decode(), flush=True)
    return proc


def show_results_page(port: int, segmentations: str) -> None:
    """Print the job's results page; at a terminal keep the server up for it until Enter (never in CI,
    a test or a pipe: stdin is then no terminal)."""
    from lits.core import storage

    summaries = [json.loads(storage.read_bytes(f)) for f in storage.list_files(f"{segmentations}/_jobs") if f.endswith(".json")]
    job_id = max(summaries, key=lambda job: job["times"]["submitted"])["job_id"]
    print(f"results page: http://127.0.0.1:{port}/jobs/{job_id}  (sign in with the demo's token: {TOKEN})", flush=True)
    if sys.stdin is not None and sys.stdin.isatty() and not os.environ.get("CI"):
        input("the server stays up for the page; press Enter to stop it and evaluate ")


def real_series_agreement(mask_uri: str, out_uri: str) -> dict:
    """The demo model's liver on the real series against TotalSegmentator's (lits.evaluate.agreement),
    written to `out_uri`."""
    from lits.core import storage
    from lits.evaluate.agreement import liver_agreement

    real = {"series": "TotalSegmentator example_ct_dicom (tests/data)", "reference": "TotalSegmentator's liver",
            **liver_agreement(mask_uri, REAL_LIVER)}
    storage.write_bytes(out_uri, json.dumps(real, indent=1).encode())
    return real


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--output", default="demo-output", help="local folder for everything (default: %(default)s)")
    p.add_argument("--s3", action="store_true", help="keep data and results in an embedded S3-compatible server")
    p.add_argument("--epochs", type=int, default=30, help="(default: %(default)s)")
    p.add_argument("--verbose", action="store_true", help="every step with --verbose: Ray's own records too")
    p.add_argument("--mlflow", action="store_true", help="track the training run in MLflow (a sqlite store in "
                   "OUTPUT/run/mlflow.db; needs the lits[mlflow] extra, which make venv installs)")
    args = p.parse_args(argv)
    began = time.time()
    verbose = ["--verbose"] if args.verbose else []
    seconds = collections.Counter()  # per workflow, for the closing summary

    local = os.path.abspath(args.output)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    server = None
    if args.s3:
        from moto.server import ThreadedMotoServer
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        endpoint = f"http://127.0.0.1:{port}"
        env.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="demo", AWS_SECRET_ACCESS_KEY="demo",
                   AWS_DEFAULT_REGION="us-east-1")
        os.environ.update({k: env[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
        fs.mkdir("demo")
        root = "s3://demo"
        print(f"embedded S3-compatible server at {endpoint}, bucket s3://demo", flush=True)
    else:
        root = local
    uri = {k: f"{root}/{k}" for k in ("volumes", "prepared", "run", "new-scans", "segmentations", "evaluation")}
    tracking = f"sqlite:///{os.path.join(local, 'mlflow.db')}" if args.s3 else f"sqlite:///{local}/run/mlflow.db"
    mlflow = ["--mlflow", tracking] if args.mlflow else []
    serve_proc = None
    try:
        # synthesize writes local folders; with --s3 they are uploaded
        seconds["synthesize"] += step("synthesise 12 training volumes", "synthesize", "--output", os.path.join(local, "volumes"), "--volumes", "12",
             "--size", "256", "--slices", "48", *verbose, env=env)
        seconds["synthesize"] += step("synthesise 4 unseen scans", "synthesize", "--output", os.path.join(local, "new-scans"), "--volumes", "4",
             "--size", "256", "--slices", "48", "--seed", "7", "--first-id", "100", *verbose, env=env)
        import shutil

        shutil.copytree(REAL_SERIES, os.path.join(local, "new-scans", REAL_NAME), dirs_exist_ok=True)
        print(f"copied the real CT series (20 DICOM slices) to new-scans/{REAL_NAME}/", flush=True)
        if args.s3:
            for name in ("volumes", "new-scans"):
                fs.put(os.path.join(local, name) + "/", f"demo/{name}/", recursive=True)
            print("uploaded volumes/ and new-scans/ to s3://demo", flush=True)
        seconds["prepare"] += step("prepare", "prepare", "--input", uri["volumes"], "--output", uri["prepared"], "--image-size", "128",
             "--val-fraction", "0.2", *verbose, env=env)
        if not args.s3:  # a re-run starts from scratch (train would resume, jobs would skip)
            for name in ("run", "segmentations", "evaluation"):
                shutil.rmtree(uri[name], ignore_errors=True)
        seconds["train"] += step("train", "train", "--data", uri["prepared"], "--output", uri["run"], "--num-workers", "2",
             "--epochs", str(args.epochs), "--base-width", "16", "--batch-size", "32", "--lr", "1e-3", "--name", "demo",
             *verbose, *mlflow, env=env)
        port = free_port()
        started = time.time()
        serve_proc = start_server(f"{uri['run']}/model", port, root, env, args.verbose)
        seconds["serve"] += time.time() - started
        seconds["segment"] += step("bulk segmentation job through the server", "segment", "--input", uri["new-scans"], "--output",
             uri["segmentations"], "--server", f"http://127.0.0.1:{port}", "--overwrite", *verbose,
             env=dict(env, LITS_API_TOKEN=TOKEN))
        show_results_page(port, uri["segmentations"])
    finally:
        if serve_proc is not None and serve_proc.poll() is None:
            serve_proc.send_signal(signal.SIGTERM)
            try:
                serve_proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(serve_proc.pid, signal.SIGKILL)
    try:
        seconds["evaluate"] += step("evaluate", "evaluate", "--pred", uri["segmentations"], "--ref", uri["new-scans"], "--images", uri["new-scans"],
             "--output", uri["evaluation"], "--local", *verbose, env=env)
        if args.s3:
            mirror = os.path.join(local, "s3-mirror")
            fs.get("demo/", mirror + "/", recursive=True)
            shown = mirror
        else:
            shown = local
        from lits.core import storage

        summary = json.loads(storage.read_bytes(f"{uri['evaluation']}/summary.json"))
        jobs = [f for f in storage.list_files(f"{uri['segmentations']}/_jobs") if f.endswith(".json")]
        job = json.loads(storage.read_bytes(jobs[-1]))
        real = real_series_agreement(f"{uri['segmentations']}/{REAL_NAME}_seg.nii.gz", f"{uri['evaluation']}/real-series.json")
    finally:
        if server is not None:
            server.stop()
    agg = summary["aggregate"]
    print("\n" + "=" * 72)
    print(f"demo done in {(time.time() - began) / 60:.1f} min"
          f"{' (data and results in the embedded S3 server, mirrored locally)' if args.s3 else ''}: "
          + ", ".join(f"{script} {s:.0f} s" for script, s in seconds.items()))
    print(f"  volumes segmented: {job['counts']['done']} of {job['counts']['total']} ({job['counts']['failed']} failed), "
          f"{job['slices_per_s']} slices/s")
    les = agg["lesions"]
    print(f"  Dice per case on the {summary['cases_evaluated']} unseen scans: liver {agg['liver']['dice_per_case']:.3f}, "
          f"tumour {agg['tumour']['dice_per_case']:.3f} ({args.epochs} epochs of a width-16 U-Net at 128 pixels)")
    print(f"  lesions found: {les['detected']} of {les['reference']} present ({les['predicted']} predicted, "
          f"{'-' if les['precision'] is None else format(les['precision'], '.0%')} of them correct)")
    print(f"  the real CT series (DICOM in, DICOM-SEG out): liver agreement with TotalSegmentator's {real['liver_dice']:.3f} "
          f"(Dice, world coordinates), tumour found {real['pred_tumour_ml']:.1f} mL in {real['pred_lesions']} lesion(s) "
          "(no tumour reference: a healthy-looking liver)")
    print(f"  pictures in {shown}: prepared/preview.png, run/curves.png, segmentations/volume-100_preview.png, "
          f"segmentations/{REAL_NAME}_preview.png, evaluation/overlays.png, evaluation/dice_boxplot.png")
    print(f"  tables: {os.path.join(shown, 'evaluation', 'report.md')}, {os.path.join(shown, 'run', 'metrics.csv')}")
    if args.mlflow:
        print(f"  MLflow: mlflow ui --backend-store-uri {tracking}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
