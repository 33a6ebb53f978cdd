"""The parts of training that must hold on a GPU cluster, checked on this CPU machine without Ray:
the shard layout, collectives on the training device, Adam's state after a resume, best weights
written only when they improve, validation counts on the device, the materialise decision."""

from __future__ import annotations

import dataclasses
import io
import os
import re
import socket
import sys
import threading
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lits.train import checkpoints, ingest
from lits.core import metrics, shards
from lits.core.config import TrainConfig
from lits.core.errors import UserError
from lits.prepare.slicing import SliceTable
from lits.train.train_data import DataInfo
from lits.train.train_steps import (Collective, EpochContext, EpochRandom, TrainState, dice_iou, epoch_random,
                                    overlap_counts, to_tensors, train_one_epoch)

LITS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lits")


def slice_table(n=7, size=16, seed=0) -> SliceTable:
    rng = np.random.default_rng(seed)
    return SliceTable("volume-12", np.arange(n, dtype=np.int32) * 3, rng.integers(0, 3, n).astype(np.int8),
                      rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                      rng.integers(0, 3, (n, size, size), dtype=np.uint8), np.array([0.8, 0.8, 2.5], np.float32))


# --- the shard layout ------------------------------------------------------------------------------

def test_shards_round_trip_as_fixed_size_binary_with_their_shapes():
    table = slice_table()
    data = shards.encode(table)
    schema = pq.read_schema(io.BytesIO(data))
    assert pa.types.is_fixed_size_binary(schema.field("image").type)
    assert shards.column_shape(schema, "image", "x") == (16, 16, 3)
    assert shards.column_shape(schema, "mask", "x") == (16, 16)
    read = shards.read_columns(data)
    np.testing.assert_array_equal(read["image"], table.image)
    np.testing.assert_array_equal(read["mask"], table.mask)
    assert list(read["volume_id"]) == ["volume-12"] * 7
    # a slice of a column (Arrow offset != 0) decodes its own rows
    arrow = pq.read_table(io.BytesIO(data))
    np.testing.assert_array_equal(shards.decode(arrow.column("image").chunk(0).slice(2, 3), (16, 16, 3)), table.image[2:5])


def test_format_one_tensor_shards_are_still_read():
    from ray.data.extensions import ArrowTensorArray

    table = slice_table(n=4)
    arrow = pa.table({"volume_id": pa.array(["volume-12"] * 4), "image": ArrowTensorArray.from_numpy(table.image),
                      "mask": ArrowTensorArray.from_numpy(table.mask)})
    buf = io.BytesIO()
    pq.write_table(arrow, buf)
    assert shards.column_shape(pq.read_schema(io.BytesIO(buf.getvalue())), "image", "x") == (16, 16, 3)
    read = shards.read_columns(buf.getvalue())
    np.testing.assert_array_equal(read["image"], table.image)
    np.testing.assert_array_equal(read["mask"], table.mask)


def test_a_column_of_another_type_is_a_user_error():
    schema = pa.schema([pa.field("image", pa.list_(pa.float32()))])
    with pytest.raises(UserError, match="shard-7.*column image.*re-run prepare"):
        shards.column_shape(schema, "image", "shard-7")


def test_the_collate_gives_uint8_tensors_of_the_slices():
    table = slice_table(n=5)
    arrow = pq.read_table(io.BytesIO(shards.encode(table)))
    batch = ingest.SliceCollate((16, 16, 3), ids=True)(arrow)
    assert batch["image"].dtype == torch.uint8 and tuple(batch["image"].shape) == (5, 16, 16, 3)
    np.testing.assert_array_equal(batch["image"].numpy(), table.image)
    np.testing.assert_array_equal(batch["mask"].numpy(), table.mask)
    assert list(batch["volume_id"]) == ["volume-12"] * 5


def test_materialise_or_stream_follows_the_flag_and_the_data_size_only():
    info = DataInfo(image_shape=(256, 256, 3), val_volumes=("volume-1",), train_slices=10_000, val_slices=2_000,
                    manifest_sha256="-", prepare_config={}, train_uris=("a",), val_uris=("b",))  # 3.1 GB decoded
    base = TrainConfig(data="-", output="-")
    assert ingest.decoded_bytes(info) == 12_000 * 256 * 256 * 4
    assert ingest.materialize(base, info)  # auto, 3.1 GB <= 4 GiB
    assert not ingest.materialize(TrainConfig(data="-", output="-", materialize_gb=2.0), info)
    assert not ingest.materialize(TrainConfig(data="-", output="-", ingest="stream"), info)
    assert ingest.materialize(TrainConfig(data="-", output="-", ingest="materialize", materialize_gb=0.0), info)
    with pytest.raises(ValueError, match="ingest must be one of"):
        TrainConfig(data="-", output="-", ingest="sometimes")


