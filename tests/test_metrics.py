"""Whole-volume LiTS metrics: hand-built masks with known answers, and medpy as an independent check."""

import math

import numpy as np
import pytest

from lits.core import metrics


def cube(shape, corner, size):
    m = np.zeros(shape, bool)
    m[tuple(slice(c, c + size) for c in corner)] = True
    return m


def test_two_cubes_offset_under_anisotropic_spacing():
    # Two 10-voxel cubes, the prediction shifted by 2 voxels along axis 0 (3 mm voxels).
    spacing = (3.0, 0.5, 0.7)
    ref = cube((30, 30, 30), (5, 5, 5), 10)
    pred = cube((30, 30, 30), (7, 5, 5), 10)
    m = metrics.class_metrics(pred, ref, spacing)
    assert m["dice"] == pytest.approx(2 * 800 / 2000)
    assert m["jaccard"] == pytest.approx(800 / 1200)
    assert m["voe"] == pytest.approx(1 - 800 / 1200)
    assert m["rvd"] == 0.0
    # Hausdorff: the far faces are 2 voxels apart along axis 0 = 6 mm.
    assert m["mssd"] == pytest.approx(6.0)
    # Shifted along axis 0, every surface voxel's nearest surface voxel of the other cube lies
    # 0 or 2 slices away (6 mm) or at 0 mm on the shared side faces: bounded by the extremes.
    assert 0 < m["assd"] < 6.0 and m["assd"] < m["rmsd"] < 6.0


def test_identical_and_empty_masks():
    ref = cube((10, 10, 10), (2, 2, 2), 4)
    same = metrics.class_metrics(ref, ref, (1, 1, 1))
    assert same["dice"] == 1.0 and same["assd"] == 0.0 and same["mssd"] == 0.0 and same["rvd"] == 0.0
    empty = np.zeros_like(ref)
    both = metrics.class_metrics(empty, empty, (1, 1, 1))
    assert both["dice"] == 1.0 and both["jaccard"] == 1.0 and both["assd"] == 0.0 and both["rvd"] == 0.0
    missed = metrics.class_metrics(empty, ref, (1, 1, 1))
    assert missed["dice"] == 0.0 and missed["rvd"] == -1.0 and math.isnan(missed["assd"])
    false_alarm = metrics.class_metrics(ref, empty, (1, 1, 1))
    assert false_alarm["dice"] == 0.0 and math.isnan(false_alarm["rvd"]) and math.isnan(false_alarm["mssd"])


def test_rvd_is_signed_relative_volume_difference():
    ref = cube((10, 10, 10), (0, 0, 0), 4)       # 64 voxels
    pred = cube((10, 10, 10), (0, 0, 0), 5)      # 125 voxels
    assert metrics.class_metrics(pred, ref, (1, 1, 1))["rvd"] == pytest.approx((125 - 64) / 64)


def test_lesion_detection_counts():
    ref = np.zeros((20, 20, 20), bool)
    ref[1:5, 1:5, 1:5] = True          # lesion A: found (same)
    ref[10:14, 10:14, 10:14] = True    # lesion B: predicted too small (IoU 8/64)
    ref[1:3, 15:17, 15:17] = True      # lesion C: missed
    pred = np.zeros_like(ref)
    pred[1:5, 1:5, 1:5] = True
    pred[10:12, 10:12, 10:12] = True
    pred[16:19, 1:4, 1:4] = True       # a false positive
    d = metrics.lesion_detection(pred, ref)
    assert d == {"ref_lesions": 3, "ref_detected": 1, "pred_lesions": 3, "pred_correct": 1}
    # a lesion the model split in two still counts as found
    split = np.zeros_like(ref)
    split[10:14, 10:14, 10:12] = True
    split[10:14, 10:14, 13:14] = True
    d = metrics.lesion_detection(split, ref & cube(ref.shape, (10, 10, 10), 4))
    assert d["ref_detected"] == 1 and d["pred_lesions"] == 2 and d["pred_correct"] == 0


