"""Issue 21's HTTP findings (items 2, 4, 5, 7, 8) over real HTTP against the real Serve app: one app for
the module with a token, a local allow-listed folder, --max-jobs 1, --max-uploads 2, a 2 s body grace,
an S3 endpoint where nothing listens (S3 down) and job records of its own (the session's folder holds other
modules' jobs, whose summaries on their S3 server this app cannot reach). The same rules without Ray:
tests/test_http_guard.py."""

import http.client
import json
import os
import socket
import time

import pytest

from conftest import free_port, local_ray, synthesize
from test_inference import tiny_model
from test_serving import TOKEN, call, wait_job

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from ray import serve

    from lits.core import storage
    from lits.core.config import ServeConfig
    from lits.serve import serving

    root = tmp_path_factory.mktemp("http")
    allowed = root / "allowed"
    synthesize(allowed / "ct", volumes=3, size=64, slices=24, seed=5)
    for f in (allowed / "ct").glob("segmentation-*"):
        f.unlink()
    model = tiny_model(root / "model")
    port = free_port()
    saved = {k: os.environ.get(k) for k in storage.ENDPOINT_VARS}
    storage.use_endpoint(f"http://127.0.0.1:{free_port()}")  # nothing listens there: S3 is down
    cfg = ServeConfig(model=model, port=port, allow_prefixes=(str(allowed), "s3://archive"), max_body_mb=3,
                      batch_wait_s=0.05, chunk=8, max_batch_size=16, token_sha256=serving.token_sha256(TOKEN),
                      volume_cpus=2, max_jobs=1, max_uploads=2, body_grace_s=2, jobs_state=str(root / "jobs"))
    try:
        with local_ray(4):
            try:
                serving.deploy(cfg)
                yield {"url": f"http://127.0.0.1:{port}", "port": port, "allowed": allowed, "cfg": cfg}
            finally:
                serve.shutdown()
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def open_request(server, method, path, headers, first=b""):
    """A socket that has sent a request's head (and `first` bytes of its body), nothing more."""
    sock = socket.create_connection(("127.0.0.1", server["port"]), timeout=15)
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(head.encode("latin-1") + b"\r\n" + first)
    return sock


def answer(sock):
    """(status, body) of the response on `sock`; status None when none came within its timeout."""
    data = b""
    try:
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            got = sock.recv(65536)
            if not got:
                break
            data += got
    except socket.timeout:
        return None, data
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return (int(head.split()[1]) if head else None), body


def _length(data):
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            return int(value)
    return 0


def post_json(server, body: bytes, content_type="application/json"):
    """(status, parsed body) of POST /v1/jobs with `body` sent as it is (not re-encoded)."""
    connection = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=60)
    try:
        connection.request("POST", "/v1/jobs", body=body, headers={"Authorization": f"Bearer {TOKEN}",
                                                                   "Content-Type": content_type})
        response = connection.getresponse()
        payload = response.read()
        try:
            return response.status, json.loads(payload)
        except ValueError:
            return response.status, payload
    finally:
        connection.close()


AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def test_no_token_is_answered_before_the_body_is_read(server):
    """Item 2: a 300 MB body without the token was read whole before its 401 (the ingress at 1.7 GB).
    Each head here promises 300 MB and sends a few bytes: the 401 must come from the head alone."""
    for headers in ({"Content-Type": "application/json"}, {**AUTH, "Authorization": "Bearer wrong"}):
        started = time.monotonic()
        sock = open_request(server, "POST", "/v1/jobs", {**headers, "Content-Length": str(300 * 1024 * 1024)},
                            first=b'{"input": "')
        status, body = answer(sock)
        assert status == 401 and b"token" in body, (headers, status, body[:200])
        assert time.monotonic() - started < 12  # from the head: the body would never come


def test_bodies_over_the_limit_are_refused_before_they_are_read(server):
    """Item 2: --max-body-mb held only for /v1/segment; the JSON routes take 1 MB, refused from a
    declared Content-Length before reading, and a chunked body (no Content-Length) cut at 1 MB."""
    sock = open_request(server, "POST", "/v1/jobs", {**AUTH, "Content-Length": str(2 * 1024 * 1024)}, first=b'{"in')
    status, body = answer(sock)
    assert status == 413 and b"limit of 1 MB" in body, (status, body[:200])
    connection = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=60)
    filler = b'{"input": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    connection.request("POST", "/v1/jobs", body=iter([filler[i:i + 65536] for i in range(0, len(filler), 65536)]),
                       headers=AUTH)
    response = connection.getresponse()
    assert response.status == 413 and b"limit of 1 MB" in response.read()
    connection.close()


