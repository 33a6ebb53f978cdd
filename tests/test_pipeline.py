"""The prepare stage end to end: on a real local Ray (local folders, S3, the image layout, bad input;
marked slow) and in one process (context images, re-runs, cuts during the commit)."""

from __future__ import annotations

import glob
import json
import os
import shutil

import cv2
import nibabel as nib
import numpy as np
import pytest

from lits.core import ct, storage
from lits.prepare import pipeline
from lits.core.config import PrepareConfig
from lits.core.schema import COLUMNS, MANIFEST_NAME, SPLITS, WINDOW_LIVER
from tests.conftest import make_bucket, run_workflow, synthesize, upload_tree

SIZE = 32


def read_split(out: str, split: str, filesystem=None):
    """All rows of one split through ray.data.read_parquet, as a dict of numpy columns."""
    import ray.data

    ds = ray.data.read_parquet(storage.join(out, split) if filesystem is None else out + "/" + split, filesystem=filesystem)
    assert ds.schema().names == list(COLUMNS)
    rows = ds.take_all()
    columns = {c: [r[c] for r in rows] for c in COLUMNS}
    # fixed_size_binary slices (lits.core.shards) arrive as bytes: square images with 3 channels, masks with 1
    for name, channels in (("image", 3), ("mask", 1)):
        side = [int(round((len(v) / channels) ** 0.5)) for v in columns[name]]
        columns[name] = [np.frombuffer(v, np.uint8).reshape((n, n, channels) if channels > 1 else (n, n))
                         for v, n in zip(columns[name], side)]
    return columns


def listed_shards(out: str):
    found = set()
    for split in SPLITS:
        found |= {f"{split}/{os.path.basename(p)}" for p in glob.glob(os.path.join(out, split, "*"))}
    return found


def manifest_shards(manifest):
    return {s for split in SPLITS for s in manifest["splits"][split]["shards"]}


def reference_slice(seg_path: str, file_index: int) -> np.ndarray:
    """The label slice at `file_index` along the file's axial axis, in the radiological view,
    computed with nibabel only (an implementation independent of lits.core.volumes)."""
    image = nib.load(seg_path)
    ras = np.asanyarray(nib.as_closest_canonical(image).dataobj)
    axial = list(nib.aff2axcodes(image.affine)).index([c for c in nib.aff2axcodes(image.affine) if c in "SI"][0])
    n = image.shape[axial]
    k = file_index if nib.aff2axcodes(image.affine)[axial] == "S" else n - 1 - file_index
    # RAS slice k: (x right, y anterior) -> rows posterior-going, columns patient-left-going
    return ras[::-1, ::-1, k].T


@pytest.mark.slow
def test_prepare_local_nifti_end_to_end(ray_cluster, nifti_dir, tmp_path):
    out = str(tmp_path / "out")
    cfg = PrepareConfig(input=nifti_dir, output=out, image_size=SIZE, keep_liver=0.5, keep_empty=0.3,
                        val_fraction=0.2, test_fraction=0.2)
    seen = []
    manifest = pipeline.prepare(cfg, pipeline.run_ray, lambda done, total, r: seen.append((done, total)))
    assert seen[-1] == (6, 6)
    assert manifest["totals"]["volumes"] == 6 and manifest["failed"] == []
    assert [manifest["splits"][s]["volumes"] for s in SPLITS] == [4, 1, 1]
    assert listed_shards(out) == manifest_shards(manifest)
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no staging, no temporaries
    on_disk = json.load(open(os.path.join(out, MANIFEST_NAME)))
    assert on_disk["splits"] == manifest["splits"] and on_disk["config"]["image_size"] == SIZE
    assert all(e["node_id"] for e in manifest["volumes"])
    # the picture: one captioned tile per sampled slice, 4 per split, liver/tumour outlines drawn
    assert manifest["preview"] == "preview.png"
    sheet = cv2.imread(os.path.join(out, "preview.png"))
    assert sheet.shape == (3 * (192 + 18), 4 * 192, 3)
    assert ((sheet[..., 2] > 200) & (sheet[..., 1] < 80)).any()  # red tumour outline

    volumes_by_split = {}
    for split in SPLITS:
        rows = read_split(out, split)
        assert len(rows["volume_id"]) == manifest["splits"][split]["slices"]
        volumes_by_split[split] = set(rows["volume_id"])
        for vid, index, category, image, mask, spacing in zip(*(rows[c] for c in COLUMNS)):
            assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
            assert mask.shape == (SIZE, SIZE) and mask.dtype == np.uint8
            seg_path = os.path.join(nifti_dir, f"segmentation-{vid.split('-')[1]}.nii.gz")
            ref = reference_slice(seg_path, int(index))
            assert category == ref.max()
            assert np.array_equal(mask, cv2.resize(np.ascontiguousarray(ref), (SIZE, SIZE), interpolation=cv2.INTER_NEAREST))
            zooms = nib.load(seg_path).header.get_zooms()
            codes = nib.aff2axcodes(nib.load(seg_path).affine)
            expected = [zooms[[i for i, c in enumerate(codes) if c in pair][0]] for pair in ("LR", "AP", "SI")]
            assert np.allclose(spacing, expected, rtol=1e-5)
    # split by volume: no volume in two splits, all volumes somewhere
    assert not (volumes_by_split["train"] & volumes_by_split["val"])
    assert not (volumes_by_split["train"] & volumes_by_split["test"])
    assert not (volumes_by_split["val"] & volumes_by_split["test"])
    assert set().union(*volumes_by_split.values()) == {f"volume-{i}" for i in range(6)}
    # tumour slices are always kept
    for entry in manifest["volumes"]:
        assert entry["kept"]["tumour"] == entry["slices"]["tumour"] > 0


