"""URIs on local disk, file:// and s3:// through fsspec: list, read, atomic write, conditional write
(and a probe of whether the store honours it), move, delete.

Every write is atomic: locally a temporary sibling is renamed into place; on S3 a single PUT
(an object only appears once its upload completed). Callers never see a half-written object
under its final name.
"""

from __future__ import annotations

import contextlib
import logging
import hashlib
import os
import posixpath
import uuid
from typing import Dict, Iterator, Optional, Tuple

import fsspec

from lits.core.errors import UserError

log = logging.getLogger(__name__)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://") or uri.startswith("s3a://")


# The S3 endpoint is process configuration, held in the environment under the AWS SDKs' standard
# names (the S3-specific one first): set once (`use_endpoint`, from a workflow's --s3-endpoint),
# read by every call here, and inherited by the processes started after it. Ray workers of a
# cluster this process joins do not inherit it: workflows send it in the job's runtime_env
# (`endpoint_env`).
ENDPOINT_ENV = "AWS_ENDPOINT_URL_S3"
ENDPOINT_VARS = (ENDPOINT_ENV, "AWS_ENDPOINT_URL")


def use_endpoint(url: Optional[str]) -> None:
    """Make `url` the S3 endpoint of this process (and of the processes it starts after this);
    None or '' leaves the environment as it is (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS)."""
    if url:
        os.environ[ENDPOINT_ENV] = url


def endpoint() -> Optional[str]:
    """The S3 endpoint: AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL, else None (AWS itself)."""
    for name in ENDPOINT_VARS:
        if os.environ.get(name):
            return os.environ[name]
    return None


def endpoint_env() -> dict:
    """The environment that gives other processes (Ray workers) this process's endpoint: the
    env_vars of a runtime_env; empty when there is none (AWS itself)."""
    url = endpoint()
    return {ENDPOINT_ENV: url} if url else {}


def normalise(uri: str) -> str:
    """An absolute local path, or 's3://bucket/key' without a trailing slash."""
    if is_s3(uri):
        rest = uri.split("://", 1)[1].strip("/")
        if not rest:
            raise UserError(f"{uri!r} names no bucket: use s3://BUCKET/PREFIX")
        return "s3://" + rest
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        raise UserError(f"{uri!r}: unsupported URI scheme; use a local path, file:// or s3://")
    return os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return posixpath.join(uri, *parts)
    return os.path.join(uri, *parts)


def basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/"))


