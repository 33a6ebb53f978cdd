"""What a watch knows about the objects under its prefix, and the rules that move them on (pure: no Ray,
no I/O; `lits.serve.watches` lists, writes and submits).

One entry per key (its path below the watch's input), holding the object's identity as the listing
gives it (size and ETag on S3, size and mtime elsewhere) and where it is:

    pending    seen, not yet unchanged across two polls in a row (still being written, maybe)
    submitted  ready: a bulk job segments it (`job_id`)
    done       its mask and report are written (`lag_s`: from first seen to its volume's result for an
               object, to its job's end for a folder)
    failed     its job failed it (`reason`)

A new key is segmented once; a key whose identity changes (replaced) is pending again and segmented
again; a key that disappears is left alone (its outputs stay; a pending one is forgotten).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import re
import uuid
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

WATCH_ID = re.compile(r"[0-9a-f]{12}")
READY_POLLS = 2  # an object is ready once its identity was the same in this many polls in a row
STATES = ("pending", "submitted", "done", "failed")


@dataclass(frozen=True)
class WatchSpec:
    """A watch: objects landing under `input` are segmented into `output`, polled every `poll_s`.

    Attributes:
        input, output: URIs, checked against the allow-list and normalised by the caller.
        poll_s: seconds between two listings of `input`.
        overwrite: passed to each job (recompute outputs that exist for this model).
        max_jobs: jobs of this watch running at once; ready objects beyond wait as pending.
        watch_id: 12 hex digits.
    """

    input: str
    output: str
    poll_s: float = 10.0
    overwrite: bool = False
    max_jobs: int = 4
    watch_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:12])

    def __post_init__(self) -> None:
        for name in ("input", "output"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if not WATCH_ID.fullmatch(self.watch_id):
            raise ValueError(f"watch_id must be 12 lower-case hex digits, got {self.watch_id!r}")
        if not 0.05 <= self.poll_s <= 3600:
            raise ValueError(f"poll_s must be in [0.05, 3600] seconds, got {self.poll_s}")
        if not 1 <= self.max_jobs <= 256:
            raise ValueError(f"max_jobs must be in [1, 256], got {self.max_jobs}")

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)


def identity_of(info: Dict) -> Dict:
    """The identity fields of one fsspec listing entry: {'size', 'etag'} or {'size', 'mtime'}."""
    size = int(info.get("size") or 0)
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
    if etag:
        return {"size": size, "etag": etag}
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
    return {"size": size, "mtime": str(mtime)}


def advance(entries: Dict[str, Dict], listing: Dict[str, Dict], now: float) -> List[str]:
    """Move `entries` (key -> entry, changed in place) on by one poll's `listing` (key -> identity);
    return the keys that became ready (submit them), in key order. An identity with a 'refused'
    reason is never submitted: once ready it is failed with that reason."""
    ready = []
    for key, identity in listing.items():
        entry = entries.get(key)
        if entry is None or entry["identity"] != identity:
            if entry is not None and entry["state"] == "submitted":
                entry["replaced"] = True  # changed under its job: segmented again once that job ends
                continue
            versions = (entry or {}).get("versions", 0) + (entry is not None and entry["state"] != "pending")
            entries[key] = {"identity": identity, "state": "pending", "polls": 1, "first_seen": now,
                            "versions": versions}
            continue
        if entry["state"] == "pending":
            entry["polls"] += 1
            if entry["polls"] >= READY_POLLS and identity.get("refused"):  # never segmented: failed, with why
                entry.update(state="failed", reason=identity["refused"], done_at=now,
                             lag_s=round(now - entry["first_seen"], 3))
            elif entry["polls"] >= READY_POLLS:
                ready.append(key)
    for key in [k for k, e in entries.items() if k not in listing and e["state"] == "pending"]:
        del entries[key]  # gone before it was ready
    return sorted(ready)


def submitted(entries: Dict[str, Dict], keys: Sequence[str], job_id: str, now: float) -> None:
    for key in keys:
        entries[key].update(state="submitted", job_id=job_id, submitted_at=now)


def finished(entries: Dict[str, Dict], key: str, ok: bool, reason: Optional[str], now: float) -> None:
    """`key`'s volume (or, for a folder, its job) ended: done (with its lag) or failed (with the reason). A
    key replaced while its job ran is pending again."""
    entry = entries[key]
    if entry.pop("replaced", False):
        entries[key] = {"identity": {}, "state": "pending", "polls": 0, "first_seen": now,
                        "versions": entry.get("versions", 0) + 1}
        return
    entry.update(state="done" if ok else "failed", done_at=now, lag_s=round(now - entry["first_seen"], 3))
    if not ok:
        entry["reason"] = reason or "failed"


def retry(entries: Dict[str, Dict], key: str) -> None:
    """The job of `key` was lost (its server stopped while it ran): ready again at the next poll that
    finds it unchanged; its lag still counts from when it was first seen."""
    entry = entries[key]
    entry.update(state="pending", polls=READY_POLLS - 1, retries=entry.get("retries", 0) + 1)
    entry.pop("job_id", None)
    entry.pop("submitted_at", None)  # it moved back to pending: `order=recent` sorts it by when it was seen


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """The q-th percentile (0-100) by nearest rank, None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


