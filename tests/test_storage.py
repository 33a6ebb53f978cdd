import os

import pytest

from lits.core import storage
from lits.core.errors import UserError
from tests.conftest import make_bucket


def test_local_write_is_atomic_and_lists_recursively(tmp_path):
    target = tmp_path / "a" / "b" / "x.bin"
    storage.write_bytes(str(target), b"hello")
    assert target.read_bytes() == b"hello"
    storage.write_bytes("file://" + str(tmp_path / "c.bin"), b"1")
    assert storage.list_files(str(tmp_path)) == [str(target), str(tmp_path / "c.bin")]


def test_failed_local_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        storage.write_bytes(str(target), object())  # not bytes: fails mid-write
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_missing_input_names_the_uri(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path}/nope.*does not exist"):
        storage.list_files(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="unsupported URI scheme"):
        storage.normalise("gs://bucket/x")
    with pytest.raises(UserError, match="names no bucket"):
        storage.normalise("s3://")


def test_unwritable_output_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write"):
        storage.check_writable(str(blocker / "sub"))


def test_s3_round_trip(s3_server):
    make_bucket(s3_server, "storage-test")
    root = "s3://storage-test/a"
    storage.write_bytes(root + "/x/1.bin", b"one")
    storage.write_bytes(root + "/x/y/2.bin", b"two")
    assert storage.list_files(root) == [root + "/x/1.bin", root + "/x/y/2.bin"]
    assert storage.read_bytes(root + "/x/y/2.bin") == b"two"
    storage.move_file(root + "/x/1.bin", root + "/moved/1.bin")
    assert storage.list_files(root) == [root + "/moved/1.bin", root + "/x/y/2.bin"]
    storage.delete(root)
    assert not storage.exists(root + "/moved/1.bin")
    with pytest.raises(UserError, match="s3://storage-test/none.*does not exist"):
        storage.list_files("s3://storage-test/none")
    with pytest.raises(UserError, match="s3://no-such-bucket"):
        storage.list_files("s3://no-such-bucket/x")
    storage.check_writable("s3://storage-test/out")
    assert storage.list_files("s3://storage-test") == []


def test_the_endpoint_is_read_from_the_environment(monkeypatch):
    """--s3-endpoint (use_endpoint) over AWS_ENDPOINT_URL_S3 over AWS_ENDPOINT_URL, else AWS itself."""
    for name in storage.ENDPOINT_VARS:
        monkeypatch.delenv(name, raising=False)
    assert storage.endpoint() is None and storage.endpoint_env() == {}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    assert storage.endpoint() == "http://generic:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:2")  # restored after the test, with use_endpoint's
    storage.use_endpoint(None)
    assert storage.endpoint() == "http://s3-only:2"
    storage.use_endpoint("http://flag:3")
    assert storage.endpoint() == "http://flag:3" and os.environ["AWS_ENDPOINT_URL_S3"] == "http://flag:3"
    assert storage.endpoint_env() == {"AWS_ENDPOINT_URL_S3": "http://flag:3"}
    assert storage.filesystem("s3://b/k")[0].client_kwargs == {"endpoint_url": "http://flag:3"}


@pytest.mark.slow
def test_a_ray_worker_finds_the_endpoint_in_its_environment(ray_cluster, s3_server):
    """No endpoint travels with a task: a Ray worker given only a URI reads the bucket through the
    endpoint its job's environment holds (conftest.local_ray; workflows: start_ray)."""
    import ray

    make_bucket(s3_server, "worker-env")
    storage.write_bytes("s3://worker-env/in/x.bin", b"from the driver")

    @ray.remote
    def copy(src: str, dst: str):
        from lits.core import storage

        storage.write_bytes(dst, storage.read_bytes(src) + b", through a worker")
        return storage.endpoint()

    assert ray.get(copy.remote("s3://worker-env/in/x.bin", "s3://worker-env/out/x.bin")) == s3_server
    assert storage.read_bytes("s3://worker-env/out/x.bin") == b"from the driver, through a worker"


