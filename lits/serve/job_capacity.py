"""How many volumes a bulk job runs at once, and in which placement group each one runs.

A job's CPUs are the app's volume pool (`job_tasks.create_pool`, reserved when the app is
deployed) plus, when the pool is elastic, placement groups the job adds itself while it runs:

- **Nodes that join.** Every `REFRESH_S` the job takes the CPUs that are free and that neither the
  app's replicas (`reserve_cpus`: all of them at their maximum count, up or not, so a replica that
  died is never robbed) nor any placement group hold, in a group of its own (named after the app
  and the job, owned by the job's actor: Ray removes it when the actor ends).
- **Asking for nodes.** Every refresh the job asks the autoscaler for a cluster that holds the
  replicas, its groups and the volumes still waiting, at most `MAX_CONCURRENCY` in flight
  (`ray.autoscaler.sdk.request_resources`: a head with `CPU: 0`, as in cluster.yaml, then gets CPU
  nodes); the request shrinks as the job drains and is withdrawn when the last running job ends (with
  several jobs at once, the latest refresh's request stands). Without an autoscaler it does nothing.

- **The model's window.** Volumes in flight never exceed what the model replicas can absorb:
  their running count (asked of Serve every `REFRESH_S`, so the window follows autoscaling) times
  `volumes_per_replica` each (`ModelWindow`). CPU work runs ahead of the model only that far, and
  the autoscaler is asked only for the CPUs of the volumes inside the window.

A fixed pool (`--volume-cpus` given, or a job submitted without `reserve_cpus`) never grows: a
job's concurrency is the pool's CPUs / cpus_per_volume. An app without any pool (none
could be reserved, not elastic) runs its tasks anywhere, at most the cluster's CPUs at a time.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Dict, List, Optional

import ray

from lits.runtime.fanout import request_cpus
from lits.serve.job_tasks import find_pool, in_pool, pool_name, pool_shape
from lits.serve.model_client import MODEL_DEPLOYMENT

log = logging.getLogger(__name__)

VOLUMES_PER_REPLICA = 3  # the default window per running model replica (ServeConfig.volumes_per_replica)
MAX_CONCURRENCY = 1024  # volumes in flight per job: at least 20 cpu-spot nodes x 16 CPUs (cluster.yaml)
REFRESH_S = 5.0  # how often a job looks for CPUs that joined
READY_WAIT_S = 10.0  # how long a new group may take to be placed before it is given up (and tried later)


def extension_prefix(app_name: str, job_id: str) -> str:
    return f"{pool_name(app_name)}+{job_id}-"


def _held_cpus() -> float:
    """CPUs every placed placement group holds (volume pools, training groups, ...)."""
    from ray.util.placement_group import placement_group_table

    return sum(float(b.get("CPU", 0)) for info in placement_group_table().values() if info.get("state") == "CREATED"
               for b in info.get("bundles", {}).values())


def spare_cpus(reserve_cpus: float) -> float:
    """CPUs a job may add now: free ones, less what the replicas may take and the groups hold."""
    total = ray.cluster_resources().get("CPU", 0.0)
    free = ray.available_resources().get("CPU", 0.0)
    return max(0.0, min(free, total - reserve_cpus - _held_cpus()))


def running_replicas(app_name: str, deployment: str = MODEL_DEPLOYMENT) -> Optional[int]:
    """Replicas of the app's model deployment Serve reports RUNNING; None when Serve cannot say."""
    from ray import serve

    try:
        app = serve.status().applications.get(app_name)
        states = app.deployments[deployment].replica_states if app is not None else {}
    except Exception as exc:  # the controller is busy or restarting: keep the last count
        log.debug("replicas of %s unknown: %s", app_name, exc)
        return None
    return int(sum(n for state, n in states.items() if str(getattr(state, "value", state)) == "RUNNING"))


class ModelWindow:
    """How many volumes the model replicas can absorb now: running replicas x `per_replica` (at
    least one replica's worth, so that a job waits for a replacement instead of stopping).
    Asked of Serve at most every `REFRESH_S`."""

    def __init__(self, app_name: str, per_replica: int = VOLUMES_PER_REPLICA):
        self.app_name = app_name
        self.per_replica = max(1, int(per_replica))
        self.replicas = 1
        self.asked = 0.0

    def size(self) -> int:
        if time.time() - self.asked >= REFRESH_S:
            self.asked = time.time()
            running = running_replicas(self.app_name)
            if running is not None:
                self.replicas = max(1, running)
        return self.replicas * self.per_replica


