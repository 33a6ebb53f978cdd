"""One Ray task per item, a bounded number in flight, results as they finish: the one fan-out idiom.

prepare (a volume per task), evaluation (a case per task), the test-split evaluation after
training (a volume per task) and bulk jobs (a volume per task) all spread work this way. What
differs between them is passed in, not written again:

- `resources`: the Ray options of every task (`num_cpus`, `num_gpus`, `max_retries`), or a
  function `(args, attempt) -> (options, ticket)` when each submission needs its own (prepare's
  memory request grows with the attempt; a job places each task in its volume pool and gets the
  pool slot back as the ticket);
- `limit`: at most this many tasks in flight (an int, or a function read again before every
  submission round: `window` follows the cluster's CPUs as nodes join, a job its capacity); a
  bounded window keeps a thousand-item run from queueing a thousand tasks (their arguments pinned
  in the object store) at once;
- `ask_cpus`: CPUs one item needs; the fan-out then asks the autoscaler for a cluster that holds
  every item not yet done (`request_cpus`, at most MAX_ASK_CPUS; withdrawn when it ends), so a
  `CPU: 0` head (cluster.yaml) gets its CPU nodes at once, not two tasks' worth at a time, and
  only CPU nodes: the request's bundles carry CPU_NODE_RESOURCE, which no GPU node type declares;
- `retry`: whether an item whose task died goes round again (prepare: with more memory);
- `stop`: an Event; once set, the tasks in flight are cancelled (interrupt first, so a task can
  clean up, then forced) and the fan-out returns without yielding them;
- `release` and `tick`: hand a finished task's ticket back; run between waits (a job's capacity
  refresh and progress saving).

Ray is imported inside the function: modules that import this one stay importable without Ray.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

log = logging.getLogger(__name__)

CANCEL_GRACE_S = 10.0  # a cancelled task gets this long to stop on its own before it is killed
MAX_ASK_CPUS = 1024  # the most CPUs one fan-out asks the autoscaler for
# A custom resource cluster.yaml's CPU node type declares, one unit per CPU, and no other node type:
# CPU work asks the autoscaler for bundles of it, so the CPUs it wants never start a GPU node.
CPU_NODE_RESOURCE = "lits_cpu"


@dataclass
class Outcome:
    """One finished item: `args` as submitted, its return `value` or the Ray `error` its task
    ended with, the `attempt` (1-based) that produced it and the `ticket` it was submitted with."""

    args: Tuple
    value: Any = None
    error: Optional[BaseException] = None
    attempt: int = 1
    ticket: Any = None


Resources = Union[Dict, Callable[[Tuple, int], Tuple[Dict, Any]]]


def window(resource: str = "CPU", per_unit: int = 2, minimum: int = 2) -> int:
    """In-flight bound from the cluster's `resource` ("CPU" or "GPU"): `per_unit` tasks per unit,
    so that a worker finds its next item waiting (and a head without that resource still gets
    `minimum`)."""
    import ray

    return max(minimum, per_unit * int(ray.cluster_resources().get(resource, 0)))


def cpu_bundles(cpus: int) -> List[Dict[str, float]]:
    """`cpus` one-CPU bundles that only a CPU node type fits: {"CPU": 1, CPU_NODE_RESOURCE: 1} each."""
    return [{"CPU": 1, CPU_NODE_RESOURCE: 1}] * int(cpus)


def request_cpus(cpus: int) -> None:
    """Ask the autoscaler to keep `cpus` CPUs of CPU nodes in the cluster (`cpu_bundles`; 0 withdraws
    the request; one request stands per cluster, the latest). Without an autoscaler Ray keeps it in
    its key-value store. A cluster whose node types do not declare CPU_NODE_RESOURCE gets nothing
    from it (docs/cluster.md): its nodes then come for the tasks waiting, a window's worth at a time."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=cpu_bundles(cpus))
    except Exception as exc:  # no autoscaler state to write to: nothing to ask
        log.debug("request_resources(%d) failed: %s", cpus, exc)


