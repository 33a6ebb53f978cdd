"""How Ray's worker processes log: what a user should read in the console, not Ray's chatter.

`setup()` is the `worker_process_setup_hook` workflows/_common.start_ray installs (by module path,
so every task and actor process of the job runs it before its first task): lits' own loggers at
INFO with the workflows' short format (a training run's per-epoch line, a volume task's warnings),
Ray Data's INFO records at WARNING (`ray_env`; Ray Train's through its LoggingConfig, `ray_level`),
and the placement-group cleaner's "State API may be temporarily unavailable" warning, which a local
Ray without a dashboard (what the workflows start) repeats every second of a training run, at
ERROR. `--verbose` keeps them all.
Stdlib only: every worker pays for this import.
"""

from __future__ import annotations

import logging
import os
import sys

VERBOSE_ENV = "LITS_VERBOSE_WORKERS"  # "1" under --verbose (apply_cluster_args; start_ray sends it on): Ray keeps its levels
# The one Ray logger no level setting of Ray's reaches: the cleaner's warning, every second.
# Ray imports the hook by this dotted name in every worker of the job (the runtime_env of start_ray).
SETUP_HOOK = f"{__name__}.setup"
CLEANER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def ray_level() -> str:
    """Level of Ray Train's and Ray Data's records (Train's LoggingConfig, RAY_DATA_LOG_LEVEL)."""
    return "INFO" if verbose() else "WARNING"


def ray_env() -> dict:
    """env_vars for the workers of a job: Ray Data's level (it reads RAY_DATA_LOG_LEVEL when it sets
    its loggers up, in whichever process) and --verbose itself."""
    return {VERBOSE_ENV: "1"} if verbose() else {"RAY_DATA_LOG_LEVEL": "WARNING"}


def quiet_ray() -> None:
    """This process: Ray Data's records at WARNING (the driver's Ray Data set its loggers up
    before this ran) and the cleaner's warning at ERROR, unless --verbose."""
    if verbose():
        return
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger(CLEANER).setLevel(logging.ERROR)


def setup() -> None:
    """The worker_process_setup_hook: lits at INFO to stderr (streamed to the driver), Ray quieter."""
    lits_log = logging.getLogger("lits")
    if not lits_log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        lits_log.addHandler(handler)
        lits_log.setLevel(logging.INFO)
        lits_log.propagate = False
    quiet_ray()
