"""How Ray's processes log: what a user should read in the console, not Ray's chatter.

`setup()` is the `worker_process_setup_hook` workflows/_common.start_ray installs (by module path,
so every task and actor process of the job runs it before its first task): lits' own loggers at
INFO with the workflows' short format (a training run's per-epoch line, a volume task's warnings)
and Ray's own records quieted (`quiet_ray`, which the driver runs too). What is quieted, each at
its source, unless --verbose:
  - Ray Data's INFO records (RAY_DATA_LOG_LEVEL, `ray_env`) and its notice that the progress bars
    start_ray turned off are off;
  - Ray Train's INFO records (its LoggingConfig, `ray_level`) and its per-report record
    ("Reporting training result N: TrainingReport(...)", a metrics dict per worker per epoch),
    which Ray logs under a logger named by its file path, so the LoggingConfig misses it
    (`train_reports_logger`);
  - the placement-group cleaner's "State API may be temporarily unavailable" warning, which a
    local Ray without a dashboard (what the workflows start) repeats every second of a run;
  - the driver's "ray" and "ray.serve" INFO records ("Started a local Ray instance", Serve's
    start-up and shutdown) and the token-authentication notice of ray.init; Serve's controller,
    proxy and replicas take their level from Serve's logging_config (lits.serve.serving);
  - deprecation warnings Ray raises about its own internal calls.
Independent of --verbose, a worker learns its own cluster's address (`own_cluster`).
Stdlib only at import: every worker pays for this import.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

VERBOSE_ENV = "LITS_VERBOSE_WORKERS"  # "1" under --verbose (apply_cluster_args; start_ray sends it on): Ray keeps its levels
# Ray imports the hook by this dotted name in every worker of the job (the runtime_env of start_ray).
SETUP_HOOK = f"{__name__}.setup"
# The placement-group cleaner's every-second warning: no level setting of Ray's reaches it.
CLEANER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
# Ray Data's "Progress bars disabled. To enable, set ..." (once per process that executes a dataset).
DATA_PROGRESS = "ray.data._internal.progress"
# ray.init's "Token authentication is enabled for this Ray cluster ..." (the default; not a problem).
AUTH_NOTICE = "ray._private.authentication.authentication_token_setup"
# The module under the ray package whose logger is named by its file path (see train_reports_logger).
TRAIN_REPORTS = ("train", "v2", "_internal", "execution", "context.py")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def ray_level() -> str:
    """Level of Ray's own records: Ray Train's LoggingConfig, Serve's logging_config, the driver's
    "ray" logger (ray.init's logging_level)."""
    return "INFO" if verbose() else "WARNING"


def ray_env() -> dict:
    """env_vars for the workers of a job: Ray Data's level (it reads RAY_DATA_LOG_LEVEL when it sets
    its loggers up, in whichever process) and --verbose itself."""
    return {VERBOSE_ENV: "1"} if verbose() else {"RAY_DATA_LOG_LEVEL": "WARNING"}


def train_reports_logger() -> str:
    """Name of the logger of Ray Train's per-report record: the file path of its module (Ray names
    that logger `getLogger(__file__)`), so outside `ray.train` and the LoggingConfig's reach; its
    records go to the root logger, which Ray Train sets to INFO in its workers."""
    import ray  # imported already wherever this runs: a Ray worker, or a driver about to start Ray

    return os.path.join(os.path.dirname(ray.__file__), *TRAIN_REPORTS)


def quiet_ray() -> None:
    """This process: Ray's own records at the levels the module docstring lists, unless --verbose.
    The driver runs it before ray.init (its notices) and after (Ray Data sets "ray.data"'s level
    when it is imported); Ray's loggers keep a level set before their module is imported."""
    if verbose():
        return
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger(DATA_PROGRESS).setLevel(logging.ERROR)
    logging.getLogger(CLEANER).setLevel(logging.ERROR)
    logging.getLogger(train_reports_logger()).setLevel(logging.WARNING)
    logging.getLogger(AUTH_NOTICE).setLevel(logging.ERROR)
    # the driver's Serve records (Serve sets the level when ray.serve is imported: run after that)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    # raised where Ray calls its own deprecated API (attributed to a ray module); ours still warn
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")


def own_cluster() -> None:
    """In a Ray worker process: RAY_ADDRESS of the worker's own cluster, unless set. Ray Train's
    placement-group cleaner finds the cluster's state API by it; where several Ray instances run on
    one machine (a test suite's, another user's) it otherwise dies with a traceback ("Found
    multiple active Ray instances") on the console, and stops watching for a dead controller."""
    import ray

    if ray._private.worker.global_worker.mode == ray.WORKER_MODE:
        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


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
    own_cluster()