def fan_out(fn, items: Iterable[Tuple], resources: Resources, limit: Union[int, Callable[[], int]], *,
            ask_cpus: float = 0.0, retry: Optional[Callable[[Tuple, int, BaseException], bool]] = None,
            release: Optional[Callable[[Any], None]] = None, stop: Optional[threading.Event] = None,
            tick: Optional[Callable[[int], None]] = None, poll_s: Optional[float] = None) -> Iterator[Outcome]:
    """Run `fn(*args)` as a Ray task for every `args` in `items` (in that order); yield an
    `Outcome` per item as its task finishes.

    Args:
        fn: a plain function or a `@ray.remote` one (its decorator options are the defaults).
        items: argument tuples, submitted in order.
        resources: Ray options for every task, or `(args, attempt) -> (options, ticket)`.
        limit: most tasks in flight (>= 1), or a function giving it (read before each round; 0
            holds submissions back until it grows).
        retry: `(args, attempt, error) -> bool`; True puts the item at the back of the queue.
        release: called with a task's ticket once it has finished (before its Outcome is yielded).
        stop: when set, cancel what is in flight and return.
        tick: called with the number of items not yet submitted, before each round (needs `poll_s`
            to be called while nothing finishes).
        poll_s: wake at least this often (for `stop` and `tick`); None waits for the next result.
        ask_cpus: CPUs one item needs, for the autoscaler request (0: ask for nothing).

    Returns:
        An iterator of Outcome; a task that raised or died gives `error` (a ray.exceptions.RayError)
        unless `retry` sent it round again. Nothing is raised for a task's failure.
    """
    import ray

    if not callable(limit) and limit < 1:
        raise ValueError(f"limit must be at least 1 task in flight, got {limit}")
    remote = fn if hasattr(fn, "remote") else ray.remote(fn)
    place = resources if callable(resources) else (lambda args, attempt: (resources, None))
    queue = deque((tuple(args), 1) for args in items)
    running: Dict = {}
    asked = 0
    try:
        while queue or running:
            if stop is not None and stop.is_set():
                cancel(list(running))
                for _, _, ticket in running.values():
                    if release is not None:
                        release(ticket)
                return
            if tick is not None:
                tick(len(queue))
            want = min(MAX_ASK_CPUS, math.ceil(ask_cpus * (len(queue) + len(running))))
            if want != asked:  # every item not done yet (one item's CPUs each)
                request_cpus(want)
                asked = want
            bound = limit() if callable(limit) else limit
            while queue and len(running) < bound:
                args, attempt = queue.popleft()
                options, ticket = place(args, attempt)
                running[remote.options(**options).remote(*args)] = (args, attempt, ticket)
            if not running:  # none may start yet (a job waiting for its first CPUs): look again soon
                time.sleep(poll_s or 0.5)
                continue
            done, _ = ray.wait(list(running), num_returns=1, timeout=poll_s)
            for ref in done:
                args, attempt, ticket = running.pop(ref)
                if release is not None:
                    release(ticket)
                try:
                    outcome = Outcome(args, ray.get(ref), attempt=attempt, ticket=ticket)
                except ray.exceptions.RayError as exc:
                    if retry is not None and retry(args, attempt, exc):
                        queue.append((args, attempt + 1))
                        continue
                    outcome = Outcome(args, error=exc, attempt=attempt, ticket=ticket)
                yield outcome
    finally:
        if asked:
            request_cpus(0)


def cancel(refs) -> None:
    """Cancel running tasks and wait until they have stopped (their CPUs are free): a
    KeyboardInterrupt first (a task can remove its partial outputs), a kill after CANCEL_GRACE_S."""
    import ray

    refs = list(refs)
    if not refs:
        return
    for ref in refs:
        ray.cancel(ref)
    left = ray.wait(refs, num_returns=len(refs), timeout=CANCEL_GRACE_S)[1]
    for ref in left:
        ray.cancel(ref, force=True)
    if left:
        ray.wait(left, num_returns=len(left), timeout=CANCEL_GRACE_S)
