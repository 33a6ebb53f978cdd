"""Inputs that must cost one line, not gigabytes or the split (issue 11): decompression bombs, a
header declaring a billion voxels, most inputs bad. Real files, real prepare runs, RSS measured in
a fresh process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from lits.prepare import discovery, pipeline
from lits.core import storage, volumes
from lits.core.config import PrepareConfig
from lits.core.errors import UserError
from lits.core.schema import MANIFEST_NAME, SPLITS
from tests.conftest import ROOT

BOMB_ZEROS = 2 << 30  # what volume-90's gzip stream inflates to after its voxels
HUGE_SHAPE = (1024, 1024, 1100)  # volume-91: 1.15e9 uint8 voxels, over 2^30
PEAK_RSS_LIMIT_MB = 1000


def write_gzip_stream(path: str, head: bytes, zeros: int) -> None:
    """`head` then `zeros` zero bytes as one gzip member, written block by block (small in memory)."""
    from isal import igzip

    block = bytes(16 << 20)
    with igzip.open(path, "wb", compresslevel=1) as f:
        f.write(head)
        for _ in range(zeros // len(block)):
            f.write(block)
        f.write(bytes(zeros % len(block)))


def copy_pair(src: str, i: int, dst, j: int) -> None:
    shutil.copy(os.path.join(src, f"volume-{i}.nii.gz"), os.path.join(dst, f"volume-{j}.nii.gz"))
    shutil.copy(os.path.join(src, f"segmentation-{i}.nii.gz"), os.path.join(dst, f"segmentation-{j}.nii.gz"))


@pytest.fixture(scope="module")
def bombs(tmp_path_factory, nifti_dir):
    """Three good pairs, volume-90 (a valid 32x32x8 volume followed by 2 GiB of zeros in its gzip
    stream, 2 MB on disk) and volume-91 (a valid file of 1024x1024x1100 zero voxels, 1 MB)."""
    root = tmp_path_factory.mktemp("bombs")
    for i in range(3):
        copy_pair(nifti_dir, i, root, i)
    data = np.zeros((32, 32, 8), np.int16)
    write_gzip_stream(str(root / "volume-90.nii.gz"), volumes.nifti_bytes(data, np.eye(4), compress=False), BOMB_ZEROS)
    volumes.write_nifti(str(root / "segmentation-90.nii.gz"), data.astype(np.uint8), np.eye(4))
    header = nib.Nifti1Header()
    header.set_data_shape(HUGE_SHAPE)
    header.set_data_dtype(np.uint8)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352
    write_gzip_stream(str(root / "volume-91.nii.gz"), header.binaryblock + bytes(4), int(np.prod(HUGE_SHAPE)))
    shutil.copy(root / "segmentation-90.nii.gz", root / "segmentation-91.nii.gz")
    return root


def expected_reasons(root) -> dict:
    vol90, vol91 = str(root / "volume-90.nii.gz"), str(root / "volume-91.nii.gz")
    return {
        vol90: f"{vol90}: data continue after the {352 + 32 * 32 * 8 * 2} bytes the header declares (trailing data: "
               "a corrupt or crafted file); re-export the volume",
        vol91: f"{vol91}: the header declares 1024x1024x1100 = 1153433600 voxels, over the limit of 1073741824; a "
               "corrupt or crafted file (prepare's --max-voxels raises the limit)",
    }


_PROBE = r"""
import json, sys
from lits.prepare import pipeline
from lits.core import volumes
from lits.core.config import PrepareConfig

def peak_mb():
    # VmHWM: this process's own peak. getrusage's ru_maxrss survives execve on Linux, so it would
    # report the forking pytest process's size (about 1 GB late in the full suite).
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024

root, out = sys.argv[1], sys.argv[2]
result = {"read": {}, "parse": {}}
for name in ("volume-90.nii.gz", "volume-91.nii.gz"):
    path = f"{root}/{name}"
    for how, call in (("read", lambda: volumes.read_nifti(path)),
                      ("parse", lambda: volumes.parse_nifti(open(path, "rb").read(), path))):
        try:
            call()
            result[how][path] = "accepted"
        except Exception as exc:
            result[how][path] = str(exc)
