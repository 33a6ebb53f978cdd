"""Finding inputs and splitting by volume (no Ray)."""

import pytest

from lits import pipeline


def test_splits_are_by_volume_seeded_and_sized():
    ids = [f"volume-{i}" for i in range(131)]
    split = pipeline.assign_splits(ids, 0.1, 0.1, seed=0)
    counts = {s: sum(v == s for v in split.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 105, "val": 13, "test": 13}
    assert pipeline.assign_splits(list(reversed(ids)), 0.1, 0.1, seed=0) == split  # listing order is irrelevant
    assert pipeline.assign_splits(ids, 0.1, 0.1, seed=1) != split


@pytest.mark.parametrize("n, expected", [(1, (1, 0, 0)), (2, (1, 1, 0)), (3, (1, 1, 1)), (12, (10, 1, 1))])
def test_small_datasets_keep_a_training_volume(n, expected):
    # training keeps one volume; when only two exist, validation (early stopping) beats test
    split = pipeline.assign_splits([f"volume-{i}" for i in range(n)], 0.1, 0.1, seed=0)
    assert tuple(sum(v == s for v in split.values()) for s in ("train", "val", "test")) == expected


def test_nifti_pairs_across_folders_and_problems():
    root = "/data"
    files = [
        "/data/volume_pt1/volume-0.nii", "/data/segmentations/segmentation-0.nii",
        "/data/volume_pt2/volume-1.nii.gz", "/data/segmentations/segmentation-1.nii.gz",
        "/data/volume_pt2/volume-2.nii",  # no segmentation
        "/data/segmentations/segmentation-3.nii",  # no volume
        "/data/a/volume-4.nii", "/data/b/volume-4.nii.gz", "/data/segmentations/segmentation-4.nii",  # duplicate
        "/data/notes/volume-5.txt", "/data/volume-6.nii.bak",  # not NIfTI names: ignored
    ]
    pairs, failed = pipeline.find_nifti_pairs(files, root)
    assert pairs == {"volume-0": (files[0], files[1]), "volume-1": (files[2], files[3])}
    reasons = {f["input"]: f["reason"] for f in failed}
    assert "no segmentation-2" in reasons["/data/volume_pt2/volume-2.nii"]
    assert "no volume-3" in reasons["/data/segmentations/segmentation-3.nii"]
    assert all("more than once" in reasons[p] for p in files[6:9])
    assert len(failed) == 5


def test_image_series_pairs_slices():
    root = "s3://b/set"
    files = [
        "s3://b/set/images/train/volume-7_slice_3.jpg", "s3://b/set/masks/train/volume-7_slice_3_mask.jpg",
        "s3://b/set/images/volume-7_slice_10.png", "s3://b/set/masks/x/y/volume-7_slice_10_mask.png",
        "s3://b/set/images/volume-8_slice_0.jpg",  # no mask
    ]
    series, failed = pipeline.find_image_series(files, root)
    assert series == {"volume-7": [(3, files[0], files[1]), (10, files[2], files[3])]}
    assert failed == [{"input": files[4], "reason": "no mask volume-8_slice_0_mask.* under masks/"}]