def test_context_images_stack_neighbouring_liver_windows(nifti_dir, tmp_path):
    out = str(tmp_path / "ctx")
    cfg = PrepareConfig(input=nifti_dir, output=out, image_size=64, keep_liver=1.0, keep_empty=0.0, context=1)
    pipeline.prepare(cfg, pipeline.run_local)
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(out, "train", os.listdir(os.path.join(out, "train"))[0]))
    vid = table.column("volume_id")[0].as_py()
    from lits.core import volumes

    hu_file, g = volumes.read_nifti(os.path.join(nifti_dir, f"{vid}.nii.gz"))
    hu = g.to_canonical(hu_file)
    file_to_z = {int(g.file_slice_index(z)): z for z in range(hu.shape[0])}
    from lits.core import shards

    images = shards.decode(table.column("image"), shards.column_shape(table.schema, "image", "shard"))
    for index, image in zip(table.column("slice_index").to_pylist(), images):
        z = file_to_z[index]
        for channel, k in enumerate((z - 1, z, z + 1)):
            k = min(max(k, 0), hu.shape[0] - 1)
            assert np.array_equal(image[..., channel], ct.window(hu[k], *WINDOW_LIVER))


def test_stage_seconds_sum_to_each_volume_total_and_the_timeline_is_ordered(nifti_dir, tmp_path):
    import time

    cfg = PrepareConfig(input=nifti_dir, output=str(tmp_path / "out"), image_size=32)
    started = time.perf_counter()
    manifest = pipeline.prepare(cfg, pipeline.run_local)
    wall = time.perf_counter() - started
    stages = ("read", "validate", "select", "histogram", "images", "masks", "encode", "write")
    for entry in manifest["volumes"]:
        seconds = entry["seconds"]
        assert tuple(k for k in seconds if k != "total") == stages
        assert seconds["total"] == pytest.approx(sum(seconds[k] for k in stages), abs=1e-9)
    line = manifest["timeline"]
    assert 0 < line["headers_checked"] <= line["first_volume_done"] <= line["last_volume_done"] < wall
    assert line["last_volume_done"] <= manifest["seconds"] + 0.005  # 'seconds' is rounded to 0.01
    # the stages cover the volumes' whole time: one process, so their sum is the loop's time
    loop = line["last_volume_done"] - line["headers_checked"]
    assert sum(e["seconds"]["total"] for e in manifest["volumes"]) == pytest.approx(loop, rel=0.1, abs=0.03)