result["peak_mb_reading"] = peak_mb()
manifest = pipeline.prepare(PrepareConfig(input=root, output=out, image_size=16), pipeline.run_local)
result["failed"] = {f["input"]: f["reason"] for f in manifest["failed"]}
result["volumes"] = sorted(e["volume_id"] for e in manifest["volumes"])
result["peak_mb"] = peak_mb()
print(json.dumps(result))
"""


def test_bombs_cost_one_line_not_gigabytes(bombs, tmp_path):
    """read_nifti, parse_nifti (what /v1/segment calls) and prepare in one process: each bomb is
    refused with one line naming the file, and the process never holds more than ~0.3 GB."""
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(bombs), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    reasons = expected_reasons(bombs)
    assert result["read"] == reasons and result["parse"] == reasons
    assert result["failed"] == reasons and result["volumes"] == ["volume-0", "volume-1", "volume-2"]
    assert result["peak_mb_reading"] < PEAK_RSS_LIMIT_MB and result["peak_mb"] < PEAK_RSS_LIMIT_MB, result


@pytest.mark.slow
def test_bombs_through_prepare_on_ray(ray_cluster, bombs, tmp_path):
    manifest = pipeline.prepare(PrepareConfig(input=str(bombs), output=str(tmp_path / "out"), image_size=16),
                                pipeline.run_ray)
    assert {f["input"]: f["reason"] for f in manifest["failed"]} == expected_reasons(bombs)
    assert [manifest["splits"][s]["volumes"] for s in SPLITS] == [1, 1, 1]

    # too few good volumes for the split: one line through the command, exit 2, output kept
    few = tmp_path / "few"
    few.mkdir()
    copy_pair(str(bombs), 0, few, 0)
    copy_pair(str(bombs), 1, few, 1)
    shutil.copy(bombs / "volume-90.nii.gz", few)
    shutil.copy(bombs / "segmentation-90.nii.gz", few)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "workflows", "prepare.py"), "--input", str(few),
                           "--output", str(tmp_path / "out"), "--image-size", "16", "--address", ray_cluster],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("prepare: error:")]
    assert errors == ["prepare: error: 2 volume(s) succeeded and 1 input(s) failed (listed above): too few volumes "
                      "(2) for a test split at --test-fraction 0.1 (training keeps one volume and every non-zero "
                      "fraction needs one); add volumes or pass --test-fraction 0"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert json.load(open(tmp_path / "out" / MANIFEST_NAME))["volumes"] == manifest["volumes"]


def _write(path, data, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(data, affine), str(path))


def bad_pairs(root, ids) -> None:
    """Pairs whose headers are fine and that fail only when sliced: NaN HU, label 3, cut gzip data."""
    good = np.zeros((16, 16, 8), np.int16)
    for n, i in enumerate(ids):
        kind = n % 3
        if kind == 0:
            nan = good.astype(np.float32)
            nan[3, 3, 3] = np.nan
            _write(root / f"volume-{i}.nii", nan)
            _write(root / f"segmentation-{i}.nii", good.astype(np.uint8))
        elif kind == 1:
            _write(root / f"volume-{i}.nii", good)
            _write(root / f"segmentation-{i}.nii", np.full(good.shape, 3, np.uint8))
        else:
            volumes.write_nifti(str(root / f"volume-{i}.nii.gz"), np.random.default_rng(i).integers(
                -1000, 1000, size=(64, 64, 24)).astype(np.int16), np.eye(4))
            data = open(root / f"volume-{i}.nii.gz", "rb").read()
            (root / f"volume-{i}.nii.gz").write_bytes(data[: len(data) // 2])
            _write(root / f"segmentation-{i}.nii", np.zeros((64, 64, 24), np.uint8))


def mixed_input(nifti_dir, src, good: int, bad):
    """An input folder with pairs 0..good-1 copied from `nifti_dir` and bad pairs numbered `bad`."""
    src.mkdir()
    for i in range(good):
        copy_pair(nifti_dir, i, src, i)
    bad_pairs(src, bad)
    return src


def test_the_split_is_drawn_over_the_volumes_that_succeeded(nifti_dir, tmp_path):
    """The issue's case: 5 good pairs among 22. Every bad one passes discovery and its header check
    and fails only when sliced; the split is still (3, 1, 1) over the five, as if only they existed."""
    src = mixed_input(nifti_dir, tmp_path / "in", good=5, bad=range(10, 27))
    out = tmp_path / "out"
    manifest = pipeline.prepare(PrepareConfig(input=str(src), output=str(out), image_size=16), pipeline.run_local)
    good = [f"volume-{i}" for i in range(5)]
    assert sorted(e["volume_id"] for e in manifest["volumes"]) == good and len(manifest["failed"]) == 17
    reasons = " ".join(f["reason"] for f in manifest["failed"])
    assert reasons.count("NaN") == 6 and reasons.count("outside {0, 1, 2}") == 6 and reasons.count("truncated") == 5
    assert [manifest["splits"][s]["volumes"] for s in SPLITS] == [3, 1, 1]
    assert {e["volume_id"]: e["split"] for e in manifest["volumes"]} == discovery.assign_splits(good, 0.1, 0.1, 0)
    for e in manifest["volumes"]:  # each shard in its split's folder, nothing else there
        assert e["shard"] == f"{e['split']}/{e['volume_id']}.parquet" and os.path.isfile(out / e["shard"])
    assert sorted(os.listdir(out)) == sorted([MANIFEST_NAME, "preview.png", *SPLITS])


def test_too_few_good_volumes_is_one_error_and_the_output_is_kept(nifti_dir, tmp_path):
    src = mixed_input(nifti_dir, tmp_path / "in", good=2, bad=range(10, 13))
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "train" / "volume-7.parquet").write_bytes(b"previous")
    (out / MANIFEST_NAME).write_text("{}")
    with pytest.raises(UserError) as caught:
        pipeline.prepare(PrepareConfig(input=str(src), output=str(out), image_size=16), pipeline.run_local)
    assert str(caught.value) == (
        "2 volume(s) succeeded and 3 input(s) failed (listed above): too few volumes (2) for a test split at "
        "--test-fraction 0.1 (training keeps one volume and every non-zero fraction needs one); add volumes or "
        "pass --test-fraction 0")
    assert sorted(os.listdir(out)) == [MANIFEST_NAME, "train"]  # no staging left, nothing replaced
    assert (out / "train" / "volume-7.parquet").read_bytes() == b"previous"


def test_memory_is_sized_from_the_headers(nifti_dir, tmp_path):
    header = nib.Nifti1Header()
    header.set_data_shape((512, 512, 100))
    header.set_data_dtype(np.int16)
    header.set_sform(np.diag([0.8, 0.8, 2.5, 1.0]), code=1)
    header["vox_offset"] = 352
    (tmp_path / "volume-1.nii").write_bytes(header.binaryblock + bytes(4))  # a header is all it takes
    volume = volumes.read_header(str(tmp_path / "volume-1.nii"))
    header.set_data_dtype(np.uint8)
    (tmp_path / "segmentation-1.nii").write_bytes(header.binaryblock + bytes(4))
    segmentation = volumes.read_header(str(tmp_path / "segmentation-1.nii"))
    header.set_data_shape((512, 512, 987))  # LiTS' longest scan: the request grows with the header
    header.set_data_dtype(np.int16)
    (tmp_path / "volume-2.nii").write_bytes(header.binaryblock + bytes(4))
    header.set_data_dtype(np.uint8)
    (tmp_path / "segmentation-2.nii").write_bytes(header.binaryblock + bytes(4))
    # The largest stage of a 512x512x100 int16 pair: the int16 volume, its uint8 labels, 32 slices
    # gathered and every slice's image and mask at 256^2 (4 B a pixel); then 4 MB of small
    # temporaries and the worker.
    def stages_peak(slices):
        return 3 * 512 * 512 * slices + 32 * 512 * 512 * 2 + slices * 256 * 256 * 4 + (4 << 20) + (384 << 20)

    expected, long_scan = stages_peak(100), stages_peak(987)
    from lits.prepare.slicing import memory_bytes

    assert memory_bytes(volume, segmentation, 256) == expected == 528482304
    cfg = PrepareConfig(input=str(tmp_path), output="o")
    tasks, failed = discovery.check_headers(discovery.discover(cfg)[0], cfg)
    assert failed == [] and [t.memory_bytes for t in tasks] == [expected, long_scan]
    # Each Ray task reserves its own volume's estimate (1.46 GB for LiTS' longest scan, 0.53 GB here),
    # not the largest volume's for every task.
    assert [pipeline.memory_request(t, [32 << 30]) for t in tasks] == [expected, long_scan]
    assert pipeline.memory_request(tasks[0], [8 << 30], attempt=2) == 2 * expected  # after a kill
    assert pipeline.memory_request(tasks[1], [1 << 30]) == 1 << 30  # never more than a node has
    images = discovery.VolumeTask(volume_id="volume-3", format="images")
    assert pipeline.memory_request(images, []) == 384 << 20


def write_pair(path, rng, scaled: bool, shape=(512, 512, 48)) -> None:
    """volume-1.nii and segmentation-1.nii: int16 HU with uint8 labels, or (`scaled`) uint16 with
    scl_slope 1, scl_inter -1024 (read back as float32 HU) with float32 labels, the costliest
    layout a LiTS-like pair can have."""
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    stored = rng.integers(0, 1400, size=shape, dtype=np.uint16)
    image = nib.Nifti1Image(stored if scaled else (stored.astype(np.int16) - 1024), affine)
    if scaled:
        image.header.set_slope_inter(1.0, -1024.0)
    nib.save(image, str(path / "volume-1.nii"))
    labels = np.zeros(shape, np.float32 if scaled else np.uint8)
    labels[100:400, 100:400, 10:40] = 1
    labels[200:260, 200:260, 20:30] = 2
    nib.save(nib.Nifti1Image(labels, affine), str(path / "segmentation-1.nii"))


def traced_peak(function, *args):
    import tracemalloc

    tracemalloc.start()
    try:
        result = function(*args)
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


def test_a_scaled_volume_is_read_as_one_float32_copy(tmp_path, rng):
    write_pair(tmp_path, rng, scaled=True)
    voxels = 512 * 512 * 48
    peak, (hu, _) = traced_peak(volumes.read_nifti, str(tmp_path / "volume-1.nii"))
    assert hu.dtype == np.float32 and float(hu.min()) >= -1024.0
    # the stored uint16 voxels, one float32 copy, one 16 MB read of the file: no second copy
    assert peak < voxels * (2 + 4) + (24 << 20), peak / 1e6


@pytest.mark.parametrize("scaled", [False, True], ids=["int16 + uint8 labels", "scaled uint16 + float32 labels"])
def test_the_reservation_bounds_the_traced_peak_of_slicing(tmp_path, rng, scaled):
    from lits.prepare import slicing

    write_pair(tmp_path, rng, scaled)
    cfg = PrepareConfig(input=str(tmp_path), output="o", keep_liver=1.0, keep_empty=1.0)
    tasks, failed = discovery.check_headers(discovery.discover(cfg)[0], cfg)
    assert failed == []
    peak, result = traced_peak(slicing.slice_volume, tasks[0], cfg)
    estimate = tasks[0].memory_bytes - slicing.WORKER_BASE_BYTES
    assert len(result.table) == result.entry["canonical_shape"][0]  # every slice kept, as estimated
    # at most twice the traced peak: the estimate also holds the shard, in pyarrow's (untraced) memory
    assert peak <= estimate <= 2 * peak, (peak / 1e6, estimate / 1e6)


def test_a_network_failure_is_transient_and_a_bad_file_is_not(tmp_path, monkeypatch):
    from tests.conftest import free_port

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's retries would take seconds
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(Exception) as caught:
        volumes.read_nifti("s3://bucket/volume-1.nii.gz")
    assert "the S3 endpoint is unreachable" in str(caught.value) and storage.is_transient(caught.value)
    (tmp_path / "volume-1.nii").write_bytes(b"not a nifti" * 40)
    with pytest.raises(Exception) as caught:
        volumes.read_nifti(str(tmp_path / "volume-1.nii"))
    assert not storage.is_transient(caught.value)


def test_a_network_failure_mid_run_fails_its_volume_with_a_reason(nifti_dir, tmp_path, monkeypatch):
    """The bucket answers discovery and the header checks, then goes away: each volume fails with
    one line saying so (storage.TransientError, which Ray would try again), and the run ends."""
    from moto.server import ThreadedMotoServer

    from tests.conftest import free_port, make_bucket, upload_tree

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's retries would take seconds
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    src = tmp_path / "in"
    src.mkdir()
    copy_pair(nifti_dir, 0, src, 0)
    make_bucket(endpoint, "gone")
    upload_tree(endpoint, str(src), "s3://gone/ct")

    def bucket_goes_away(tasks, cfg, staging):
        server.stop()
        yield from pipeline.run_local(tasks, cfg, staging)

    cfg = PrepareConfig(input="s3://gone/ct", output=str(tmp_path / "out"), image_size=16, val_fraction=0,
                        test_fraction=0)
    manifest = pipeline.prepare(cfg, bucket_goes_away)
    assert manifest["totals"]["volumes"] == 0 and len(manifest["failed"]) == 1
    failure = manifest["failed"][0]
    assert failure["input"] == "s3://gone/ct/volume-0.nii.gz"
    assert failure["reason"].startswith("volume-0: BadInputError: s3://gone/ct/volume-0.nii.gz: cannot read (")
    assert "the S3 endpoint is unreachable" in failure["reason"]
    assert failure["reason"].endswith("; try again when the storage answers") and "\n" not in failure["reason"]