# --- --batch-size under DDP: the global batch, split over the workers -----------------------------

def test_the_batch_is_global_so_any_number_of_workers_makes_one_process_steps_at_one_rate():
    """--batch-size B over N workers: each worker takes B/N slices a step from its 1/N of the split, so an
    epoch makes the steps of one process at B, and the rate at every step (poly over those steps) is the
    one process's too."""
    from lits.train.train_data import epoch_steps, worker_batch_size
    from lits.train.train_steps import learning_rate

    info = DataInfo(image_shape=(128, 128, 3), val_volumes=("v",), train_slices=400, val_slices=10,
                    manifest_sha256="-", prepare_config={}, train_uris=("a",), val_uris=("b",))
    one, two, four = (TrainConfig(data="-", output="-", batch_size=16, epochs=3, num_workers=n) for n in (1, 2, 4))
    assert [worker_batch_size(c) for c in (one, two, four)] == [16, 8, 4]
    # one process: 400 / 16 = 25 slice batches x (128 / 64)^2 patch batches
    assert epoch_steps(one, info) == epoch_steps(two, info) == epoch_steps(four, info) == 25 * 4
    # 403 slices: the equal split leaves out up to N - 1 and the last batch is partial: within one batch
    odd = dataclasses.replace(info, train_slices=403)
    assert [epoch_steps(c, odd) for c in (one, two, four)] == [26 * 4, 26 * 4, 25 * 4]
    state = TrainState(epoch=1)
    for step in (0, 17, 103):
        rates = {learning_rate(c, state, step / epoch_steps(c, info)) for c in (one, two, four)}
        assert len(rates) == 1, rates
    assert epoch_steps(TrainConfig(data="-", output="-", batch_size=16, num_workers=2, steps_per_epoch=5), info) == 5
    with pytest.raises(UserError, match="--batch-size 30 is the global batch.*multiple of 4"):
        worker_batch_size(TrainConfig(data="-", output="-", batch_size=30, num_workers=4))


def test_a_batch_the_workers_cannot_share_is_one_line_before_anything_runs(tmp_path):
    from tests.conftest import run_workflow

    res = run_workflow("train", "--data", str(tmp_path / "nothing"), "--output", str(tmp_path / "o"),
                       "--num-workers", "4", "--batch-size", "30")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == ("train: error: --batch-size 30 is the global batch, split evenly "
                                                   "over the 4 workers: use a multiple of 4")


# --- validation counts on the device ----------------------------------------------------------------

def test_device_overlap_counts_equal_the_numpy_metrics():
    rng = np.random.default_rng(3)
    pred, ref = rng.integers(0, 3, (6, 9, 9)), rng.integers(0, 3, (6, 9, 9))
    ref[0] = 0
    pred[0] = 0  # both empty: Dice 1
    counts = overlap_counts(torch.from_numpy(pred), torch.from_numpy(ref), (1, 2))
    expected = metrics.overlap_counts(pred, ref, (1, 2))
    np.testing.assert_array_equal(counts.numpy(), expected)
    for mine, theirs in zip(dice_iou(counts), metrics.dice_iou(expected)):
        np.testing.assert_allclose(mine.numpy(), theirs)


