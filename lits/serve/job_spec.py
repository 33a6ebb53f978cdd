"""One bulk job's settings (`JobSpec`) and where a job is found: its actor's name, its record, its summary.

A `JobSpec` is fixed when the job is submitted and passed whole to the job's actor and to every
volume task, so no setting travels by position across a Ray boundary.
"""

from __future__ import annotations

import dataclasses
import os
import re
import uuid
from dataclasses import dataclass
from typing import Optional, Tuple

from lits.core import naming, storage
from lits.serve.model_client import MODEL_WAIT_S

JOBS_NAMESPACE = "lits-jobs"
ACTOR_PREFIX = "lits-job-"
JOBS_FOLDER = "_jobs"  # under a job's output: <job_id>.json, its summary; <job_id>/volumes-*.jsonl, its results
JOBS_STATE_ENV = "LITS_JOBS_STATE"
JOB_ID = re.compile(r"[0-9a-f]{12}")


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


def default_jobs_state() -> str:
    """Where job records live unless the server is told (`--jobs-state`): $LITS_JOBS_STATE or
    ~/.cache/lits/jobs."""
    return os.environ.get(JOBS_STATE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "lits", "jobs")


def record_uri(jobs_state: str, job_id: str) -> str:
    """The job's record: `<jobs_state>/<job_id>.json`."""
    return storage.join(storage.normalise(jobs_state), f"{job_id}.json")


def records_shard(folder: str, index: int) -> str:
    """Shard `index` of a job's volume results: `<records folder>/volumes-NNNNN.jsonl`."""
    return storage.join(folder, f"volumes-{index:05d}.jsonl")


def refused_input(key: str, input_uri: str, output_uri: str) -> Optional[str]:
    """Why `key` cannot be one of a job's explicit inputs (`JobSpec.inputs`), or None when it can: it
    must be a relative path below `input_uri` (a NIfTI object's key, or a folder's ending in '/') with
    no empty, '.' or '..' part, no backslash or control character (`naming.refused_name`), that does
    not lie in `output_uri`: so no crafted key reads outside the input or names outputs outside the
    output."""
    if not isinstance(key, str) or not key.rstrip("/"):
        return f"an input must be a non-empty path below the job's input, got {key!r}"
    if key.startswith("/") or "\\" in key:
        return f"an input must be a relative path below the job's input, got {key!r}"
    why = naming.refused_name(key[:-1] if key.endswith("/") else key)
    if why:
        return why
    uri, out = storage.join(input_uri, key.rstrip("/")), output_uri.rstrip("/")
    if uri == out or uri.startswith(out + "/"):
        return f"the input {key!r} lies in the job's output {output_uri}"
    return None


@dataclass(frozen=True)
class JobSpec:
    """A bulk job: every NIfTI under `input` -> a mask, a preview and a report under `output`.

    Attributes:
        input, output: URIs, already checked against the allow-list and normalised by the caller.
        inputs: None: every input under `input` (listed by the job). Else exactly these, as keys
            below `input` (`refused_input` says which may be): NIfTI objects ('a/volume-1.nii.gz')
            and folders of DICOM files ('p1/ct/'); their outputs are named as a job over the whole
            `input` names them. What a watch submits: the objects it found ready, and no other.
        app_name: the Serve application holding the model deployment (and its volume pool).
        overwrite: recompute volumes whose outputs exist for this model.
        chunk: slices per model request.
        concurrency: volumes in flight; None: what the app's volume pool holds / cpus_per_volume.
        cpus_per_volume: CPUs a volume task reserves. A task waits on the model for much of its
            time, so below 1 lets more volumes overlap on a CPU-only machine.
        allow: the server's allow-list; every file a volume reads or writes must resolve inside it
            (empty: no check, local paths were refused at the door).
        wait_s: the longest wait for one answer of the model deployment.
        reserve_cpus: CPUs the app's replicas may hold; given, the job adds CPUs that join the
            cluster to its pool (`lits.serve.job_capacity`); None: the app's pool as it is.
        jobs_state: the folder of job records; None: `default_jobs_state()`, resolved by
            `jobs.submit_job` in the submitting process.
        job_id: 12 hex digits; the job's actor is named ACTOR_PREFIX + job_id in JOBS_NAMESPACE.
    """

    input: str
    output: str
    app_name: str
    overwrite: bool = False
    chunk: int = 16
    concurrency: Optional[int] = None
    cpus_per_volume: float = 1.0
    allow: Tuple[str, ...] = ()
    wait_s: float = MODEL_WAIT_S
    reserve_cpus: Optional[float] = None
    jobs_state: Optional[str] = None
    job_id: str = dataclasses.field(default_factory=new_job_id)
    inputs: Optional[Tuple[str, ...]] = None

    def __post_init__(self) -> None:
        # A list from a caller would make the spec unhashable and mutable behind its back.
        object.__setattr__(self, "allow", tuple(self.allow))
        if self.inputs is not None:
            object.__setattr__(self, "inputs", tuple(self.inputs))
        for name in ("input", "output", "app_name"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if not isinstance(self.job_id, str) or not JOB_ID.fullmatch(self.job_id):
            raise ValueError(f"job_id must be 12 lower-case hex digits, got {self.job_id!r}")
        if not isinstance(self.overwrite, bool):
            raise ValueError(f"overwrite must be True or False, got {self.overwrite!r}")
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1 slice, got {self.chunk}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1 volume, got {self.concurrency}")
        if not 0 < self.cpus_per_volume <= 64:
            raise ValueError(f"cpus_per_volume must be in (0, 64], got {self.cpus_per_volume}")
        if not all(isinstance(p, str) and p for p in self.allow):
            raise ValueError(f"allow must hold non-empty URI prefixes, got {self.allow!r}")
        if not self.wait_s > 0:
            raise ValueError(f"wait_s must be > 0, got {self.wait_s}")
        if self.reserve_cpus is not None and self.reserve_cpus < 0:
            raise ValueError(f"reserve_cpus must be >= 0, got {self.reserve_cpus}")
        if self.jobs_state is not None and not self.jobs_state:
            raise ValueError("jobs_state must name a folder or bucket prefix (or be None)")
        if self.inputs is not None:
            if not self.inputs:
                raise ValueError("inputs must name at least one input below the job's input (or be None: all)")
            for key in self.inputs:
                why = refused_input(key, self.input, self.output)
                if why:
                    raise ValueError(why)

    @property
    def actor_name(self) -> str:
        return ACTOR_PREFIX + self.job_id

    @property
    def records_folder(self) -> str:
        """`OUTPUT/_jobs/<job_id>/`: the shards of the job's volume results (`records_shard`)."""
        return storage.join(self.output, JOBS_FOLDER, self.job_id)

    @property
    def summary_uri(self) -> str:
        """`OUTPUT/_jobs/<job_id>.json`: the job's summary, beside its outputs."""
        return storage.join(self.output, JOBS_FOLDER, f"{self.job_id}.json")

    @property
    def record_uri(self) -> str:
        """The job's record in the jobs state folder (the folder resolved: see `jobs_state`)."""
        return record_uri(self.jobs_state or default_jobs_state(), self.job_id)
