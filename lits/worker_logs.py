"""How Ray's worker processes log: what a user should read in the console, not Ray's chatter.

`setup()` is the `worker_process_setup_hook` workflows/_common.start_ray installs (by module path,
so every task and actor process of the job runs it before its first task): lits' own loggers at
INFO with the workflows' short format (a training run's per-epoch line, a volume task's warnings),
Ray Train's and Ray Data's per-step INFO records at WARNING, and the placement-group cleaner's
"State API may be temporarily unavailable" warning, which a local Ray without a dashboard (what
the workflows start) repeats every second of a training run, at ERROR. `--verbose` keeps them all.
Stdlib only: every worker pays for this import.
"""

from __future__ import annotations

import logging
import os
import sys

VERBOSE_ENV = "LITS_VERBOSE_WORKERS"  # set by start_ray under --verbose: leave Ray's loggers alone
QUIET = {"ray.train": logging.WARNING, "ray.data": logging.WARNING,
         "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR}


def quiet_ray(verbose: bool = False) -> None:
    """Ray Train's and Ray Data's chatter down to warnings (this process), unless `verbose`."""
    if verbose:
        return
    for name, level in QUIET.items():
        logging.getLogger(name).setLevel(level)


def setup() -> None:
    """The worker_process_setup_hook: lits at INFO to stderr (streamed to the driver), Ray quieter."""
    lits_log = logging.getLogger("lits")
    if not lits_log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        lits_log.addHandler(handler)
        lits_log.setLevel(logging.INFO)
        lits_log.propagate = False
    quiet_ray(os.environ.get(VERBOSE_ENV) == "1")
