"""A watch's lease (`OUTPUT/_watches/<id>/lease.json`: owner and expiry) and the check that the store
of its state can hold one.

The lease is taken when absent, expired or its own, by a conditional write against the version read
(If-None-Match / If-Match on S3, a compare under a file lock locally: `storage.write_if`), so of two
servers on one watch exactly one holds it. Some S3-compatible stores accept those headers and ignore
them (older MinIO, some Ceph RGW): `check_lease_store` probes the watch's state folder and refuses
such a store with one line, unless the server says it runs alone (`serve.py --single-server-watches`:
with no second server, nobody contends for the lease).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Dict, Optional

from lits.core import storage
from lits.core.errors import UserError

log = logging.getLogger(__name__)

_WARNED_ALONE: set = set()  # state folders whose store ignores conditional writes, said once per process


def _versioned_lease(uri: str):
    """(the lease at `uri` or None, its version for `storage.write_if`); raises when it cannot be read
    (a server that cannot tell whether another holds the watch must not take it)."""
    data, version = storage.read_versioned(uri)
    return (json.loads(data) if data is not None else None), version


def read_lease(uri: str) -> Optional[Dict]:
    """The lease at `uri`, None when there is none (`_versioned_lease`)."""
    return _versioned_lease(uri)[0]


def renew_lease(uri: str, owner: str, ttl_s: float) -> bool:
    """Extend `owner`'s lease by `ttl_s` from now, conditionally on the version read; False when it is
    another's now (taken after it expired), or was taken between the read and the write."""
    current, version = _versioned_lease(uri)
    if not current or current.get("owner") != owner:
        return False
    return storage.write_if(uri, json.dumps({"owner": owner, "expires": time.time() + ttl_s}).encode(), version)


def take_lease(uri: str, owner: str, ttl_s: float) -> bool:
    """Whether `owner` holds the lease at `uri` for the next `ttl_s` seconds: taken when absent, expired
    or already its own, by a conditional write against the version read (module docstring), so of
    two servers taking it at once exactly one succeeds."""
    current, version = _versioned_lease(uri)
    now = time.time()
    if current and current.get("owner") != owner and current.get("expires", 0) > now:
        return False
    return storage.write_if(uri, json.dumps({"owner": owner, "expires": now + ttl_s}).encode(), version)


class LeaseStoreRefused(UserError):
    """The store of a watch's state ignores conditional writes: a definite answer, not an outage."""


def check_lease_store(folder: str, watch_id: str, alone: bool = False) -> None:
    """LeaseStoreRefused (one line) unless the store of the watch's state (`folder`) honours conditional
    writes, which its lease needs (`storage.conditional_writes_honoured`, probed in that folder); the
    store's own error (UserError and others) when it cannot be asked now. `alone` (the server runs
    without another on these buckets): such a store is accepted, with one warning per folder."""
    if storage.conditional_writes_honoured(folder):
        return
    where = storage.endpoint() or "AWS S3"
    if alone:
        if folder not in _WARNED_ALONE:
            _WARNED_ALONE.add(folder)
            log.warning("watch %s: the S3 store at %s ignores conditional writes; watching anyway, as this server "
                        "was told it runs alone (--single-server-watches): a second server on this watch would "
                        "segment its objects twice", watch_id, where)
        return
    raise LeaseStoreRefused(
        f"watch {watch_id} not started: the S3 store at {where} ignores conditional writes (a PUT under "
        f"{folder} with If-None-Match: * or a wrong If-Match landed), so two servers could both hold the "
        "watch's lease and segment its objects twice; use a store that honours them (AWS S3, MinIO from "
        "2024-08 on), segment this prefix with bulk jobs (POST /v1/jobs), or, when this server is the only "
        "one that will ever run watches on these buckets, start it with --single-server-watches")