def test_to_tensors_takes_numpy_and_tensors_alike():
    table = slice_table(n=3)
    a = to_tensors({"image": table.image, "mask": table.mask}, torch.device("cpu"), False)
    b = to_tensors({"image": torch.from_numpy(table.image), "mask": torch.from_numpy(table.mask)}, torch.device("cpu"), True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[1].dtype == torch.int64
    assert b[0].is_contiguous(memory_format=torch.channels_last)


# --- resume: Adam's state where the parameters live ------------------------------------------------

def small_cfg(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(data="-", output=str(tmp_path / "out"), base_width=4, depth=2, lr=1e-2, **kw)


@pytest.mark.filterwarnings("ignore:.*meta parameter")
def test_resume_puts_adam_state_on_the_parameters_device(tmp_path):
    """`meta` stands in for CUDA: a device other than the CPU that the checkpoint is read on."""
    from ray.train import Checkpoint

    cfg = small_cfg(tmp_path)
    model, core, optimizer, saved = checkpoints.setup_model(cfg, torch.device("cpu"), lambda m: m)
    assert saved is None
    loss = model(torch.rand(2, 3, 16, 16)).mean()
    loss.backward()
    optimizer.step()
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"model": core.state_dict(), "optimizer": optimizer.state_dict(), **TrainState(epoch=3).to_dict(),
                "history": []}, folder / checkpoints.STATE_FILE)

    meta = torch.device("meta")
    model, core, optimizer, saved = checkpoints.setup_model(cfg, meta, lambda m: m.to(meta), Checkpoint.from_directory(str(folder)))
    assert saved["epoch"] == 3
    moments = [t for s in optimizer.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")]
    assert len(moments) == 2 * len(list(core.parameters()))
    assert all(t.device == meta for t in moments)
    assert all(p.device == meta for p in core.parameters())


# --- best weights ---------------------------------------------------------------------------------------

def test_best_weights_are_written_only_when_they_improved_and_two_are_kept(tmp_path, monkeypatch):
    cfg = small_cfg(tmp_path)
    writers = []
    write_bytes = checkpoints.storage.write_bytes
    monkeypatch.setattr(checkpoints.storage, "write_bytes",
                        lambda *a: (writers.append(threading.current_thread().name), write_bytes(*a)))
    _, core, _, _ = checkpoints.setup_model(cfg, torch.device("cpu"), lambda m: m)
    best = checkpoints.BestWeights(cfg)
    folder = os.path.join(cfg.output, cfg.name, checkpoints.BEST_FOLDER)
    state = TrainState(epoch=1)
    assert best.write(state) is state and not os.path.exists(folder)  # nothing improved: nothing written
    for epoch in (1, 2, 4):
        with torch.no_grad():
            next(core.parameters()).fill_(float(epoch))
        best.improved(core)
        state = best.write(TrainState(epoch=epoch, best_epoch=epoch, best_file=state.best_file))
        assert state.best_file.endswith(f"epoch-{epoch:04d}.pt")
        assert best.write(state) is state  # a second checkpoint without improvement writes nothing
    best.wait()
    # rank 0's upload runs beside training, never on the thread the other workers wait for
    assert len(writers) == 3 and threading.current_thread().name not in writers
    assert sorted(os.listdir(folder)) == ["epoch-0002.pt", "epoch-0004.pt"]
    weights = checkpoints.best_weights(state.to_dict())
    assert float(next(iter(weights.values())).flatten()[0]) == 4.0


# --- each epoch's randomness: a function of (seed, epoch, rank) ------------------------------------

def _draws(d):
    """A few of each stream's next values (consumes them)."""
    return (torch.rand(4, generator=d.augment).tolist(), d.sampler.rng.integers(0, 2 ** 32, 4).tolist(), d.shuffle_seed)


def test_epoch_randomness_is_spawned_from_one_root_per_epoch_and_rank():
    cfg = TrainConfig(data="-", output="-", seed=7, batch_size=4)
    d = epoch_random(cfg, 8, epoch=2, rank=1)
    # the spawn tree it names: root -> epoch 2 -> rank 1 -> (augment, patches, shuffle)
    augment, patches, shuffle = np.random.SeedSequence(7).spawn(3)[2].spawn(2)[1].spawn(3)
    assert d.sampler.rng.integers(0, 2 ** 32, 4).tolist() == np.random.default_rng(patches).integers(0, 2 ** 32, 4).tolist()
    assert d.shuffle_seed == int(shuffle.generate_state(1)[0])
    assert torch.equal(torch.rand(4, generator=d.augment),
                       torch.rand(4, generator=torch.Generator().manual_seed(int(augment.generate_state(1, np.uint64)[0]))))
    assert d.sampler.crop == 8 and d.sampler.capacity == 16 * cfg.batch_size
    same = _draws(epoch_random(cfg, 8, 2, 1))
    assert _draws(epoch_random(cfg, 8, 2, 1)) == same
    others = [_draws(epoch_random(cfg, 8, e, r)) for e, r in ((1, 2), (2, 0), (3, 1), (0, 0))]
    others.append(_draws(epoch_random(TrainConfig(data="-", output="-", seed=8, batch_size=4), 8, 2, 1)))
    for other in others:  # no stream repeats another's values: (1, 2) and (2, 1) differ too
        assert all(a != b for a, b in zip(other, same)), other


def test_an_epoch_after_a_resume_trains_exactly_as_in_the_uninterrupted_run():
    """Three epochs in a row against two, then weights and Adam's state copied into a fresh model
    (what a checkpoint carries) and the third: equal weights. Nothing but the checkpoint and
    (seed, epoch, rank) decides an epoch, not whether the worker group restarted."""
    from lits.model.unet import UNet

    torch.set_num_threads(1)
    cfg = TrainConfig(data="-", output="-", base_width=4, depth=2, batch_size=4, lr=1e-2, seed=3)
    rng = np.random.default_rng(0)
    masks = np.zeros((12, 16, 16), np.uint8)
    masks[:, 3:13, 3:13] = 1
    masks[::3, 6:9, 6:9] = 2
    images = (masks[..., None] * 80 + rng.integers(0, 40, (12, 16, 16, 3))).astype(np.uint8)

    def epoch_batches(epoch):
        order = np.random.default_rng(epoch).permutation(12)
        return iter({"image": images[order[i:i + 4]], "mask": masks[order[i:i + 4]]} for i in range(0, 12, 4))

    def run(model, optimizer, epochs):
        ctx = EpochContext(cfg, model, optimizer, torch.device("cpu"), steps_estimate=12)
        for epoch in epochs:
            train_one_epoch(ctx, TrainState(epoch=epoch), epoch_batches(epoch), epoch_random(cfg, 8, epoch, 0))

    def fresh(seed):
        torch.manual_seed(seed)
        model = UNet(3, 3, cfg.base_width, cfg.depth, cfg.norm)
        return model, torch.optim.Adam(model.parameters(), lr=cfg.lr)

    straight = fresh(0)
    run(*straight, range(3))
    first = fresh(0)
    run(*first, range(2))
    resumed = fresh(1)  # another initialisation: all it keeps comes from the "checkpoint"
    resumed[0].load_state_dict(first[0].state_dict())
    resumed[1].load_state_dict(first[1].state_dict())
    run(*resumed, [2])
    for (name, a), b in zip(straight[0].state_dict().items(), resumed[0].state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(next(iter(first[0].parameters())), next(iter(straight[0].parameters())))


# --- collectives on the training device ------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, backend: str, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        collective = Collective(torch.device("cpu"), world=2)
        if backend.startswith("cuda:"):
            # The group NCCL gives a GPU run: only CUDA tensors have a backend. A CPU tensor fails
            # exactly as it did on 4 GPUs before every collective went through Collective's device.
            try:
                dist.all_reduce(torch.ones(1))
                results[rank] = "no error"
            except RuntimeError as exc:
                results[rank] = str(exc)
            return
        summed = collective.sum(np.array([1.0, rank + 1.0]))
        # worker 1's shard runs dry after 2 batches, worker 0's after 5: both stop after 2 steps
        cfg = TrainConfig(data="-", output="-", base_width=4, depth=2, augment=False, batch_size=2)
        from lits.model.unet import UNet

        model = torch.nn.parallel.DistributedDataParallel(UNet(3, 3, 4, 2))  # as prepare_model wraps it
        optimizer = torch.optim.Adam(model.parameters())
        rng = np.random.default_rng(rank)
        batches = iter([{"image": rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8),
                         "mask": rng.integers(0, 3, (2, 8, 8), dtype=np.uint8)} for _ in range(5 if rank == 0 else 2)])
        ctx = EpochContext(cfg, model, optimizer, torch.device("cpu"), steps_estimate=5, collective=collective)
        items, item = [], torch.Tensor.item


        def counted(t):  # .item() in lits' training code: a host sync per call on a GPU (Adam's own on CPU steps aside)
            if os.path.dirname(sys._getframe(1).f_code.co_filename).endswith(os.path.join("lits", "train")):
                items.append(sys._getframe(1).f_code.co_name)
            return item(t)

        torch.Tensor.item = counted
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                totals = train_one_epoch(ctx, TrainState(), batches, EpochRandom(torch.Generator().manual_seed(0)))
        finally:
            torch.Tensor.item = item
        strides = [str(w.message)[:60] for w in caught if "Grad strides" in str(w.message)]
        # BatchNorm statistics recomputed on each worker's own slices end the same on both (their
        # weighted mean); the choice between them and the moving average is the same on both
        from lits.train.precise_bn import recalibrate
        from lits.train.train_steps import to_tensors, validate_with_best_statistics

        val = [{"image": rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8),
                "mask": rng.integers(0, 3, (2, 8, 8), dtype=np.uint8), "volume_id": np.array(["v", "v"])}]
        _, chosen = validate_with_best_statistics(ctx, totals.slices, lambda: iter(val), {"v": 0})
        recalibrate(model.module, totals.slices, lambda x: to_tensors({"image": x, "mask": x[..., 0]}, torch.device("cpu"), False)[0],
                    collective.weighted_mean_)
        results[rank] = (summed.tolist(), totals.steps, items, strides, model.module.down[0][1].running_mean.tolist(), chosen)
    finally:
        dist.destroy_process_group()


