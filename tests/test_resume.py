"""Resume with real values, on the CPU, without a cluster: a checkpoint saved the way a training worker
saves it (lits.train.training's report_epoch dict) and restored the way a worker restores it
(lits.train.checkpoints.setup_model) gives back the model's and Adam's very tensors, and the next epoch
trains on from where the run stopped, not from its start."""

import copy

import numpy as np
import pytest
import torch

from lits.core import ct, synthetic
from lits.core.config import TrainConfig
from lits.train import checkpoints
from lits.train.train_steps import TrainState, learning_rate, to_tensors, train_step

EPOCHS_BEFORE = 2  # epochs the run trains before it stops (its last checkpoint)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: these tiny steps only lose time to threads on a shared machine (and a
    run and its resumed copy then compute alike, whatever the machine's core count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def batches():
    """An epoch's fixed batches: 4 of 4 slices of a seeded 32^2 phantom, those with the most liver
    (images uint8 (4, 32, 32, 3) from prepare's ct.model_inputs; masks uint8 (4, 32, 32))."""
    phantom = synthetic.make_phantom(np.random.default_rng(7), size=32, slices=24)
    zs = np.argsort(-(phantom.labels > 0).sum(axis=(1, 2)), kind="stable")[:16]
    images = ct.model_inputs(phantom.hu, zs, ct.freqhist_breaks(phantom.hu), 0, 32)
    masks = phantom.labels[zs]
    assert (masks == 1).any() and (masks == 2).any()
    return [{"image": images[i:i + 4], "mask": masks[i:i + 4]} for i in range(0, 16, 4)]


def config(tmp_path) -> TrainConfig:
    # amp off and no augmentation: the CPU steps are deterministic, so two runs can be compared value for value
    return TrainConfig(data="-", output=str(tmp_path / "out"), epochs=6, base_width=4, depth=3, lr=3e-2,
                       augment=False, amp="off")


def run_epoch(model, optimizer, batches, cfg: TrainConfig, state: TrainState) -> float:
    """One epoch of the product's steps (train_step at `learning_rate` step by step, as
    train_one_epoch sets it); returns the mean training loss over its slices."""
    model.train()
    losses = []
    for i, batch in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, state, i / len(batches))
        image, mask = to_tensors(batch, CPU, False)
        losses.append(float(train_step(model, optimizer, image, mask, cfg, torch.Generator().manual_seed(0))))
    return float(np.mean(losses))


def adam_tensors(optimizer_state: dict) -> dict:
    """{(parameter index, name): tensor} of an Adam state_dict's state (step, exp_avg, exp_avg_sq)."""
    return {(i, k): v for i, s in optimizer_state["state"].items() for k, v in s.items()}


def test_a_resumed_run_continues_from_its_checkpoint_not_from_its_start(tmp_path, batches):
    from ray.train import Checkpoint  # the object ray.train.get_checkpoint() hands a worker (no cluster needed)

    cfg = config(tmp_path)

    # the uninterrupted run: EPOCHS_BEFORE epochs, a checkpoint, one epoch more
    model, core, optimizer, saved = checkpoints.setup_model(cfg, CPU, lambda m: m)
    assert saved is None
    model_at_start = {k: v.clone() for k, v in core.state_dict().items()}
    state, history = TrainState(), []
    for _ in range(EPOCHS_BEFORE):
        history.append({"epoch": state.epoch, "train_loss": run_epoch(model, optimizer, batches, cfg, state)})
        state = TrainState(epoch=state.epoch + 1)
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    torch.save({**state.to_dict(), "history": history,
                "model": {k: v.cpu() for k, v in core.state_dict().items()}, "optimizer": optimizer.state_dict()},
               folder / checkpoints.STATE_FILE)
    model_at_stop = {k: v.clone() for k, v in core.state_dict().items()}
    adam_at_stop = copy.deepcopy(optimizer.state_dict())
    next_loss = run_epoch(model, optimizer, batches, cfg, state)

    # a fresh start of the same run (same seed: the uninterrupted run's first epoch, replayed)
    fresh, _, fresh_optimizer, _ = checkpoints.setup_model(cfg, CPU, lambda m: m)
    fresh_loss = run_epoch(fresh, fresh_optimizer, batches, cfg, TrainState())
    assert fresh_loss == pytest.approx(history[0]["train_loss"], rel=1e-6)

    # the resumed run, restored as a training worker restores it
    model, core, optimizer, saved = checkpoints.setup_model(cfg, CPU, lambda m: m, Checkpoint.from_directory(str(folder)))
    restored = TrainState.from_dict(saved)
    assert restored.epoch == EPOCHS_BEFORE and saved["history"] == history
    weights = core.state_dict()
    assert weights.keys() == model_at_stop.keys()
    for k, v in model_at_stop.items():
        assert torch.equal(weights[k], v), k
    moved = [k for k, v in model_at_stop.items() if v.is_floating_point() and not torch.equal(v, model_at_start[k])]
    assert len(moved) == len([v for v in model_at_start.values() if v.is_floating_point()])  # none is at its start
    moments, expected = adam_tensors(optimizer.state_dict()), adam_tensors(adam_at_stop)
    assert moments.keys() == expected.keys() and len(moments) == 3 * len(list(core.parameters()))
    for k, v in expected.items():
        assert torch.equal(moments[k], v), k
    assert optimizer.state_dict()["param_groups"] == adam_at_stop["param_groups"]

    resumed_loss = run_epoch(model, optimizer, batches, cfg, restored)
    # the next epoch's loss is the uninterrupted run's next epoch's, and far below a fresh start's
    assert resumed_loss == pytest.approx(next_loss, rel=1e-5)
    assert resumed_loss < 0.9 * fresh_loss, (resumed_loss, fresh_loss)


def test_a_checkpoint_naming_best_weights_that_never_landed_resumes_without_them(tmp_path):
    """The checkpoint names the best-weights file as its background write starts: a worker lost
    during the write leaves a checkpoint naming a missing file. The resumed state forgets that best
    (taken again at the next validation) instead of failing at export on the missing file."""
    import math

    from lits.train import checkpoints

    written = tmp_path / "epoch-0003.pt"
    written.write_bytes(b"weights")
    saved = {"epoch": 5, "best_val_loss": 0.4, "best_epoch": 3, "best_file": str(written)}
    kept = checkpoints.restored_state(saved)
    assert (kept.best_file, kept.best_val_loss, kept.best_epoch, kept.epoch) == (str(written), 0.4, 3, 5)
    lost = checkpoints.restored_state({**saved, "best_file": str(tmp_path / "epoch-0004.pt")})
    assert (lost.best_file, lost.best_val_loss, lost.best_epoch, lost.epoch) == ("", math.inf, -1, 5)