class JobCapacity:
    """The placement groups one job's volume tasks run in, and how many volumes may be in flight.

    Args:
        app_name, job_id: the app (its volume pool) and the job (the name of its own groups).
        cpus_per_volume: CPUs one volume task reserves.
        reserve_cpus: CPUs the app's replicas may hold; None: the pool is fixed (never grows).
        concurrency: the caller's cap on volumes in flight (None: what the groups hold).
        window: volumes the model can absorb now (`ModelWindow.size`); None: no such bound.
    """

    def __init__(self, app_name: str, job_id: str, cpus_per_volume: float, reserve_cpus: Optional[float] = None,
                 concurrency: Optional[int] = None, window: Optional[Callable[[], int]] = None):
        self.app_name, self.job_id = app_name, job_id
        self.cpus_per_volume = cpus_per_volume
        self.bundle = max(1.0, float(cpus_per_volume))
        self.reserve_cpus = reserve_cpus
        self.max = min(concurrency or MAX_CONCURRENCY, MAX_CONCURRENCY)
        self.window = window
        base = find_pool(app_name)
        self.groups: List = [base] if base is not None else []
        self.own_from = len(self.groups)  # the groups from here on are the job's own
        self.slots: List[int] = [self._slots(base)] if base is not None else []
        self.running: List[int] = [0] * len(self.groups)
        self.refreshed = 0.0
        self.requested = 0

    def _slots(self, pg) -> int:
        return int(pool_shape(pg)[0] / self.cpus_per_volume)

    @property
    def cap(self) -> int:
        """The most volumes in flight now: the caller's cap, within the model's window."""
        return min(self.max, self.window()) if self.window is not None else self.max

    @property
    def elastic(self) -> bool:
        return self.reserve_cpus is not None

    def concurrency(self) -> int:
        """Volumes that may be in flight now."""
        if not self.groups and not self.elastic:  # no pool at all: the cluster's CPUs, as they are now
            return max(1, min(self.cap, int(ray.cluster_resources().get("CPU", 1) / self.cpus_per_volume)))
        return min(self.cap, sum(self.slots)) if self.groups else 0

    def refresh(self, waiting: int) -> None:
        """Every REFRESH_S: take the CPUs that joined for the `waiting` volumes (not yet in flight),
        and ask the autoscaler for a cluster that holds the replicas, this job's groups and them."""
        if not self.elastic or time.time() - self.refreshed < REFRESH_S:
            return
        self.refreshed = time.time()
        wanted = self._unplaced(waiting)
        count = int(min(spare_cpus(self.reserve_cpus), wanted * self.cpus_per_volume) // self.bundle) if wanted else 0
        if count >= 1 and self._grow(count):
            wanted = self._unplaced(waiting)
        need = math.ceil(self.reserve_cpus + sum(self.slots) * self.cpus_per_volume + wanted * self.cpus_per_volume)
        request_cpus(need)  # again every refresh: another run's request (the latest stands) may have replaced it
        self.requested = need

    def _unplaced(self, waiting: int) -> int:
        """Waiting volumes no free slot takes (up to the cap)."""
        return max(0, min(waiting - (self.concurrency() - sum(self.running)), self.cap - self.concurrency()))

    def _grow(self, count: int) -> bool:
        from ray.util.placement_group import placement_group, remove_placement_group

        name = f"{extension_prefix(self.app_name, self.job_id)}{len(self.groups)}"
        pg = placement_group([{"CPU": self.bundle}] * count, strategy="PACK", name=name)
        try:
            ray.get(pg.ready(), timeout=READY_WAIT_S)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(pg)  # taken meanwhile: the next refresh looks again
            return False
        self.groups.append(pg)
        self.slots.append(self._slots(pg))
        self.running.append(0)
        log.info("job %s: %g more CPUs for volume tasks (%d volumes at once now)", self.job_id, count * self.bundle,
                 self.concurrency())
        return True

    def place(self) -> Dict:
        """Options for the next task (the group with the most free slots); call `done(index)` after it."""
        if not self.groups:
            return {"index": None, "options": {}}
        index = max(range(len(self.groups)), key=lambda i: self.slots[i] - self.running[i])
        self.running[index] += 1
        return {"index": index, "options": in_pool(self.groups[index])}

    def done(self, index: Optional[int]) -> None:
        if index is not None:
            self.running[index] -= 1

    def release(self, others_running: bool) -> None:
        """Remove the job's own groups; withdraw the autoscaler request unless other jobs run."""
        from ray.util.placement_group import remove_placement_group

        for pg in self.groups[self.own_from:]:
            try:
                remove_placement_group(pg)
            except Exception as exc:  # already gone with its owner
                log.debug("job %s: removing a placement group: %s", self.job_id, exc)
        if self.requested and not others_running:
            request_cpus(0)
