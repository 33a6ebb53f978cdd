"""Backpressure from the model (issue 20, item 1): a job never has more volumes in flight than the
model replicas can absorb, and a chunk that queues behind a busy model is never taken for lost.

One Ray of 2 logical CPUs (the model replica's and the volume pool's) and one slow model: a
random-weight U-Net of width 32 and depth 4 at 128x128, about 1.4 s per forward pass of 16
slices on one CPU of this machine, while a volume's CPU work takes a fraction of that."""

import time

import pytest
import torch

from conftest import local_ray, make_bucket, synthesize, upload_tree

WAIT_S = 10.0  # a chunk's deadline: a few forward passes, far less than 16 volumes' queue


def wide_model(folder, image_size=128, width=32, depth=4):
    """An honest slow model: a wide U-Net exported as train.py exports one."""
    from lits.model import inference
    from lits.model.unet import UNet

    torch.manual_seed(0)
    arch = {"name": "UNet", "in_channels": 3, "out_channels": 3, "base_width": width, "depth": depth}
    model = UNet(3, 3, base_width=width, depth=depth)
    inference.save_model(str(folder), model.state_dict(), inference.model_config(arch, "liver-tumour", image_size, 0))
    return str(folder)


class Answer:
    """A DeploymentResponse stand-in: times out `late` times, then answers."""

    def __init__(self, late: int):
        self.late, self.cancelled = late, 0

    def result(self, timeout_s=None):
        if self.late:
            self.late -= 1
            raise TimeoutError("no answer yet")
        return "labels"

    def cancel(self):
        self.cancelled += 1


@pytest.mark.parametrize("busy, resends", [(True, 0), (False, 1)])
def test_a_chunk_waits_while_the_model_progresses_and_is_resent_when_it_does_not(monkeypatch, busy, resends):
    """A timed-out wait is a resend only when the model made no progress meanwhile (`busy()` False)."""
    from lits.serve import model_client

    monkeypatch.setattr(model_client, "RETRY_WAIT_S", 0.0)
    sent, resent = [], []

    def send():
        sent.append(Answer(late=2 if not sent else 0))
        return sent[-1]

    assert model_client.call_model(send, "8 slices", wait_s=0.01, resent=resent, size=8, busy=lambda: busy) == "labels"
    # busy: the first send waits out two deadlines and answers; idle: it is cancelled and sent again
    assert len(resent) == resends and len(sent) == 1 + resends and sent[0].cancelled == resends


@pytest.mark.slow
def test_a_slow_model_at_concurrency_16_fails_no_volume_and_resends_no_chunk(tmp_path, s3_server):
    """16 volumes of 2 chunks each at concurrency 16 against one slow replica: 32 chunks queued at
    once wait ~20-40 s for the model, past the chunk deadline (WAIT_S), and before backpressure
    every such chunk was cancelled and sent again (and a volume could fail). Now the job keeps at
    most replicas x volumes_per_replica volumes in flight, a queued chunk's wait does not count
    against its deadline, and every volume is done with no resend."""
    from lits.core.config import ServeConfig
    from lits.serve import jobs, serving
    from lits.serve.job_spec import JobSpec

    synthesize(tmp_path / "ct", volumes=16, size=32, slices=16, seed=5)
    for f in (tmp_path / "ct").glob("segmentation-*"):
        f.unlink()
    make_bucket(s3_server, "slow")
    upload_tree(s3_server, str(tmp_path / "ct"), "s3://slow/ct")
    cfg = ServeConfig(model=wide_model(tmp_path / "model"), chunk=8, max_batch_size=16, batch_wait_s=0.05,
                      model_wait_s=WAIT_S, volume_cpus=1, volumes_per_replica=3)
    with local_ray(2):
        try:
            serving.deploy(cfg, http=False, app_name="lits-slow")
            job_id = jobs.submit_job(JobSpec(input="s3://slow/ct", output="s3://slow/seg", app_name="lits-slow",
                                             chunk=cfg.chunk, wait_s=cfg.model_wait_s, concurrency=16,
                                             cpus_per_volume=1 / 16))
            started, widest = time.time(), 0
            job = jobs.get_job(job_id)
            while job["state"] in ("queued", "running") and time.time() < started + 400:
                widest = max(widest, job["concurrency"])
                time.sleep(0.5)
                job = jobs.get_job(job_id)
        finally:
            from ray import serve

            serve.shutdown()
    assert job["state"] == "succeeded", job
    assert job["counts"]["done"] == 16 and job["counts"]["failed"] == 0, job
    assert job["chunks_resent"] == 0, (widest, job)
    assert 1 <= widest <= 3, widest  # one replica x 3 volumes, never the 16 asked for
