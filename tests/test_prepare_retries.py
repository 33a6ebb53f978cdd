"""A volume whose Ray task is killed for memory on every try fails after MAX_TRIES tries, with a
reason; it is never retried without end (issue 11). Its own Ray: the memory monitor's threshold is
a cluster setting."""

from __future__ import annotations

import shutil

import pytest

from lits.prepare import discovery, pipeline
from lits.core.config import PrepareConfig

pytestmark = pytest.mark.slow


def test_a_volume_killed_for_memory_every_time_is_reported_after_max_tries(nifti_dir, tmp_path):
    import ray

    src = tmp_path / "in"
    src.mkdir()
    for name in ("volume-0.nii.gz", "segmentation-0.nii.gz"):
        shutil.copy(f"{nifti_dir}/{name}", src)
    cfg = PrepareConfig(input=str(src), output=str(tmp_path / "out"), image_size=16)
    tasks, _ = discovery.check_headers(discovery.discover(cfg)[0], cfg)
    # Ray's memory monitor kills a running task's worker whenever the node uses more than this share
    # of its memory: at 0.1% every try is killed, as when a volume is too big for any node.
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
             _system_config={"memory_usage_threshold": 0.001, "memory_monitor_refresh_ms": 50})
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        nodes = [n["Resources"]["memory"] for n in ray.nodes() if n["Alive"]]
        last = pipeline.memory_request(tasks[0], nodes, attempt=3)  # doubled after each try
        manifest = pipeline.prepare(cfg, pipeline.run_ray)
    finally:
        ray.shutdown()
    assert manifest["totals"]["volumes"] == 0
    assert manifest["failed"] == [{
        "input": str(src / "volume-0.nii.gz"),
        "reason": f"volume-0: its Ray task died in all 3 tries (killed for memory, crashed, or a network failure; "
                  f"the last reserved {last / 2**30:.1f} GiB); see the Ray logs, and run it alone or on a larger node",
    }]
