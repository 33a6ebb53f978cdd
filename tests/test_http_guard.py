"""The HTTP API's door and job queue without Ray (issue 21, items 2, 4, 5, 7, 8): `lits.serve.http_guard.Guard`
driven as the ASGI app it is, with a receive that records what was read; `JobQueue` with stand-ins for
starting a job and for its actor. The same behaviour over real HTTP: tests/test_serving_http.py."""

import asyncio
import hashlib
import json
import math
import os

import pytest

from lits.core.errors import UserError
from lits.serve import http_guard
from lits.serve.http_guard import Guard, GuardSettings

TOKEN = "s3cret"
SETTINGS = GuardSettings(token_sha256=http_guard.token_sha256(TOKEN), open_paths=("/healthz",),
                         upload_bytes=3 * 1024 * 1024, grace_s=0.3, min_rate=1024 * 1024)


class Client:
    """One request through `Guard` around an app that reads the whole body and answers 200 with its
    length. `parts` are the body's parts; `delays` seconds before each. Records how many parts the
    guard asked for and what the app saw."""

    def __init__(self, settings=SETTINGS, app=None):
        self.asked = 0
        self.app_called = False
        self.guard = Guard(app or self.echo, lambda: settings)

    async def echo(self, scope, receive, send):
        self.app_called = True
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(body)).encode()})

    def request(self, path="/v1/jobs", parts=(b"",), token=TOKEN, length=None, delays=None, method="POST"):
        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        scope = {"type": "http", "method": method, "path": path, "headers": headers, "query_string": b""}
        parts = list(parts)
        delays = list(delays or [0] * len(parts))
        sent = []

        async def receive():
            if not parts:
                await asyncio.sleep(3600)  # a client that sends nothing more
            self.asked += 1
            await asyncio.sleep(delays.pop(0))
            body = parts.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(parts)}

        async def send(message):
            sent.append(message)

        asyncio.run(self.guard(scope, receive, send))
        start = next(m for m in sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return start["status"], dict(start["headers"]), body


def test_no_token_is_refused_before_a_byte_of_the_body_is_read():
    """Item 2: a 300 MB body without the token cost the server 1.4 GB before its 401."""
    for token in (None, "wrong", TOKEN + "x"):
        client = Client()
        status, headers, body = client.request(parts=[b"x" * 1000] * 5, token=token, length=300 * 1024 * 1024)
        assert status == 401 and headers[b"www-authenticate"] == b"Bearer"
        assert "token" in json.loads(body)["detail"]
        assert client.asked == 0 and not client.app_called
    client = Client()
    assert client.request(path="/healthz", token=None, method="GET")[0] == 200  # open paths stay open
    assert client.request(path="/nowhere", token=None, method="GET")[0] == 401  # every other path needs it


def test_declared_bodies_over_the_limit_are_refused_unread():
    """Item 2: the JSON routes take 1 MB, the upload route --max-body-mb; a Content-Length over
    either is a 413 before the body is read."""
    for path, length in (("/v1/jobs", 1024 * 1024 + 1), ("/v1/segment", 3 * 1024 * 1024 + 1)):
        client = Client()
        status, _, body = client.request(path=path, parts=[b"x"], length=length)
        assert status == 413 and f"{length} bytes" in json.loads(body)["detail"], body
        assert client.asked == 0 and not client.app_called
    client = Client()
    assert client.request(path="/v1/segment", parts=[b"x" * 2 * 1024 * 1024], length=2 * 1024 * 1024) == (
        200, {}, str(2 * 1024 * 1024).encode())
    assert Client().request(parts=[b"x"], length="12abc")[0] == 400


def test_a_chunked_body_is_cut_at_the_limit():
    """Item 2: without Content-Length the body is counted as it arrives and cut past the limit."""
    client = Client()
    status, _, body = client.request(parts=[b"x" * 256 * 1024] * 10)  # 2.5 MB to a 1 MB route
    assert status == 413 and "limit of 1 MB" in json.loads(body)["detail"]
    assert client.asked == 5 and not client.app_called  # not one part more than the limit needed


def test_a_stalled_body_is_answered_408_within_its_grace():
    """Item 4: 2 bytes of a declared 1 000 000, then nothing: 408 after grace_s; a body arriving
    fast enough passes, whatever its pauses within the allowance."""
    client = Client()
    loop_start = asyncio.run(_now())
    status, _, body = client.request(path="/v1/segment", parts=[b"ab", b"x"], delays=[0, 30], length=1000000)
    took = asyncio.run(_now()) - loop_start
    assert status == 408 and "too slowly" in json.loads(body)["detail"]
    assert 0.25 < took < 10 and not client.app_called  # not the 30 s the client would take
    slow_but_fine = Client().request(path="/v1/segment", parts=[b"a" * 1000] * 3, delays=[0.1, 0.1, 0.05])
    assert slow_but_fine[0] == 200 and slow_but_fine[2] == b"3000"


async def _now():
    return asyncio.get_running_loop().time()


def test_redirects_leave_with_a_relative_location():
    """Item 8: Starlette's trailing-slash 307 built its Location from the Host header."""
    async def redirect(scope, receive, send):
        await send({"type": "http.response.start", "status": 307,
                    "headers": [(b"location", b"http://evil.example/v1/jobs/abc?x=1")]})
        await send({"type": "http.response.body", "body": b""})

    status, headers, _ = Client(app=redirect).request(method="GET", path="/v1/jobs/abc/")
    assert status == 307 and headers[b"location"] == b"/v1/jobs/abc?x=1"


def test_tokens_no_client_can_send_are_refused_at_start():
    """Item 8: a non-ASCII LITS_API_TOKEN was hashed as UTF-8 and compared with a header read as
    latin-1: it could never match. Refused with one line; a visible-ASCII token matches."""
    for bad in ("pässwort", "two words", "tab\there", "ключ"):
        with pytest.raises(UserError, match="visible ASCII") as err:
            http_guard.token_sha256(bad)
        assert "\n" not in str(err.value)
    digest = http_guard.token_sha256("Tok-en_1.~+/=")
    assert digest == hashlib.sha256(b"Tok-en_1.~+/=").hexdigest()
    assert http_guard.token_matches(b"Bearer Tok-en_1.~+/=", digest)
    assert http_guard.token_matches(b"bearer  Tok-en_1.~+/= ", digest)
    assert not http_guard.token_matches(b"Basic Tok-en_1.~+/=", digest)
    assert not http_guard.token_matches("Bearer pässwort".encode("latin-1"), digest)
    assert http_guard.token_matches(b"", None) and http_guard.token_sha256("") is None


def test_which_hosts_are_exposed():
    assert not any(http_guard.exposed(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert all(http_guard.exposed(h) for h in ("0.0.0.0", "::", "192.168.1.4", "myhost.example"))


def test_validation_errors_with_nan_serialise():
    """Item 7: FastAPI's own 422 for {"concurrency": NaN} could not be written as JSON (a 500)."""
    errors = [{"type": "int_from_float", "loc": ["body", "concurrency"], "input": float("nan"),
               "ctx": {"limits": [float("inf"), -float("inf"), 1.5]}}]
    detail = http_guard.validation_detail(errors)
    assert json.loads(json.dumps(detail, allow_nan=False)) == [
        {"type": "int_from_float", "loc": ["body", "concurrency"], "input": "nan", "ctx": {"limits": ["inf", "-inf", 1.5]}}]
    assert math.isnan(errors[0]["input"])  # the caller's errors are left as they were


def _job(tmp_path, n):
    from lits.serve.job_spec import JobSpec

    return JobSpec(input=f"/in/{n}", output=f"/out/{n}", app_name="app", jobs_state=str(tmp_path),
                   job_id=f"{n:012x}")


async def _eventually(condition, timeout_s=10.0):
    """Whether `condition()` holds within `timeout_s` (the queue polls every POLL_S; a loaded
    machine may take longer than a fixed sleep)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    return condition()


def test_the_job_queue_caps_running_jobs_and_starts_the_waiting_in_order(tmp_path, monkeypatch):
    """Item 5: with max_jobs 2, the third and fourth jobs wait with a 'queued' record; a cancelled
    waiting job never starts; the others start oldest first as running ones end."""
    from lits.serve import job_queue

    monkeypatch.setattr(job_queue, "POLL_S", 0.01)
    started, alive = [], set()

    def start(job):
        started.append(job.job_id)
        alive.add(job.job_id)
        return job.job_id

    async def scenario():
        queue = job_queue.JobQueue(2, start=start, alive=lambda job_id: job_id in alive)
        jobs = [_job(tmp_path, n) for n in range(1, 6)]
        for job in jobs:
            await queue.submit(job)
        assert started == [jobs[0].job_id, jobs[1].job_id]
        waiting = [queue.status(j.job_id) for j in jobs[2:]]
        assert [w["state"] for w in waiting] == ["queued"] * 3
        with open(os.path.join(tmp_path, f"{jobs[2].job_id}.json")) as f:
            assert json.load(f)["state"] == "queued"  # found by list and by a restarted server
        cancelled = await queue.cancel(jobs[3].job_id)
        assert cancelled["state"] == "cancelled" and queue.status(jobs[3].job_id) is None
        with open(os.path.join(tmp_path, f"{jobs[3].job_id}.json")) as f:
            assert json.load(f)["state"] == "cancelled"
        assert await queue.cancel(jobs[0].job_id) is None  # a running job is the actor's to cancel
        await asyncio.sleep(0.1)
        assert len(started) == 2  # nothing ended: nothing more starts
        alive.discard(jobs[0].job_id)
        assert await _eventually(lambda: started == [j.job_id for j in (jobs[0], jobs[1], jobs[2])]), started
        alive.clear()
        assert await _eventually(lambda: started == [j.job_id for j in (jobs[0], jobs[1], jobs[2], jobs[4])]), started
        assert not queue.waiting and queue.status(jobs[4].job_id) is None

    asyncio.run(scenario())


def test_a_queued_job_that_cannot_start_is_recorded_failed(tmp_path, monkeypatch):
    from lits.serve import job_queue

    monkeypatch.setattr(job_queue, "POLL_S", 0.01)
    alive = {"000000000001"}

    def start(job):
        if job.job_id == "000000000002":
            raise RuntimeError("the cluster is gone")
        return job.job_id

    async def scenario():
        queue = job_queue.JobQueue(1, start=start, alive=lambda job_id: job_id in alive)
        await queue.submit(_job(tmp_path, 1))
        await queue.submit(_job(tmp_path, 2))
        alive.clear()
        assert await _eventually(lambda: not queue.waiting)

    asyncio.run(scenario())
    with open(os.path.join(tmp_path, "000000000002.json")) as f:
        record = json.load(f)
    assert record["state"] == "failed" and "the cluster is gone" in record["error"]


def _serve(*args, token=None):
    import subprocess
    import sys

    from conftest import ROOT, WORKFLOWS

    env = {k: v for k, v in os.environ.items() if k != "LITS_API_TOKEN"}
    env["PYTHONPATH"] = ROOT
    if token is not None:
        env["LITS_API_TOKEN"] = token
    return subprocess.run([sys.executable, os.path.join(WORKFLOWS, "serve.py"), *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_serve_refuses_an_open_host_without_a_token_and_a_token_no_client_can_send(tmp_path):
    """Item 8: `--host 0.0.0.0` without LITS_API_TOKEN only printed a note; a non-ASCII token was
    taken and then never matched. Both stop serve.py before Ray starts, with one line."""
    missing_model = str(tmp_path / "model")
    open_host = _serve("--model", missing_model, "--host", "0.0.0.0")
    assert open_host.returncode == 2 and "--insecure" in open_host.stderr and "LITS_API_TOKEN" in open_host.stderr
    assert len(open_host.stderr.strip().splitlines()) == 1
    insecure = _serve("--model", missing_model, "--host", "0.0.0.0", "--insecure")
    assert insecure.returncode == 2 and "config.json is missing" in insecure.stderr  # past the host check
    with_token = _serve("--model", missing_model, "--host", "0.0.0.0", token="t0ken")
    assert with_token.returncode == 2 and "config.json is missing" in with_token.stderr
    accented = _serve("--model", missing_model, token="pässwort")
    assert accented.returncode == 2 and "visible ASCII" in accented.stderr, accented.stderr
    assert len(accented.stderr.strip().splitlines()) == 1


def test_serve_on_a_cluster_refuses_job_records_only_one_node_sees(tmp_path):
    """Issue 20, item 4: with --address, a local --jobs-state (or the default ~/.cache one) made a
    finished job's status depend on which node's ingress answered. One line, before Ray starts;
    s3:// or an explicit file:// (a folder every node mounts) passes the check."""
    missing_model = str(tmp_path / "model")
    for flags in ([], ["--jobs-state", str(tmp_path / "state")]):
        local = _serve("--model", missing_model, "--address", "127.0.0.1:1", *flags)
        assert local.returncode == 2 and "--jobs-state s3://" in local.stderr, local.stderr
        assert len(local.stderr.strip().splitlines()) == 1
    for state in ("s3://bucket/jobs", f"file://{tmp_path / 'state'}"):
        shared = _serve("--model", missing_model, "--address", "127.0.0.1:1", "--jobs-state", state)
        assert shared.returncode == 2 and "config.json is missing" in shared.stderr, shared.stderr  # past the check


def test_upload_bodies_are_received_a_bounded_number_at_a_time():
    """Bodies are read whole before a route runs; without a bound, every client connected at once
    would hold its body in the ingress's memory. With `receiving` 2: three stalled uploads and a
    good one at once — never more than 2 bodies in reception, the stalled are cut (408), the good
    one is answered after them; a reception that does not free in time is a 503 with Retry-After."""
    settings = GuardSettings(token_sha256=None, upload_bytes=1 << 20, grace_s=0.3, min_rate=1 << 20, receiving=2)
    guard = Guard(None, lambda: settings)
    state = {"reading": 0, "most": 0}

    async def app(scope, receive, send):
        message = await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(message["body"])).encode()})

    guard.app = app

    async def upload(parts, stall_after=None):
        scope = {"type": "http", "method": "POST", "path": "/v1/segment", "headers": [], "query_string": b""}
        parts, sent, first = list(parts), [], [True]

        async def receive():
            if first[0]:
                first[0] = False
                state["reading"] += 1
                state["most"] = max(state["most"], state["reading"])
            if not parts:
                await asyncio.sleep(3600)
            await asyncio.sleep(0.01)
            body = parts.pop(0)
            if not parts and stall_after is None:
                state["reading"] -= 1
            return {"type": "http.request", "body": body, "more_body": bool(parts) or stall_after is not None}

        async def send(message):
            sent.append(message)

        try:
            await guard(scope, receive, send)
        finally:
            if stall_after is not None:
                state["reading"] -= 1
        return next(m for m in sent if m["type"] == "http.response.start")

    async def scenario():
        stalled = [upload([b"ab"], stall_after=True) for _ in range(3)]
        good = upload([b"x" * 1000, b"y" * 1000])
        return await asyncio.gather(*stalled, good)

    answers = [m["status"] for m in asyncio.run(scenario())]
    assert state["most"] == 2, state
    assert sorted(answers[:3]) in ([408, 408, 408], [408, 408, 503]) and answers[3] == 200, answers

    async def crowded():  # two stalled hold both receptions past the wait of a third
        slow = GuardSettings(token_sha256=None, upload_bytes=1 << 20, grace_s=0.2, min_rate=40, receiving=2)
        guard.settings = lambda: slow  # 20 bytes keep a reception for 0.2 + 20 / 40 s, past the third's 0.4 s
        return await asyncio.gather(upload([b"a"] * 20, stall_after=True), upload([b"a"] * 20, stall_after=True),
                                    upload([b"z"]))

    refused = asyncio.run(crowded())[2]
    assert refused["status"] == 503 and (b"retry-after", b"1") in refused["headers"]