def _race(uri: str, contenders: int = 4, rounds: int = 8):
    """`contenders` threads at once write `uri` conditionally on the version each read; per round,
    how many writes landed and whether the object holds the winner's bytes."""
    import threading

    outcomes = []
    for r in range(rounds):
        _, version = storage.read_versioned(uri)
        barrier, won = threading.Barrier(contenders), []

        def contend(i):
            barrier.wait()
            if storage.write_if(uri, f"{r}-{i}".encode(), version):
                won.append(i)

        threads = [threading.Thread(target=contend, args=(i,)) for i in range(contenders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        data, _ = storage.read_versioned(uri)
        outcomes.append((len(won), data == f"{r}-{won[0]}".encode() if won else None))
    return outcomes


def test_conditional_writes_let_exactly_one_of_many_writers_win_locally(tmp_path):
    """Created only when absent, replaced only at the version read: of 4 writers at once, one."""
    uri = str(tmp_path / "lease.json")
    assert storage.read_versioned(uri) == (None, None)
    assert _race(uri) == [(1, True)] * 8
    data, version = storage.read_versioned(uri)
    assert not storage.write_if(uri, b"stale", None)  # it exists: "only if absent" fails
    assert storage.write_if(uri, b"next", version) and not storage.write_if(uri, b"late", version)
    assert storage.read_versioned(uri)[0] == b"next"


def test_conditional_writes_let_exactly_one_of_many_writers_win_on_s3(s3_server):
    """The same through the S3 protocol: If-None-Match: * and If-Match: ETag on one PUT each."""
    make_bucket(s3_server, "leases")
    uri = "s3://leases/w/lease.json"
    assert storage.read_versioned(uri) == (None, None)
    assert _race(uri) == [(1, True)] * 8
    data, version = storage.read_versioned(uri)
    assert not storage.write_if(uri, b"stale", None)
    assert storage.write_if(uri, b"next", version) and not storage.write_if(uri, b"late", version)
    assert storage.read_versioned(uri)[0] == b"next"


def test_a_versioned_read_on_s3_is_one_get_whose_etag_is_the_version(s3_server):
    """read_versioned on S3: one GetObject (its body and ETag from the same answer), no HEAD around it."""
    make_bucket(s3_server, "versioned")
    uri = "s3://versioned/w/lease.json"
    storage.write_bytes(uri, b"one")
    fs, path = storage.filesystem(uri)
    storage.read_versioned(uri)  # the client exists once one call was made
    calls = []

    def count(model, **_):
        calls.append(model.name)

    fs.s3.meta.events.register("before-call.s3.*", count)
    try:
        data, version = storage.read_versioned(uri)
        absent = storage.read_versioned("s3://versioned/w/none.json")
    finally:
        fs.s3.meta.events.unregister("before-call.s3.*", count)
    assert (data, absent, calls) == (b"one", (None, None), ["GetObject", "GetObject"])
    fs.invalidate_cache()
    assert version == fs.info(path)["ETag"] and storage.write_if(uri, b"two", version)
    assert storage.read_versioned(uri)[0] == b"two" and not storage.write_if(uri, b"late", version)


class HeaderStrippingProxy:
    """A real HTTP reverse proxy on 127.0.0.1 in front of `upstream` (the S3 server) that, while
    `strip` is set, drops If-None-Match and If-Match from every request: what an S3-compatible
    store that accepts conditional PUTs but ignores their condition does. `url` is its endpoint."""

    DROPPED = {"if-none-match", "if-match"}
    HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}

    def __init__(self, upstream: str, strip: bool = True):
        import http.client
        import http.server
        import threading
        from urllib.parse import urlsplit

        self.strip = strip
        target = urlsplit(upstream)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def forward(self):
                chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
                length = int(self.headers.get("Content-Length") or 0)
                body = self.raw_chunks() if chunked else self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in proxy.HOP | {"expect"}
                           and not (proxy.strip and k.lower() in proxy.DROPPED)}
                if chunked:  # passed on as it came (aws-chunked bodies carry trailers)
                    headers["Transfer-Encoding"] = "chunked"
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    answer = conn.getresponse()
                    data = answer.read()
                finally:
                    conn.close()
                self.send_response(answer.status, answer.reason)
                for k, v in answer.getheaders():
                    if k.lower() not in proxy.HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                length = answer.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def raw_chunks(self) -> bytes:
                """A chunked body as it came, up to and with its trailers' blank line."""
                raw = b""
                while True:
                    line = self.rfile.readline()
                    raw += line
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        break
                    raw += self.rfile.read(size + 2)
                while True:
                    line = self.rfile.readline()
                    raw += line
                    if line in (b"\r\n", b"\n", b""):
                        return raw

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def test_a_store_that_ignores_conditional_headers_is_found_out(s3_server, monkeypatch, tmp_path):
    """The probe through a proxy that strips If-None-Match / If-Match says "ignored" (and write_if's
    refusals indeed land there); straight to the test server, "honoured"; no probe object is left
    behind; a local folder needs no probe."""
    make_bucket(s3_server, "probed")
    proxy = HeaderStrippingProxy(s3_server)
    try:
        assert storage.conditional_writes_honoured("s3://probed/out/_watches/a") is True
        monkeypatch.setenv(storage.ENDPOINT_ENV, proxy.url)
        storage.write_bytes("s3://probed/out/lease.json", b"held")
        assert storage.write_if("s3://probed/out/lease.json", b"taken", None)  # the lease's bug, through it
        assert storage.conditional_writes_honoured("s3://probed/out/_watches/b") is False
        assert storage.conditional_writes_honoured("s3://probed/out/_watches/b") is False  # cached
        proxy.strip = False  # the same proxy forwarding the headers: honoured
        # one answer per endpoint and bucket: another watch's folder there is not probed again
        assert storage.conditional_writes_honoured("s3://probed/out/_watches/c") is False
        make_bucket(s3_server, "probed-too")
        assert storage.conditional_writes_honoured("s3://probed-too/out/_watches/c") is True
    finally:
        proxy.close()
    monkeypatch.setenv(storage.ENDPOINT_ENV, s3_server)
    assert storage.list_files("s3://probed") == ["s3://probed/out/lease.json"]  # every probe deleted
    assert storage.list_files("s3://probed-too") == []
    assert storage.conditional_writes_honoured(str(tmp_path)) is True and os.listdir(tmp_path) == []