def test_rerun_replaces_output_and_interruption_keeps_previous(nifti_dir, tmp_path):
    out = str(tmp_path / "out")
    first = pipeline.prepare(PrepareConfig(input=nifti_dir, output=out, image_size=SIZE, keep_empty=1.0), pipeline.run_local)
    again = pipeline.prepare(PrepareConfig(input=nifti_dir, output=out + "2", image_size=SIZE, keep_empty=1.0), pipeline.run_local)
    for shard in manifest_shards(first):  # seeded: the same config gives the same shards
        a = open(os.path.join(out, shard), "rb").read()
        b = open(os.path.join(out + "2", shard), "rb").read()
        assert a == b
    assert manifest_shards(first) == manifest_shards(again)

    # a re-run with other settings into the same output replaces it completely
    os.makedirs(os.path.join(out, ".staging-deadbeef", "train"))  # left by a crashed run
    second = pipeline.prepare(PrepareConfig(input=nifti_dir, output=out, image_size=SIZE, keep_empty=0.0,
                                            keep_liver=0.0, val_fraction=0.0, test_fraction=0.5), pipeline.run_local)
    assert listed_shards(out) == manifest_shards(second)
    assert second["splits"]["val"]["shards"] == [] and not os.path.exists(os.path.join(out, "val"))
    assert not [p for p in os.listdir(out) if p.startswith(".")]
    assert sum(second["totals"]["kept"].values()) < sum(first["totals"]["kept"].values())

    before = {p: open(p, "rb").read() for p in glob.glob(os.path.join(out, "**", "*"), recursive=True) if os.path.isfile(p)}

    def interrupted(tasks, cfg, staging):
        yield from list(pipeline.run_local(tasks[:2], cfg, staging))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline.prepare(PrepareConfig(input=nifti_dir, output=out, image_size=SIZE), interrupted)
    after = {p: open(p, "rb").read() for p in glob.glob(os.path.join(out, "**", "*"), recursive=True) if os.path.isfile(p)}
    assert after == before  # the previous output, untouched
    assert not [p for p in os.listdir(out) if p.startswith(".")]


class Cut(OSError):
    """The failure injected into prepare's commit."""


def test_a_cut_during_the_swap_never_leaves_a_lying_manifest(nifti_dir, tmp_path, monkeypatch):
    """prepare dies at each step of its commit in turn (that storage call and every later one fail,
    as when the process is killed; even its own clean-up): README's promise holds at every cut, no
    manifest, never a manifest naming shards that are not there, and the next run completes."""
    out = str(tmp_path / "out")
    common = dict(input=nifti_dir, output=out, image_size=SIZE, val_fraction=0.2, test_fraction=0.2)
    real_commit = pipeline.commit
    originals = {name: getattr(storage, name) for name in ("write_bytes", "delete", "move_file")}
    state = {"armed": False, "calls": [], "cut": None}

    def commit(*args):
        state["armed"] = True
        real_commit(*args)

    def counted(name):
        def call(uri, *rest, **kwargs):
            if state["armed"]:
                state["calls"].append(f"{name} {os.path.relpath(uri, out)}")
                if state["cut"] is not None and len(state["calls"]) >= state["cut"]:
                    raise Cut(f"cut at commit step {len(state['calls'])}")
            return originals[name](uri, *rest, **kwargs)
        return call

    def run(cut, **changes):
        state.update(armed=False, calls=[], cut=cut)
        with monkeypatch.context() as m:
            m.setattr(pipeline, "commit", commit)
            for name in originals:
                m.setattr(storage, name, counted(name))
            return pipeline.prepare(PrepareConfig(**common, **changes), pipeline.run_local)

    first = run(None)
    steps = list(state["calls"])
    # each shard moves from staging into its split's folder, the manifest is written last
    moves = [s for s in steps if s.startswith("move_file")]
    assert steps[-1] == f"write_bytes {MANIFEST_NAME}" and len(moves) == len(manifest_shards(first)) == 6, steps
    assert all(m.startswith("move_file .staging-") and m.endswith(".parquet") for m in moves), moves
    for cut in range(1, len(steps) + 2):
        # the run after a cut removes what it left and completes: the previous output of the next cut
        complete = run(None)
        assert listed_shards(out) == manifest_shards(complete) and not [p for p in os.listdir(out) if p.startswith(".")]
        if cut > len(steps):
            break
        with pytest.raises(Cut):
            run(cut, keep_empty=0.5, seed=cut)  # other settings: other shards
        manifest_path = os.path.join(out, MANIFEST_NAME)
        if os.path.exists(manifest_path):  # only when the cut came before anything was touched
            manifest = json.load(open(manifest_path))
            assert manifest_shards(manifest) <= listed_shards(out), steps[cut - 1]
            assert cut == 1 and manifest["splits"] == complete["splits"], steps[cut - 1]


def _write(path, data, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(data, affine), path)


