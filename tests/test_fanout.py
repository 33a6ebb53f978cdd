"""lits.runtime.fanout on a local 3-CPU Ray: the window bounds what is in flight, retries and their tickets,
failures as values, a stop that frees every CPU, and a limit that holds submissions back."""

from __future__ import annotations

import os
import threading
import time

import pytest

from lits.runtime import fanout

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray3():
    import sys

    from ray import cloudpickle

    from tests.conftest import local_ray

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import a test module
    with local_ray(3) as address:
        yield address


def _tracked(marks: str, x: int, sleep_s: float) -> int:
    """Leave a start and an end mark in `marks` (files: a Ray task's own clock), return x squared."""
    start = time.time()
    time.sleep(sleep_s)
    with open(os.path.join(marks, f"{x}"), "w") as f:
        f.write(f"{start} {time.time()}")
    return x * x


def _most_at_once(marks: str) -> int:
    spans = [tuple(map(float, open(os.path.join(marks, n)).read().split())) for n in os.listdir(marks)]
    return max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)


def test_window_bounds_tasks_in_flight_and_every_item_comes_back(ray3, tmp_path):
    items = [(str(tmp_path), x, 0.4) for x in range(8)]
    outcomes = list(fanout.fan_out(_tracked, items, {"num_cpus": 1}, 2))
    assert sorted(o.value for o in outcomes) == [x * x for x in range(8)]
    assert all(o.error is None and o.attempt == 1 and o.value == o.args[1] ** 2 for o in outcomes)
    # 3 CPUs free, 2 allowed: never 3 at once, and the window is used (2 at once)
    assert _most_at_once(str(tmp_path)) == 2


def _fails_first(marks: str, x: int) -> int:
    """Raise on the first call for x (leaving a mark), succeed on the second."""
    path = os.path.join(marks, f"tried-{x}")
    if x % 2 and not os.path.exists(path):
        open(path, "w").close()
        raise RuntimeError(f"first try of {x}")
    return x


def test_retry_goes_round_with_the_next_attempt_and_its_ticket(ray3, tmp_path):
    placed = []

    def place(args, attempt):
        placed.append((args[1], attempt))
        return {"num_cpus": 1, "max_retries": 0}, f"ticket-{args[1]}-{attempt}"

    released = []
    outcomes = {o.args[1]: o for o in fanout.fan_out(_fails_first, [(str(tmp_path), x) for x in range(4)], place, 3,
                                                    retry=lambda args, attempt, exc: attempt < 2,
                                                    release=released.append)}
    assert {x: (o.value, o.error, o.attempt, o.ticket) for x, o in outcomes.items()} == {
        0: (0, None, 1, "ticket-0-1"), 1: (1, None, 2, "ticket-1-2"),
        2: (2, None, 1, "ticket-2-1"), 3: (3, None, 2, "ticket-3-2")}
    assert sorted(placed) == [(0, 1), (1, 1), (1, 2), (2, 1), (3, 1), (3, 2)]
    assert sorted(released) == sorted(f"ticket-{x}-{a}" for x, a in placed)  # every submission's ticket back


def test_a_failed_task_is_an_outcome_not_an_exception(ray3, tmp_path):
    import ray

    outcomes = {o.args[1]: o for o in fanout.fan_out(_fails_first, [(str(tmp_path), x) for x in range(4)],
                                                    {"num_cpus": 1, "max_retries": 0}, 4)}
    assert [outcomes[x].value for x in (0, 2)] == [0, 2]
    for x in (1, 3):
        assert outcomes[x].value is None and isinstance(outcomes[x].error, ray.exceptions.RayTaskError)
        assert f"first try of {x}" in str(outcomes[x].error)


def test_stop_cancels_what_is_in_flight_and_frees_the_cpus(ray3, tmp_path):
    import ray

    stop = threading.Event()
    released = []
    got = []
    threading.Timer(1.5, stop.set).start()
    started = time.time()
    for outcome in fanout.fan_out(_tracked, [(str(tmp_path), x, 0.2 if x == 0 else 60) for x in range(6)],
                                  lambda args, attempt: ({"num_cpus": 1}, args[1]), 3, release=released.append,
                                  stop=stop, poll_s=0.2):
        got.append(outcome.value)
    assert got == [0] and time.time() - started < 30  # the 60 s tasks did not run out
    assert sorted(released) == [0, 1, 2, 3]  # item 0, then the three in flight when it stopped (1, 2, 3)
    assert os.listdir(tmp_path) == ["0"]  # no cancelled task finished
    deadline = time.time() + 10
    while ray.available_resources().get("CPU", 0) < 3 and time.time() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU", 0) == 3.0


def test_a_zero_limit_holds_items_back_until_it_grows(ray3, tmp_path):
    ticks = []
    opened = time.time() + 1.0

    def limit() -> int:
        return 0 if time.time() < opened else 2

    outcomes = list(fanout.fan_out(_tracked, [(str(tmp_path), x, 0.1) for x in range(3)], {"num_cpus": 1}, limit,
                                   tick=ticks.append, poll_s=0.1))
    assert sorted(o.value for o in outcomes) == [0, 1, 4]
    starts = [float(open(os.path.join(tmp_path, n)).read().split()[0]) for n in os.listdir(tmp_path)]
    assert min(starts) >= opened - 0.05  # nothing started while the limit was 0
    assert ticks[0] == 3 and ticks.count(3) >= 5 and ticks[-1] == 0  # it kept looking while it waited


def test_a_static_limit_below_one_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        next(fanout.fan_out(_tracked, [("x", 1, 0)], {}, 0))


def test_it_asks_the_autoscaler_for_every_item_not_done_and_withdraws_at_the_end(ray3, tmp_path):
    """What a `CPU: 0` head needs: the request (Ray's key-value store, which a cluster's autoscaler
    reads) covers every item not done yet, falls as they finish, and is withdrawn when it ends."""
    import json

    from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    def asked():
        return len(json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL) or b"[]"))

    seen = []
    for outcome in fanout.fan_out(_tracked, [(str(tmp_path), x, 0.3) for x in range(5)], {"num_cpus": 1}, 2,
                                  ask_cpus=1):
        seen.append(asked())
    assert seen[0] == 5 and seen == sorted(seen, reverse=True) and seen[-1] <= 2  # falls as items finish
    assert asked() == 0
    assert fanout.window() == 6 and fanout.window("GPU") == 2  # 2 per CPU of this 3-CPU Ray; no GPU: the minimum
