"""Which URIs the server may touch (pure: no Ray, no I/O beyond resolving local symlinks), and
the variable that holds the API token (read by the server and by its clients).

The HTTP API checks a job's input and output URIs with `check_uri` and how they lie to each other
and to the jobs state folder with `check_job_uris`; every file a job then reads or writes is checked
again with `check_resolved`, because a symlink below an allowed folder (a file, or a sub-folder of
the output) may point anywhere, and every file it writes with `check_inside` against the job's own
output, because the allow-list may hold other jobs' outputs and the jobs state.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

from lits.core import naming, storage
from lits.core.errors import BadInputError, UserError

TOKEN_ENV = "LITS_API_TOKEN"  # the API's bearer token: serve.py hashes it, segment.py sends it


class AccessError(Exception):
    """A job URI the server refuses: `status` 400 (malformed) or 403 (outside the allow-list)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _normalise_allowed(prefix: str) -> str:
    uri = storage.normalise(prefix)
    return uri if storage.is_s3(uri) else os.path.realpath(uri)


def _under(uri: str, prefixes: Sequence[str]) -> bool:
    return any(uri == p or uri.startswith(p.rstrip("/") + "/") for p in prefixes)


def check_uri(uri: str, allow_prefixes: Sequence[str]) -> str:
    """The normalised URI when a job may use it; AccessError otherwise.

    Rules: s3:// or a local path (file:// or absolute); no '.' or '..' segment, backslash, or
    control or format character (naming.hidden_character: C0, DEL, C1, bidi overrides, zero-width
    characters, as input names); with no allow-list any s3:// URI and no local path; with one, the
    URI must equal an allowed prefix or lie under it (compared by path segment, local paths after
    resolving symlinks).
    """
    if not isinstance(uri, str) or not uri.strip():
        raise AccessError(400, "empty URI")
    hidden = naming.hidden_character(uri)
    if hidden:
        raise AccessError(400, f"{uri!r} holds {hidden}: control and format characters are not allowed in URIs")
    if "\\" in uri:
        raise AccessError(400, f"{uri!r}: backslashes are not allowed in URIs")
    scheme = _SCHEME.match(uri)
    if scheme and scheme.group(0).lower() not in ("s3://", "file://"):
        raise AccessError(400, f"{uri!r}: unsupported scheme; use s3:// (or a local path where allowed)")
    path = uri[scheme.end():] if scheme else uri
    if any(seg in (".", "..") for seg in path.split("/")):
        raise AccessError(400, f"{uri!r}: '.' and '..' path segments are not allowed")
    local = not (scheme and scheme.group(0).lower() == "s3://")
    if local and not path.startswith("/"):
        raise AccessError(400, f"{uri!r}: local paths must be absolute")
    try:
        normal = storage.normalise(uri)
    except UserError as exc:
        raise AccessError(400, str(exc)) from exc
    if local:
        normal = os.path.realpath(normal)
    allowed = [_normalise_allowed(p) for p in allow_prefixes]
    if not allowed:
        if local:
            raise AccessError(403, f"{uri!r}: local paths are refused; start the server with --allow-prefix for them")
        return normal
    if _under(normal, allowed):
        return normal
    raise AccessError(403, f"{uri!r} lies outside the allowed prefixes ({', '.join(allowed)})")


def check_resolved(uri: str, allow_prefixes: Sequence[str], action: str) -> None:
    """BadInputError (one line) when the file a job is about to read or write resolves outside the
    allow-list: a local path is resolved with os.path.realpath (every symlink in it, the file's own
    included); s3:// keys have no symlinks. Nothing to check without an allow-list (local paths are
    then refused at the door)."""
    if not allow_prefixes or storage.is_s3(uri):
        return
    resolved = os.path.realpath(storage.normalise(uri))
    allowed = [_normalise_allowed(p) for p in allow_prefixes]
    if not _under(resolved, allowed):
        raise BadInputError(f"refused to {action} {uri}: it resolves to {resolved}, outside the allowed prefixes "
                            f"({', '.join(allowed)}); a symlink points out of them")


def check_job_uris(input_uri: str, output_uri: str, jobs_state: str) -> None:
    """AccessError (400) when a job's URIs overlap where they must not:

    - the output and the jobs state folder (either inside the other, or equal): a volume's report
      `<rel>.json` could replace a job's record `<job_id>.json`;
    - the output equal to the input, or containing it: everything under the output is skipped as
      the job's own outputs, so the job would find no CT (a single file named by the input may lie
      in its output folder: its outputs are written beside it).
    An output inside the input is fine: a job may write into the LiTS folder it reads (its output
    prefix is skipped when listing).
    """
    inp, out, state = (_normalise_allowed(u) for u in (input_uri, output_uri, jobs_state))
    if _under(out, [state]) or _under(state, [out]):
        raise AccessError(400, f"output {output_uri} overlaps the jobs state folder {state} (--jobs-state): a report "
                               "could replace a job's record; choose an output outside it")
    if out == inp:
        raise AccessError(400, f"output {output_uri} is the input itself: the job would skip every file under its "
                               f"output and find no CT; write into a folder beside it or inside it (e.g. {out}/seg)")
    if _under(inp, [out]) and not inp.endswith(naming.NIFTI_SUFFIXES):
        raise AccessError(400, f"output {output_uri} contains the input {input_uri}: the job would skip every file "
                               f"under its output and find no CT; write beside the input or inside it (e.g. {inp}/seg)")


def check_inside(uri: str, output: str) -> None:
    """BadInputError (one line) unless `uri`, a file a job is about to write, lies strictly inside the
    job's `output`: locally after resolving every symlink of both (a sub-folder of the output may
    point elsewhere, even inside the allow-list); on S3 with no empty, '.' or '..' part below the
    output (stored literally on S3, such a key lands elsewhere behind a normalising gateway or
    after a sync to disk)."""
    if storage.is_s3(uri):
        root = storage.normalise(output)
        rest = uri[len(root) + 1:].split("/") if uri.startswith(root + "/") else None
        if rest is not None and not any(p in ("", ".", "..") for p in rest):
            return
        raise BadInputError(f"refused to write {uri}: it is not a plain name inside the job's output {root}")
    resolved, root = os.path.realpath(storage.normalise(uri)), os.path.realpath(storage.normalise(output))
    if resolved == root or not _under(resolved, [root]):
        raise BadInputError(f"refused to write {uri}: it resolves to {resolved}, outside the job's output {root}")
