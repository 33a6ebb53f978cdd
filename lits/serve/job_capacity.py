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
  a number of volumes per replica (`ModelWindow`). That number starts at `volumes_per_replica`
  and follows the replicas' busy fraction (their forward-pass seconds per second, read from
  `SegmentModel.progress`): while the window is full, a whole window's worth of volumes finished
  since the last reading (so not while tasks start) and the model was busy less than `IDLE_BELOW`
  of the time, the CPU side is what bounds the job, so the window grows (x1.5, at most
  `MAX_PER_REPLICA`); once the model is busy more than `BUSY_ABOVE` of the time (or too busy to
  answer a reading within a refresh), extra volumes would only queue at it, so it halves, never
  below `volumes_per_replica`. Readings never block the job: each refresh reads the answers to the
  calls the previous one sent. CPU work runs ahead of the model only that far, and the autoscaler
  is asked only for the CPUs of the volumes inside the window.
- **Growth must pay** (`GrowthTrial`). An idle model says the CPU side bounds the job, not that more
  volumes at once will go faster: CPUs that are oversubscribed (logical CPUs over fewer cores, a
  node's disk or network, the object store) finish no more volumes per second in a bigger window.
  So each growth is a trial: once the grown window is first filled (an elastic pool's new CPUs may
  take minutes), one refresh is left to settle (new tasks start), and over the `JUDGE_REFRESHES`
  after that the job's mean completion rate must have risen by `GROWTH_PAYS` over the mean of as
  many refreshes before the growth, or the window goes back and is not grown past that size again
  for `CEILING_REFRESHES` refreshes (a new replica count forgets that bar).

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
MAX_PER_REPLICA = 64  # the most a window grows to per replica while the model idles
IDLE_BELOW = 0.8  # busy fraction under which a full window grows
BUSY_ABOVE = 0.95  # busy fraction over which a grown window shrinks
MAX_CONCURRENCY = 1024  # volumes in flight per job: at least 20 cpu-spot nodes x 16 CPUs (cluster.yaml)
GROWTH_PAYS = 1.10  # a grown window is kept when the job's completion rate rose this much (GrowthTrial)
JUDGE_REFRESHES = 2  # refreshes whose mean completion rate judges a growth, against as many before it
CEILING_REFRESHES = 12  # how long a growth that did not pay bars the window from growing past it again
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


def next_per_replica(current: int, base: int, busy: Optional[float], full: bool) -> int:
    """The window per replica after one refresh: grow by half while the window is `full` (in use,
    and turned over once since the last reading) and the replicas' `busy` fraction is under
    IDLE_BELOW; halve over BUSY_ABOVE (never below `base`); unchanged otherwise, and when the busy
    fraction is unknown (None)."""
    if busy is None:
        return current
    if busy < IDLE_BELOW and full:
        return min(MAX_PER_REPLICA, max(current + 1, int(current * 1.5)))
    if busy > BUSY_ABOVE:
        return max(base, current // 2)
    return current


class GrowthTrial:
    """Keeps a window's growth only when the job then finishes volumes faster (module docstring).

    `step(current, proposed, rate, filled)` at each refresh: `current` volumes per replica,
    `proposed` what `next_per_replica` says, `rate` the volumes finished per second since the
    previous refresh (None at the first: no growth without a baseline). Returns the volumes per
    replica to use. A trial waits until the grown window was first filled, however long the CPUs
    for it took to come, leaves one refresh to settle, then compares the mean rate of the next
    `judge_refreshes` refreshes with the mean of the (up to) `judge_refreshes` before the growth:
    one interval of a few seconds holds too few volumes of a small window to tell 10% apart.
    Shrinking is always allowed (and ends a trial)."""

    def __init__(self, pays: float = GROWTH_PAYS, ceiling_refreshes: int = CEILING_REFRESHES,
                 judge_refreshes: int = JUDGE_REFRESHES):
        self.pays, self.ceiling_refreshes, self.judge_refreshes = pays, ceiling_refreshes, max(1, judge_refreshes)
        # (volumes per replica before the growth, mean rate before it, settled, rates since it settled)
        self.trial: Optional[tuple] = None
        self.recent: List[float] = []  # the last judge_refreshes rates outside a trial: the next baseline
        self.ceiling: Optional[int] = None  # a size whose growth did not pay: not grown past for a while
        self.ceiling_left = 0

    def _seen(self, rate: Optional[float]) -> None:
        if rate is not None:
            self.recent = (self.recent + [rate])[-self.judge_refreshes:]

    def step(self, current: int, proposed: int, rate: Optional[float], filled: bool = True) -> int:
        """`filled`: the grown window was in use (volumes in flight reached it) since the last refresh;
        a trial waits for that (CPUs an elastic pool asked for take minutes to join) before it settles."""
        if self.ceiling is not None:
            self.ceiling_left -= 1
            if self.ceiling_left <= 0:
                self.ceiling = None
        if proposed < current or rate is None:  # the model saturated (or nothing to compare with)
            self.trial = None
            self._seen(rate)
            return min(current, proposed)
        if self.trial is not None:
            before, before_rate, settled, rates = self.trial
            if not settled:  # filling the grown window, then one refresh while its new tasks start
                self.trial = (before, before_rate, filled, rates)
                return current
            if not filled:  # the job's tail (or its CPUs gone): fewer volumes to run, not a slower window
                return current
            rates = rates + [rate]
            if len(rates) < self.judge_refreshes:
                self.trial = (before, before_rate, settled, rates)
                return current
            self.trial, self.recent = None, rates
            mean = sum(rates) / len(rates)
            if mean < before_rate * self.pays:  # it did not pay: back, and not past it for a while
                log.info("model window: %d volumes per replica finished %.2f/s against %.2f/s at %d; back to %d",
                         current, mean, before_rate, before, before)
                self.ceiling, self.ceiling_left = before, self.ceiling_refreshes
                return before
        else:
            self._seen(rate)
        if proposed > current and self.ceiling is not None:
            proposed = max(current, min(proposed, self.ceiling))
        if proposed > current:
            self.trial = (current, sum(self.recent) / len(self.recent), False, [])
        return proposed

    def replicas_changed(self) -> Optional[int]:
        """Another replica count is another job shape: forget a growth that did not pay, and rates of
        the old shape. Returns the volumes per replica before a growth still on trial (to go back to:
        it was never judged), else None."""
        before = self.trial[0] if self.trial is not None else None
        self.trial, self.ceiling, self.ceiling_left, self.recent = None, None, 0, []
        return before


class ModelWindow:
    """How many volumes the model replicas can absorb now: running replicas x volumes per replica
    (at least one replica's worth, so that a job waits for a replacement instead of stopping);
    the volumes per replica adapt to the replicas' busy fraction (`next_per_replica`). Asked of
    Serve at most every `REFRESH_S`."""

    def __init__(self, app_name: str, per_replica: int = VOLUMES_PER_REPLICA):
        self.app_name = app_name
        self.base = self.per_replica = max(1, int(per_replica))
        self.replicas = 1
        self.asked = 0.0
        self.seen: Dict[int, tuple] = {}  # replica pid -> (its clock, its busy seconds) at the last reading
        self.finished_before = 0
        self.rate_since = 0.0  # when finished_before was taken (0: not yet)
        self.growth = GrowthTrial()
        self.handle = None
        self.asking: List = []  # the progress() calls sent at the last refresh, read at the next

    def size(self, in_flight: int = 0, finished: int = 0) -> int:
        """Volumes that may be in flight, given the most that were since the last refresh
        (`in_flight`) and how many the job finished so far (`finished`): the window grows only
        while it is in use and turns over."""
        if time.time() - self.asked >= REFRESH_S:
            self.asked = time.time()
            running = running_replicas(self.app_name)
            now = time.time()
            if running is not None and max(1, running) != self.replicas:
                back = self.growth.replicas_changed()
                self.per_replica = back if back is not None else self.per_replica
            if running is not None:
                self.replicas = max(1, running)
            window = self.replicas * self.per_replica
            full = in_flight >= window and finished - self.finished_before >= window
            rate = (finished - self.finished_before) / max(1e-3, now - self.rate_since) if self.rate_since else None
            self.finished_before, self.rate_since = finished, now
            proposed = next_per_replica(self.per_replica, self.base, self.busy_fraction(), full)
            self.per_replica = self.growth.step(self.per_replica, proposed, rate, in_flight >= window)
        return self.replicas * self.per_replica

    def busy_fraction(self) -> Optional[float]:
        """Forward-pass seconds per second of the replicas between the readings of the last two
        refreshes; None while no reading has a predecessor. Never waits: each refresh reads the
        `progress` calls sent at the previous one (one per running replica; Serve routes each to a
        replica of its choice, so one may be read twice and another not at all) and sends new ones.
        1.0 when a call went unanswered for a whole refresh: requests queue at the replica, or it
        is being replaced; either way the window goes the safe way, down."""
        from lits.serve.model_client import model_handle

        fractions, unanswered = [], False
        for answer in self.asking:
            try:
                state = answer.result(timeout_s=0.01)
            except Exception as exc:  # not answered in a whole refresh, or the replica went away
                log.debug("model progress unanswered: %s: %s", type(exc).__name__, exc)
                answer.cancel()
                unanswered = True
                continue
            last = self.seen.get(state["pid"])
            if last is not None and state["now"] - last[0] >= 1.0:
                fractions.append((state["busy_s"] - last[1]) / (state["now"] - last[0]))
            if last is None or state["now"] - last[0] >= 1.0:
                self.seen[state["pid"]] = (state["now"], state["busy_s"])
        try:
            self.handle = self.handle or model_handle(self.app_name)
            self.asking = [self.handle.progress.remote() for _ in range(self.replicas)]
        except Exception as exc:
            log.debug("model progress not asked: %s: %s", type(exc).__name__, exc)
            self.asking = []
        if unanswered:
            return 1.0
        return sum(fractions) / len(fractions) if fractions else None


class JobCapacity:
    """The placement groups one job's volume tasks run in, and how many volumes may be in flight.

    Args:
        app_name, job_id: the app (its volume pool) and the job (the name of its own groups).
        cpus_per_volume: CPUs one volume task reserves.
        reserve_cpus: CPUs the app's replicas may hold; None: the pool is fixed (never grows).
        concurrency: the caller's cap on volumes in flight (None: what the groups hold).
        window: volumes the model can absorb now, given those in flight and those finished
            (`ModelWindow.size`); None: no such bound.
    """

    def __init__(self, app_name: str, job_id: str, cpus_per_volume: float, reserve_cpus: Optional[float] = None,
                 concurrency: Optional[int] = None, window: Optional[Callable[[int, int], int]] = None):
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
        self.finished = 0
        self.peak, self.peak_since = 0, time.time()  # the most volumes in flight over about REFRESH_S
        self.refreshed = 0.0
        self.requested = 0

    def _slots(self, pg) -> int:
        return int(pool_shape(pg)[0] / self.cpus_per_volume)

    @property
    def cap(self) -> int:
        """The most volumes in flight now: the caller's cap, within the model's window."""
        if self.window is None:
            return self.max
        size = self.window(max(self.peak, sum(self.running)), self.finished)
        if time.time() - self.peak_since >= REFRESH_S:  # the peak covers about the window's last refresh
            self.peak, self.peak_since = sum(self.running), time.time()
        return min(self.max, size)

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
        self.peak = max(self.peak, sum(self.running))
        return {"index": index, "options": in_pool(self.groups[index])}

    def done(self, index: Optional[int]) -> None:
        self.finished += 1
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