ORDERS = ("key", "recent")


def _changed_at(entry: Dict) -> float:
    """When the entry last moved: done or failed, else submitted, else first seen."""
    return entry.get("done_at") or entry.get("submitted_at") or entry.get("first_seen") or 0.0


def summary(entries: Dict[str, Dict], failed_listed: int = 100, rows: int = 0, order: str = "key") -> Dict:
    """Counts per state, lag p50/p95 of the done ones, the first `failed_listed` failures and pending keys,
    and with `rows` > 0 `rows` entries ('entries': key, state, reason, job_id, lag_s, changed_at): the first
    by key (order 'key') or the latest to move first (order 'recent'). One pass plus partial sorts, so a
    watch of 100,000 keys answers without sorting them all."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
    counts = {s: 0 for s in STATES}
    lags, failed_keys, pending_keys = [], [], []
    for key, entry in entries.items():
        counts[entry["state"]] += 1
        if entry["state"] == "done":
            lags.append(entry["lag_s"])
        elif entry["state"] == "failed":
            failed_keys.append(key)
        elif entry["state"] == "pending":
            pending_keys.append(key)
    failed = [{"key": key, "reason": entries[key].get("reason"), "job_id": entries[key].get("job_id")}
              for key in heapq.nsmallest(failed_listed, failed_keys)]
    found = {"counts": counts, "lag_s": {"p50": percentile(lags, 50), "p95": percentile(lags, 95), "n": len(lags)},
             "failed": failed, "pending": heapq.nsmallest(failed_listed, pending_keys)}
    if rows > 0:
        keys = (heapq.nsmallest(rows, entries) if order == "key" else
                heapq.nlargest(rows, entries, key=lambda k: (_changed_at(entries[k]), k)))
        found["entries"] = [{"key": key, "state": entries[key]["state"], "reason": entries[key].get("reason"),
                             "job_id": entries[key].get("job_id"), "lag_s": entries[key].get("lag_s"),
                             "changed_at": _changed_at(entries[key]) or None} for key in keys]
    return found


def job_batches(ready: Sequence[str], running_jobs: int, max_jobs: int, per_job: int) -> List[List[str]]:
    """The jobs to submit now for the `ready` keys while `running_jobs` of the watch's `max_jobs` run:
    each a list of at most `per_job` keys, at most `max_jobs - running_jobs` of them; the key '/' (the
    input folder itself, one series) alone. Keys left out stay pending, ready again at the next poll."""
    room = max(0, max_jobs - running_jobs)
    keys = [k for k in ready if k != "/"]
    batches = [["/"]] if "/" in ready else []
    batches += [list(keys[i:i + per_job]) for i in range(0, len(keys), per_job)]
    return batches[:room]


def outcomes(uris: Dict[str, str], records: Iterable[Dict], missing: str) -> Dict[str, Tuple[bool, Optional[str]]]:
    """key -> (ok, failure reason) of one job's keys from its volume results (`records`: 'input',
    'status', 'reason'). `uris`: each key's input URI (an object's, or a folder's for a key ending in
    '/', whose series' inputs lie in it). A key is done when
    each of its volumes is done or skipped, failed with the first failed one's reason otherwise,
    and failed with `missing` when no volume of it was recorded (none found there, or the job
    stopped first). So a key whose volume succeeded is done whatever another key of the job did.
    An object key owns the record of its own URI; a lone folder key every record."""
    found: Dict[str, Tuple[bool, Optional[str]]] = {}
    for record in records:
        key = _key_of(str(record.get("input", "")), uris)
        if key is None:
            continue
        ok = record.get("status") in ("done", "skipped")
        if key not in found or (found[key][0] and not ok):
            found[key] = (ok, None if ok else record.get("reason") or "failed")
    return {key: found.get(key, (False, missing)) for key in uris}


def settled_early(uris: Dict[str, str], records: Iterable[Dict]) -> Dict[str, Tuple[bool, Optional[str]]]:
    """key -> (ok, failure reason) of the keys a running job already finished, from the volume results
    recorded so far: an object key is one volume, so its result settles it; a folder key ('/'-ended:
    a series folder, maybe several volumes) waits for its job's end (`outcomes`)."""
    objects = {key: uri for key, uri in uris.items() if not key.endswith("/")}
    found = outcomes(objects, records, missing="") if objects else {}
    return {key: outcome for key, outcome in found.items() if outcome[1] != ""}


def _key_of(uri: str, uris: Dict[str, str]) -> Optional[str]:
    if len(uris) == 1 and next(iter(uris)).endswith("/"):  # a lone folder key: its series may be named short
        return next(iter(uris))
    for key, base in uris.items():
        base = base.rstrip("/")
        if uri == base or (key.endswith("/") and uri.startswith(base + "/")):
            return key
    return None