def test_stalled_uploads_hold_no_upload_slot(server):
    """Item 4: clients that declare Content-Length 1 000 000 and send 2 bytes held every
    --max-uploads slot, and a real upload waited for them. Twice the slots stall here; a real
    upload is segmented meanwhile, and each stalled client gets 408 after the 2 s grace."""
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/octet-stream",
               "Content-Length": "1000000"}
    stalled = [open_request(server, "POST", "/v1/segment?name=stall.nii.gz", headers, first=b"\x1f\x8b")
               for _ in range(2 * server["cfg"].max_uploads)]
    time.sleep(0.5)
    volume = (server["allowed"] / "ct" / "volume-0.nii.gz").read_bytes()
    connection = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=30)
    try:
        connection.request("POST", "/v1/segment?name=volume-0.nii.gz", body=volume,
                           headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/octet-stream"})
        response = connection.getresponse()
        assert response.status == 200, response.read()[:300]
        response.read()
    finally:
        connection.close()
    for sock in stalled:
        status, body = answer(sock)
        assert status == 408 and b"too slowly" in body, (status, body[:300])


def test_jobs_over_max_jobs_wait_queued(server):
    """Item 5: twelve jobs at once took the server from 2.7 GB / 14 processes to 7 GB / 33. With
    --max-jobs 1 the second and third job wait 'queued' (in status and list); the cancelled third
    never runs; the second starts once the first has ended; no job actor is left after."""
    import ray

    from lits.serve import jobs

    ct, out = str(server["allowed"] / "ct"), server["allowed"]
    submitted = []
    for name in ("first", "second", "third"):
        status, body, _ = call(server, "POST", "/v1/jobs", {"input": ct, "output": str(out / name)})
        assert status == 202, body
        submitted.append(body)
    first, second, third = (b["job_id"] for b in submitted)
    status, job, _ = call(server, "GET", f"/v1/jobs/{second}")
    assert status == 200 and job["state"] == "queued", job
    assert [b.get("state") for b in submitted] == ["running", "queued", "queued"]
    listed = {j["job_id"]: j["state"] for j in call(server, "GET", "/v1/jobs")[1]}
    assert listed[second] == listed[third] == "queued", listed
    status, cancelled, _ = call(server, "DELETE", f"/v1/jobs/{third}")
    assert status == 200 and cancelled["state"] == "cancelled", cancelled
    assert call(server, "GET", f"/v1/jobs/{third}")[1]["state"] == "cancelled"
    ended = [wait_job(server, first), wait_job(server, second)]
    assert [(j["state"], j["counts"]["done"]) for j in ended] == [("succeeded", 3)] * 2, ended
    assert ended[1]["times"]["started"] >= ended[0]["times"]["finished"]
    assert not (out / "third").exists()
    assert call(server, "GET", f"/v1/jobs/{third}")[1]["state"] == "cancelled"
    deadline = time.time() + 15
    while time.time() < deadline:
        alive = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith(jobs.ACTOR_PREFIX)]
        if not alive:
            break
        time.sleep(0.5)
    assert not alive  # the jobs' memory went with their actors


def test_nan_in_a_job_request_is_a_422(server):
    """Item 7: FastAPI could not write its own 422 for {"concurrency": NaN}: a 500."""
    ct, out = server["allowed"] / "ct", server["allowed"] / "out-nan"
    status, body = post_json(server, f'{{"input": "{ct}", "output": "{out}", "concurrency": NaN}}'.encode())
    assert status == 422 and body["detail"][0]["loc"] == ["body", "concurrency"], body


def test_a_lone_surrogate_in_a_uri_is_a_400_naming_it(server):
    """Item 7: a URI with a lone surrogate was a 500 (UnicodeEncodeError in realpath)."""
    ct, out = server["allowed"] / "ct", server["allowed"] / "out-surrogate"
    status, body = post_json(server, f'{{"input": "{ct}/\\ud800", "output": "{out}"}}'.encode())
    assert status == 400 and body["detail"].startswith("input ") and "surrogate" in body["detail"], body


def test_s3_down_at_submission_is_a_503_with_the_reason(server):
    """Item 7: POST /v1/jobs with S3 down was a bare 500 (after 11 s)."""
    started = time.monotonic()
    status, body, _ = call(server, "POST", "/v1/jobs", {"input": "s3://archive/ct", "output": "s3://archive/o"})
    assert status == 503 and "S3 endpoint is unreachable" in body["detail"], (status, body)
    assert time.monotonic() - started < 60


def test_an_output_that_is_a_file_is_refused_at_submission(server):
    """Item 7: an output naming an existing file was accepted (202), then every volume failed."""
    existing = server["allowed"] / "a-file"
    existing.write_bytes(b"not a folder")
    for output in (existing, existing / "below"):
        status, body, _ = call(server, "POST", "/v1/jobs", {"input": str(server["allowed"] / "ct"), "output": str(output)})
        assert status == 400 and f"{existing} is an existing file" in body["detail"], body


def test_the_docs_can_send_the_token(server):
    """Item 8: /docs had no security scheme, so "Try it out" could not send the token."""
    status, schema, _ = call(server, "GET", "/openapi.json", token=None)
    schemes = schema["components"].get("securitySchemes", {})
    assert [s["scheme"] for s in schemes.values()] == ["bearer"], schema["components"]
    name = next(iter(schemes))
    assert schema["paths"]["/v1/jobs"]["post"]["security"] == [{name: []}]


def test_a_trailing_slash_redirect_is_relative(server):
    """Item 8: the 307 on /v1/jobs/<id>/ built its Location from the request's Host header."""
    connection = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=30)
    connection.request("GET", "/v1/jobs/0123456789ab/?x=1", headers={"Host": "evil.example",
                                                                      "Authorization": f"Bearer {TOKEN}"})
    response = connection.getresponse()
    response.read()
    connection.close()
    assert response.status == 307 and response.headers["location"] == "/v1/jobs/0123456789ab?x=1"


def test_healthz_names_the_model_only_with_the_token(server):
    """Item 8: /healthz gave anyone the model's path (where the server's storage is)."""
    status, open_health, _ = call(server, "GET", "/healthz", token=None)
    assert status == 200 and "model" not in open_health and open_health["model_id"], open_health
    assert call(server, "GET", "/healthz", token="wrong")[1].keys() == open_health.keys()
    status, health, _ = call(server, "GET", "/healthz")
    assert status == 200 and health["model"] == server["cfg"].model


def test_a_job_posted_as_text_gets_415(server):
    """Item 8: a job posted without a JSON content type got "Input should be a valid dictionary"."""
    body = json.dumps({"input": str(server["allowed"] / "ct"), "output": str(server["allowed"] / "o")}).encode()
    status, got = post_json(server, body, content_type="text/plain")
    assert status == 415 and "Content-Type: application/json" in got["detail"], got
