"""Finding inputs and splitting by volume (no Ray)."""

import numpy as np
import pytest

from lits.prepare import discovery
from lits.core.errors import UserError


def test_splits_are_by_volume_seeded_and_sized():
    ids = [f"volume-{i}" for i in range(131)]
    split = discovery.assign_splits(ids, 0.1, 0.1, seed=0)
    counts = {s: sum(v == s for v in split.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 105, "val": 13, "test": 13}
    assert discovery.assign_splits(list(reversed(ids)), 0.1, 0.1, seed=0) == split  # listing order is irrelevant
    assert discovery.assign_splits(ids, 0.1, 0.1, seed=1) != split


@pytest.mark.parametrize("n, val, test, expected", [(3, 0.1, 0.1, (1, 1, 1)), (12, 0.1, 0.1, (10, 1, 1)),
                                                    (1, 0.0, 0.0, (1, 0, 0)), (2, 0.1, 0.0, (1, 1, 0)),
                                                    (4, 0.4, 0.4, (1, 2, 1))])
def test_small_datasets_keep_a_training_volume(n, val, test, expected):
    split = discovery.assign_splits([f"volume-{i}" for i in range(n)], val, test, seed=0)
    assert tuple(sum(v == s for v in split.values()) for s in ("train", "val", "test")) == expected


@pytest.mark.parametrize("n, val, test, named", [(1, 0.1, 0.1, "val"), (2, 0.1, 0.1, "test"), (1, 0.0, 0.2, "test")])
def test_a_non_zero_fraction_never_gives_an_empty_split(n, val, test, named):
    with pytest.raises(UserError) as caught:
        discovery.assign_splits([f"volume-{i}" for i in range(n)], val, test, seed=0)
    fraction = val if named == "val" else test
    assert str(caught.value) == (
        f"too few volumes ({n}) for a {named} split at --{named}-fraction {fraction} (training keeps one volume "
        f"and every non-zero fraction needs one); add volumes or pass --{named}-fraction 0")


def test_one_more_volume_moves_few_others():
    """The split of a set of ids is a ranking by a keyed hash: adding one id (a bad file fixed) moves
    at most two of the others across a split boundary (0.3 on average here), where the seeded
    shuffle of the sorted ids it replaces moved 10 on average and up to 43."""
    moved = []
    for seed in range(20):
        for n in (5, 21, 60, 131):
            ids = [f"volume-{i}" for i in range(n + 1)]
            extra = ids.pop(int(np.random.default_rng(seed).integers(n + 1)))
            before = discovery.assign_splits(ids, 0.1, 0.1, seed)
            after = discovery.assign_splits(ids + [extra], 0.1, 0.1, seed)
            moved.append(sum(before[v] != after[v] for v in ids))
    assert max(moved) <= 2 and np.mean(moved) < 0.5, moved


def test_ids_are_ascii_digits_only():
    root = "/data"
    files = ["/data/volume-16.nii.gz", "/data/segmentation-16.nii.gz",
             "/data/volume-\u0661\u0666.nii.gz", "/data/segmentation-\u0661\u0666.nii.gz",  # Arabic-Indic 16
             "/data/images/volume-\u0967_slice_2.jpg"]  # Devanagari 1
    pairs, failed = discovery.find_nifti_pairs(files, root)
    assert pairs == {"volume-16": (files[0], files[1])} and failed == []  # no second "volume-16"
    series, failed = discovery.find_image_series(files, root)
    assert series == {} and failed == []
    reasons = {f["input"]: f["reason"] for f in discovery.non_ascii_ids(files, root)}
    assert set(reasons) == set(files[2:])
    assert reasons[files[2]] == ("its number is not written in ASCII digits 0-9; rename it (e.g. volume-16.nii.gz) "
                                 "or move it out of the input")


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
    pairs, failed = discovery.find_nifti_pairs(files, root)
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
    series, failed = discovery.find_image_series(files, root)
    assert series == {"volume-7": [(3, files[0], files[1]), (10, files[2], files[3])]}
    assert failed == [{"input": files[4], "reason": "no mask volume-8_slice_0_mask.* under masks/"}]