def filesystem(uri: str) -> Tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem serving `uri` and the path inside it."""
    uri = normalise(uri)
    if is_s3(uri):
        url = endpoint()
        kwargs = {"client_kwargs": {"endpoint_url": url}} if url else {}
        fs = fsspec.filesystem("s3", **kwargs)
        return fs, uri[len("s3://"):]
    return fsspec.filesystem("file"), uri


def arrow_filesystem(uri: str):
    """A pyarrow filesystem and path for `uri` (what ray.data.read_parquet wants)."""
    import pyarrow.fs as pafs

    uri = normalise(uri)
    if not is_s3(uri):
        return pafs.LocalFileSystem(), uri
    url = endpoint()
    kwargs = {}
    if url:
        scheme, _, host = url.partition("://")
        kwargs = {"endpoint_override": host or scheme, "scheme": scheme if host else "https"}
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs), uri[len("s3://"):]


def _uri(fs_path: str, like: str) -> str:
    return "s3://" + fs_path.lstrip("/") if is_s3(like) else fs_path


@contextlib.contextmanager
def user_errors(uri: str, action: str) -> Iterator[None]:
    """Turn storage exceptions into one UserError naming the URI and the fix."""
    try:
        yield
    except UserError:
        raise
    except FileNotFoundError as exc:
        raise UserError(f"cannot {action} {uri}: it does not exist; check the path or bucket name") from exc
    except PermissionError as exc:
        raise UserError(f"cannot {action} {uri}: permission denied; check its permissions or your credentials") from exc
    except Exception as exc:  # botocore/aiohttp errors have no common base worth importing
        name = type(exc).__name__
        if name == "NoCredentialsError":
            raise UserError(
                f"cannot {action} {uri}: no AWS credentials; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or an instance profile)"
            ) from exc
        if "EndpointConnectionError" in name or "ClientConnector" in name or "ConnectionError" in name:
            raise UserError(
                f"cannot {action} {uri}: the S3 endpoint is unreachable ({exc}); check --s3-endpoint / "
                "AWS_ENDPOINT_URL"
            ) from exc
        raise


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    with user_errors(uri, "look up"):
        fs.invalidate_cache()
        return fs.exists(path)


def require(uri: str) -> None:
    """UserError naming `uri` unless it exists (cheap: no listing)."""
    if not exists(uri):
        raise UserError(f"cannot read {uri}: it does not exist; check the path or bucket name")


def list_files(uri: str) -> list[str]:
    """All files under `uri`, recursively, as sorted URIs. UserError when `uri` does not exist."""
    uri = normalise(uri)
    fs, path = filesystem(uri)
    with user_errors(uri, "list"):
        fs.invalidate_cache()
        if fs.isfile(path):
            return [uri]
        if not fs.exists(path):
            raise FileNotFoundError(path)
        found = fs.find(path)
    return sorted(_uri(p, uri) for p in found)


def identity(uri: str) -> Dict:
    """What the file at `uri` is now, from its metadata alone (one HEAD on S3, one stat locally; never
    a read): {'uri', 'size', 'etag'} on S3 (the ETag changes with the content: an MD5 of it for a
    single PUT, of its parts for a multipart upload; 'last_modified' where a store gives no ETag),
    {'uri', 'size', 'mtime'} locally (seconds; a rewrite or a copy over it changes it). Equal
    identities mean the same file as far as a skip decision goes. UserError when it does not exist.
    """
    uri = normalise(uri)
    fs, path = filesystem(uri)
    with user_errors(uri, "look up"):
        fs.invalidate_cache(path)
        info = fs.info(path)
    found = {"uri": uri, "size": int(info["size"])}
    if not is_s3(uri):
        return {**found, "mtime": float(info["mtime"])}
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
    return {**found, "etag": etag} if etag else {**found, "last_modified": str(info.get("LastModified", ""))}


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with user_errors(uri, "read"):
        return fs.cat_file(path)


def iter_bytes(uri: str, chunk_size: int = 16 << 20) -> Iterator[bytes]:
    """The bytes of `uri` in pieces of `chunk_size` (one open, sequential reads of that size; on S3
    range requests): a reader that stops early never fetches the rest."""
    fs, path = filesystem(uri)
    with user_errors(uri, "read"):
        with fs.open(path, "rb", block_size=chunk_size) as f:
            while True:
                chunk = f.read(chunk_size)
                if not chunk:
                    return
                yield chunk


class TransientError(OSError):
    """A network failure that another try may not meet (prepare's Ray tasks retry it)."""


def is_transient(exc: Optional[BaseException]) -> bool:
    """Whether a connection failure or a timeout is anywhere in `exc`'s chain of causes."""
    seen = 0
    while exc is not None and seen < 16:
        name = type(exc).__name__
        if isinstance(exc, (ConnectionError, TimeoutError)) or "ConnectionError" in name or "ClientConnector" in name \
                or "Timeout" in name:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to `uri` atomically (temporary sibling + rename locally, one PUT on S3)."""
    uri = normalise(uri)
    fs, path = filesystem(uri)
    with user_errors(uri, "write"):
        if is_s3(uri):
            fs.pipe_file(path, data)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise


def read_versioned(uri: str) -> Tuple[Optional[bytes], Optional[str]]:
    """(bytes, version) of `uri`, (None, None) when absent. The version is the object's ETag on S3 and
    a hash of the bytes locally: what `write_if` compares."""
    uri = normalise(uri)
    fs, path = filesystem(uri)
    with user_errors(uri, "read"):
        if is_s3(uri):
            return _get_with_etag(fs, path)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, None
        return data, hashlib.sha256(data).hexdigest()


def _get_with_etag(fs, path: str) -> Tuple[Optional[bytes], Optional[str]]:
    """(bytes, ETag) of one S3 object from one GET: the body and the ETag of the same response, so the
    bytes are always that version's (s3fs's cat_file gives no headers); (None, None) when absent."""
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(path)

    async def get():
        response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        try:
            return await response["Body"].read(), response.get("ETag")
        finally:
            response["Body"].close()

    try:
        return sync(fs.loop, get)
    except FileNotFoundError:  # s3fs reads NoSuchKey as this
        return None, None


CONDITION_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}  # 412; 409 when two land at once


def _condition_failed(exc: BaseException) -> bool:
    """Whether an S3 error (s3fs wraps botocore's) says a conditional write's condition did not hold."""
    seen = exc
    while seen is not None:
        code = getattr(seen, "response", {}).get("Error", {}).get("Code")
        if code in CONDITION_CODES:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def write_if(uri: str, data: bytes, version: Optional[str]) -> bool:
    """Write `data` to `uri` only if it is still at `version` (from `read_versioned`; None: only if
    absent). Returns False, writing nothing, when another writer got there first. One conditional
    PUT on S3 (If-None-Match: * / If-Match: ETag, which AWS S3, MinIO and the test server honour, and
    some S3-compatible stores ignore: `conditional_writes_honoured`);
    locally a compare-and-rename under an exclusive lock on a sibling lock file."""
    uri = normalise(uri)
    fs, path = filesystem(uri)
    with user_errors(uri, "write"):
        if is_s3(uri):
            try:
                if version is None:
                    fs.pipe_file(path, data, mode="create")
                else:
                    fs.pipe_file(path, data, IfMatch=version)
            except FileExistsError:
                return False
            except OSError as exc:
                if _condition_failed(exc):
                    return False
                raise
            finally:
                fs.invalidate_cache(path)
            return True
        import fcntl

        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if read_versioned(uri)[1] != version:
                return False
            write_bytes(uri, data)
            return True


_HONOURED: Dict[Tuple[Optional[str], str], bool] = {}  # (endpoint, bucket) -> the probe's answer, per process
WRONG_ETAG = '"00000000000000000000000000000000"'  # not the ETag (MD5) of any probe body


def conditional_writes_honoured(folder_uri: str) -> bool:
    """Whether the store refuses a conditional PUT whose condition fails (what `write_if` relies on):
    a uniquely named hidden probe object is created under `folder_uri` with If-None-Match: *, then
    written again with If-None-Match: * and with If-Match of a wrong ETag; both must be refused. The
    probe is deleted afterwards. Some S3-compatible stores (older MinIO, some Ceph RGW) accept the
    headers and ignore them. Always True locally (a compare under a file lock); asked once per
    endpoint and bucket per process (a definite answer is kept; an error is raised and asked again).
    A probe the store will not delete (a credential without DeleteObject) is logged, not raised."""
    folder = normalise(folder_uri)
    if not is_s3(folder):
        return True
    key = (endpoint(), folder[len("s3://"):].split("/", 1)[0])
    if key not in _HONOURED:
        probe = join(folder, f".conditional-write-probe-{uuid.uuid4().hex}")
        try:
            if not write_if(probe, b"1", None):  # a fresh unique name: nothing can be there
                raise UserError(f"cannot write {probe}: the store refused to create a new object")
            _HONOURED[key] = not write_if(probe, b"2", None) and not write_if(probe, b"3", WRONG_ETAG)
        finally:
            try:
                delete(probe)
            except Exception as exc:  # the answer stands; the probe is a hidden name no listing takes
                log.warning("could not delete the conditional-write probe %s: %s", probe, exc)
    return _HONOURED[key]


def delete(uri: str) -> None:
    """Remove a file or a whole tree; nothing happens when it is absent."""
    uri = normalise(uri)
    fs, path = filesystem(uri)
    with user_errors(uri, "delete"):
        fs.invalidate_cache()
        if fs.exists(path):
            fs.rm(path, recursive=True)


def move_file(src: str, dst: str) -> None:
    """Move one file to `dst` (replacing it): a rename locally, copy+delete on S3."""
    src, dst = normalise(src), normalise(dst)
    fs, src_path = filesystem(src)
    _, dst_path = filesystem(dst)
    with user_errors(dst, "move into"):
        if is_s3(src):
            fs.copy(src_path, dst_path)
            fs.rm(src_path)
        else:
            os.makedirs(os.path.dirname(dst_path), exist_ok=True)
            os.replace(src_path, dst_path)


def check_writable(uri: str) -> None:
    """Raise UserError unless a small object can be written and removed under `uri`."""
    probe = join(normalise(uri), f".write-probe-{uuid.uuid4().hex}")
    try:
        write_bytes(probe, b"ok")
    except UserError:
        raise
    except OSError as exc:
        raise UserError(f"cannot write to {uri}: {exc.strerror or exc}; choose a writable output") from exc
    delete(probe)