def _run_pair(backend: str):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), backend, results), nprocs=2, join=True)
    return dict(results)


def test_collectives_sum_and_stop_together_across_two_processes():
    """Sums, and "every worker has data" without a .item() per batch; a DDP step whose gradients
    fit DDP's buckets (the model's layout is the input's: no "Grad strides" warning); BatchNorm's
    statistics recomputed on each worker's own slices end the same on both (their weighted mean)."""
    results = _run_pair("cpu:gloo")
    assert results[0][:4] == results[1][:4] == ([2.0, 3.0], 2, [], [])
    assert results[0][4] == results[1][4] and any(abs(v) > 1e-6 for v in results[0][4])
    assert results[0][5] == results[1][5] in ("moving", "slices")


def test_a_cpu_tensor_in_a_cuda_only_group_fails_as_nccl_would():
    results = _run_pair("cuda:gloo")
    assert all("No backend type associated with device type cpu" in r for r in results.values()), results


def test_every_collective_in_lits_goes_through_the_device_collective():
    """dist.all_reduce & co. appear only inside train_steps.Collective; training's one object
    collective (all_gather_object: NCCL sends it from the current CUDA device) is the exception."""
    call = re.compile(r"dist\.(all_reduce|reduce|broadcast|all_gather|all_gather_into_tensor|reduce_scatter|"
                      r"all_to_all|gather|scatter|all_gather_object|broadcast_object_list|barrier)\(")
    found = []
    for folder, _, names in os.walk(LITS):
        for name in sorted(names):
            if name.endswith(".py"):
                for line in open(os.path.join(folder, name)):
                    for m in call.finditer(line):
                        found.append((name, m.group(1)))
    assert sorted(found) == [("train_steps.py", "all_reduce")] * 3 + [("training.py", "all_gather_object")], found