@pytest.mark.slow
def test_bad_inputs_are_reported_and_the_rest_completes(ray_cluster, nifti_dir, tmp_path):
    src = tmp_path / "in"
    (src / "volume_pt1").mkdir(parents=True)
    (src / "segmentations").mkdir()
    for i in (0, 1):  # Kaggle's split layout: volumes and segmentations in different folders
        shutil.copy(os.path.join(nifti_dir, f"volume-{i}.nii.gz"), src / "volume_pt1")
        shutil.copy(os.path.join(nifti_dir, f"segmentation-{i}.nii.gz"), src / "segmentations")
    good = open(os.path.join(nifti_dir, "volume-2.nii.gz"), "rb").read()
    (src / "volume_pt1" / "volume-10.nii.gz").write_bytes(good[: len(good) // 3])  # truncated
    shutil.copy(os.path.join(nifti_dir, "segmentation-2.nii.gz"), src / "segmentations" / "segmentation-10.nii.gz")
    shutil.copy(os.path.join(nifti_dir, "volume-3.nii.gz"), src / "volume_pt1" / "volume-11.nii.gz")  # no segmentation
    shutil.copy(os.path.join(nifti_dir, "segmentation-3.nii.gz"), src / "segmentations" / "segmentation-12.nii.gz")  # no volume
    _write(str(src / "volume-13.nii"), np.zeros((16, 16, 8), np.int16))  # shape mismatch
    _write(str(src / "segmentation-13.nii"), np.zeros((16, 16, 9), np.uint8))
    _write(str(src / "volume-14.nii"), np.zeros((16, 16, 8, 2), np.int16))  # 4-D
    _write(str(src / "segmentation-14.nii"), np.zeros((16, 16, 8, 2), np.uint8))
    nan = np.zeros((16, 16, 8), np.float32)
    nan[3, 3, 3] = np.nan
    _write(str(src / "volume-15.nii"), nan)  # NaN HU
    _write(str(src / "segmentation-15.nii"), np.zeros((16, 16, 8), np.uint8))
    _write(str(src / "volume-16.nii"), np.zeros((16, 16, 8), np.int16))
    _write(str(src / "segmentation-16.nii"), np.full((16, 16, 8), 3, np.uint8))  # label 3
    (src / "volume-17.nii").write_text("not a nifti")  # not NIfTI
    _write(str(src / "segmentation-17.nii"), np.zeros((16, 16, 8), np.uint8))
    # float volume and float labels are fine
    _write(str(src / "volume-18.nii"), np.full((16, 16, 8), 50.0, np.float32))
    lab = np.zeros((16, 16, 8), np.float32)
    lab[4:8, 4:8, 2:5] = 1.0
    lab[5:7, 5:7, 3] = 2.0
    _write(str(src / "segmentation-18.nii"), lab)

    out = tmp_path / "out"
    res = run_workflow("prepare", "--input", str(src), "--output", str(out), "--image-size", "16",
                       "--address", ray_cluster)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.load(open(out / MANIFEST_NAME))
    reasons = {os.path.basename(f["input"]): f["reason"] for f in manifest["failed"]}
    assert "truncated" in reasons["volume-10.nii.gz"]
    assert "no segmentation-11" in reasons["volume-11.nii.gz"]
    assert "no volume-12" in reasons["segmentation-12.nii.gz"]
    assert "differs from its volume's" in reasons["volume-13.nii"]
    assert "4-D" in reasons["volume-14.nii"]
    assert "NaN" in reasons["volume-15.nii"]
    assert "outside {0, 1, 2}" in reasons["volume-16.nii"]
    assert "not a NIfTI" in reasons["volume-17.nii"]
    assert len(reasons) == 8
    ok = {e["volume_id"]: e for e in manifest["volumes"]}
    assert set(ok) == {"volume-0", "volume-1", "volume-18"}
    assert ok["volume-18"]["slices"] == {"empty": 5, "liver": 2, "tumour": 1}
    assert "failed inputs: 8" in res.stdout and "volume-17.nii: " in res.stdout
    assert "Traceback" not in res.stderr

    strict = run_workflow("prepare", "--input", str(src), "--output", str(tmp_path / "strict"), "--image-size", "16",
                          "--address", ray_cluster, "--strict")
    assert strict.returncode == 1 and "--strict" in strict.stderr

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    shutil.copy(src / "volume-17.nii", only_bad)
    shutil.copy(src / "segmentation-17.nii", only_bad)
    res = run_workflow("prepare", "--input", str(only_bad), "--output", str(out), "--address", ray_cluster)
    assert res.returncode == 1 and "no volume succeeded" in res.stdout
    assert json.load(open(out / MANIFEST_NAME))["volumes"] == manifest["volumes"]  # previous output kept


@pytest.mark.slow
def test_image_layout_matches_nifti_labels(ray_cluster, tmp_path):
    # The same six phantoms as NIfTI and as the converted JPEG dataset (two colormaps); 128 px,
    # because at 64 px a tumour cap is a pixel or two, which no JPEG keeps.
    nifti_dir = synthesize(tmp_path / "nifti", volumes=6, size=128, slices=24)
    images = tmp_path / "converted"
    synthesize(images, volumes=3, size=128, slices=24, fmt="images", colormap="Blues", first_id=0)
    synthesize(images, volumes=3, size=128, slices=24, fmt="images", colormap="viridis", first_id=3)
    bad_mask = images / "masks" / "volume-4" / "volume-4_slice_5_mask.jpg"
    noise = np.random.default_rng(0).integers(0, 256, size=(128, 128, 3)).astype(np.uint8)
    cv2.imwrite(str(bad_mask), noise)
    os.remove(images / "images" / "volume-5" / "volume-5_slice_7.jpg")  # a mask without its image

    common = dict(image_size=SIZE, keep_liver=1.0, keep_empty=1.0, val_fraction=0.0, test_fraction=0.0)
    from_images = pipeline.prepare(PrepareConfig(input=str(images), output=str(tmp_path / "a"), **common), pipeline.run_ray)
    pipeline.prepare(PrepareConfig(input=nifti_dir, output=str(tmp_path / "b"), **common), pipeline.run_ray)
    assert from_images["input_format"] == "images" and from_images["totals"]["volumes"] == 6
    reasons = {os.path.basename(f["input"]): f["reason"] for f in from_images["failed"]}
    assert set(reasons) == {"volume-4_slice_5_mask.jpg", "volume-5_slice_7_mask.jpg"}
    assert "not a colour-mapped label mask" in reasons["volume-4_slice_5_mask.jpg"]
    assert "no image volume-5_slice_7" in reasons["volume-5_slice_7_mask.jpg"]

    a, b = read_split(str(tmp_path / "a"), "train"), read_split(str(tmp_path / "b"), "train")
    key = lambda rows: {(v, int(i)): n for n, (v, i) in enumerate(zip(rows["volume_id"], rows["slice_index"]))}  # noqa: E731
    ka, kb = key(a), key(b)
    assert set(ka) == set(kb) - {("volume-4", 5), ("volume-5", 7)}
    agreement = [np.mean(a["mask"][ka[k]] == b["mask"][kb[k]]) for k in ka]
    assert np.mean(agreement) > 0.999 and min(agreement) > 0.98
    pairs = [(int(a["category"][ka[k]]), int(b["category"][kb[k]])) for k in ka]
    assert np.mean([x == y for x, y in pairs]) > 0.95
    assert {(x, y) for x, y in pairs if x != y} <= {(1, 2)}  # only the smallest tumour caps are missed
    # images: the same three windows, through JPEG
    diff = [np.abs(a["image"][ka[k]].astype(int) - b["image"][kb[k]].astype(int)).mean() for k in ka]
    assert np.mean(diff) < 4.0
    assert all(np.isnan(s).all() for s in a["spacing"])


@pytest.mark.slow
def test_prepare_s3_to_s3(ray_cluster, s3_server, nifti_dir):
    make_bucket(s3_server, "lits-in")
    make_bucket(s3_server, "lits-out")
    upload_tree(s3_server, nifti_dir, "s3://lits-in/ct")
    cfg = PrepareConfig(input="s3://lits-in/ct/", output="s3://lits-out/prepared", image_size=SIZE,
                        keep_empty=0.5)
    manifest = pipeline.prepare(cfg, pipeline.run_ray)
    assert manifest["totals"]["volumes"] == 6 and not manifest["failed"]
    assert manifest["volumes"][0]["inputs"]["volume"].startswith("s3://lits-in/ct/")
    stored = json.loads(storage.read_bytes("s3://lits-out/prepared/manifest.json"))
    assert stored["splits"] == manifest["splits"]
    files = storage.list_files("s3://lits-out/prepared")
    assert {f[len("s3://lits-out/prepared/"):] for f in files} == manifest_shards(manifest) | {MANIFEST_NAME, "preview.png"}
    fs, path = storage.arrow_filesystem("s3://lits-out/prepared")
    rows = read_split(path, "train", filesystem=fs)
    assert len(rows["volume_id"]) == manifest["splits"]["train"]["slices"] > 0
    local = pipeline.prepare(PrepareConfig(input=nifti_dir, output=str(os.path.join(os.path.dirname(nifti_dir), "s3cmp")),
                                           image_size=SIZE, keep_empty=0.5), pipeline.run_local)
    assert local["splits"] == stored["splits"]  # same data, same seed: same result from a bucket