def test_slice_scores_follow_the_original_notebook():
    ref = np.zeros((3, 4, 4), bool)
    pred = np.zeros_like(ref)
    ref[0, :2, :2] = True   # 4 voxels, prediction covers 2
    pred[0, :1, :2] = True
    ref[1, :, :] = True     # 16, prediction empty
    pred[2, 0, 0] = True    # a false positive on a slice without the class
    s = metrics.slice_scores(pred, ref)
    d0 = (2 * 2 + 1) / (2 + 4 + 1)
    d1 = 1 / (16 + 1)
    assert s["slice_dice"] == pytest.approx((d0 + d1) / 2)
    assert s["slice_iou"] == pytest.approx(((2 + 1) / (4 + 1) + 1 / 17) / 2)
    assert s["slice_dice_all"] == pytest.approx((d0 + d1 + 1 / 2) / 3)
    assert s["slices_with_class"] == 2


def test_volume_metrics_follow_lits_label_conventions():
    ref = np.zeros((10, 12, 12), np.uint8)
    ref[2:8, 2:10, 2:10] = 1
    ref[4:6, 4:6, 4:6] = 2
    pred = ref.copy()
    pred[4:6, 4:6, 4:6] = 1   # tumour called liver: liver perfect, tumour missed
    m = metrics.volume_metrics(pred, ref, (1.0, 0.8, 0.8))
    assert m["liver"]["dice"] == 1.0  # tumour counts as liver
    assert m["tumour"]["dice"] == 0.0 and m["tumour"]["ref_lesions"] == 1 and m["tumour"]["ref_detected"] == 0
    assert m["tumour_burden"]["ref"] == pytest.approx(8 / 384) and m["tumour_burden"]["error"] == pytest.approx(-8 / 384)
    with pytest.raises(ValueError, match="differs"):
        metrics.volume_metrics(pred[:5], ref, (1, 1, 1))


@pytest.mark.parametrize("seed", range(4))
def test_surface_distances_match_medpy(seed):
    # medpy is a test dependency (pyproject's `test` extra): without it this fails, it does not skip
    import medpy.metric.binary as medpy
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape = (24, 40, 36)
    spacing = tuple(rng.uniform(0.5, 3.0, 3))

    def blob():
        field = ndimage.gaussian_filter(rng.random(shape), 3)
        return field > np.quantile(field, 0.8)

    pred, ref = blob(), blob()
    ours = metrics.class_metrics(pred, ref, spacing)
    assert ours["mssd"] == pytest.approx(medpy.hd(pred, ref, voxelspacing=spacing), rel=1e-9)
    assert ours["dice"] == pytest.approx(medpy.dc(pred, ref), rel=1e-12)
    assert ours["jaccard"] == pytest.approx(medpy.jc(pred, ref), rel=1e-12)
    assert ours["rvd"] == pytest.approx(medpy.ravd(pred, ref), rel=1e-12)
    # medpy's private surface-distance routine, pooled both ways: LiTS's ASSD and RMSD
    sd = getattr(medpy, "__surface_distances")
    pooled = np.concatenate([sd(pred, ref, spacing), sd(ref, pred, spacing)])
    assert ours["assd"] == pytest.approx(pooled.mean(), rel=1e-9)
    assert ours["rmsd"] == pytest.approx(np.sqrt(np.mean(pooled ** 2)), rel=1e-9)
    assert ours["assd"] == pytest.approx(medpy.assd(pred, ref, voxelspacing=spacing), rel=1e-9)  # medpy 0.5 pools too
    a, b = metrics.surface_distances(pred, ref, spacing)
    assert a.mean() == pytest.approx(medpy.asd(pred, ref, voxelspacing=spacing), rel=1e-9)
    assert b.mean() == pytest.approx(medpy.asd(ref, pred, voxelspacing=spacing), rel=1e-9)