def test_the_epoch_line_says_what_a_user_watches():
    from lits.train.training import epoch_line

    row = {"epoch": 12, "train_loss": 0.83321, "val_loss": 0.94256, "val_dice_liver_volume": 0.95773,
           "val_dice_tumour_volume": 0.0, "val_dice_liver_slice": 0.5, "images_per_s_per_worker": 57.22,
           "seconds": 4.79, "best_epoch": 12}
    assert epoch_line(row, 30) == ("epoch 12/30: loss 0.833 train, 0.943 val; val Dice liver 0.958, tumour 0.000 "
                                   "(per volume); 57 img/s per worker; 4.8 s; best epoch 12")


def test_worker_logging_quiets_ray_and_keeps_lits(monkeypatch):
    """The worker_process_setup_hook: lits' INFO through; Ray Data's INFO and the placement-group
    cleaner's every-second warning not; Ray Train's level WARNING. Under --verbose
    (LITS_VERBOSE_WORKERS=1) Ray's levels are left alone."""
    import logging

    from lits.runtime import worker_logs

    names = ["lits", "ray.data", worker_logs.CLEANER]
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers), logging.getLogger(n).propagate)
             for n in names}
    try:
        for n in names:
            logging.getLogger(n).setLevel(logging.NOTSET)
        logging.getLogger("lits").handlers.clear()
        monkeypatch.setenv(worker_logs.VERBOSE_ENV, "1")
        worker_logs.setup()
        assert logging.getLogger("ray.data").level == logging.NOTSET and worker_logs.ray_level() == "INFO"
        assert worker_logs.ray_env() == {worker_logs.VERBOSE_ENV: "1"}
        assert logging.getLogger("lits.train.training").isEnabledFor(logging.INFO)
        monkeypatch.delenv(worker_logs.VERBOSE_ENV)
        worker_logs.setup()
        assert len(logging.getLogger("lits").handlers) == 1  # not a second handler
        assert worker_logs.ray_level() == "WARNING" and worker_logs.ray_env() == {"RAY_DATA_LOG_LEVEL": "WARNING"}
        assert not logging.getLogger("ray.data._internal.execution").isEnabledFor(logging.INFO)
        cleaner = logging.getLogger(worker_logs.CLEANER)
        assert not cleaner.isEnabledFor(logging.WARNING) and cleaner.isEnabledFor(logging.ERROR)
    finally:
        for n, (level, handlers, propagate) in saved.items():
            logging.getLogger(n).setLevel(level)
            logging.getLogger(n).handlers[:] = handlers
            logging.getLogger(n).propagate = propagate
