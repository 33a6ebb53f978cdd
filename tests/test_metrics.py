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


def test_lesion_diameters_use_the_spacing_and_bucket_edges():
    # d = (6 V / pi) ** (1/3): 64 voxels of 1 mm^3 -> 4.9628 mm; of 5 x 2 x 2 mm -> 13.4711; of 5 x 4 x 4 -> 21.3841
    d = metrics.lesion_diameters(np.array([64, 64, 64]), (1.0, 1.0, 1.0))
    assert d == pytest.approx([4.9628] * 3, abs=1e-4)
    assert metrics.lesion_diameters(np.array([64]), (5.0, 2.0, 2.0))[0] == pytest.approx(13.4711, abs=1e-4)
    assert metrics.lesion_diameters(np.array([64]), (4.0, 5.0, 4.0))[0] == pytest.approx(21.3841, abs=1e-4)
    assert [metrics.size_bucket(x) for x in (9.999, 10.0, 20.0, 20.001)] == ["lt10", "10to20", "10to20", "gt20"]
    one = cube((12, 12, 12), (2, 2, 2), 4)  # one 64-voxel lesion, found: its bucket moves with the spacing
    for spacing, key in (((1.0, 1.0, 1.0), "lt10"), ((5.0, 2.0, 2.0), "10to20"), ((4.0, 5.0, 4.0), "gt20")):
        b = metrics.lesion_detection_by_size(one, one, spacing)["buckets"]
        assert b[key] == {"ref_lesions": 1, "ref_detected": 1, "pred_lesions": 1, "pred_correct": 1,
                          "recall": 1.0, "precision": 1.0}, spacing
        assert all(b[k]["ref_lesions"] == 0 and b[k]["recall"] is None for k in b if k != key)


def _lesion_scene():
    """(pred, ref) boolean (24, 40, 40); at spacing (3, 1, 1) mm (3 mm^3 voxels):
    L1 ref 10x14x14 = 1960 voxels (d 22.39 mm), predicted exactly;
    M1 ref 3x6x6 = 108 (d 8.52) and M2 ref 2x3x3 = 18 (d 4.69), merged by one prediction
        3x6x11 = 198 (d 10.43): IoU with M1 108/198 > 0.5 (detected), with M2 18/198 (missed),
        with M1 + M2 126/198 > 0.5 (the prediction is correct);
    L2 ref 4x8x8 = 256 (d 11.36), missed: the one prediction inside it, 2x2x2 = 8 (d 3.58), has IoU
        8/256 (a false positive that touches a reference lesion);
    FP a predicted 2x2x2 = 8 (d 3.58) touching no reference."""
    shape = (24, 40, 40)
    ref, pred = np.zeros(shape, bool), np.zeros(shape, bool)
    ref[0:10, 0:14, 0:14] = pred[0:10, 0:14, 0:14] = True   # L1
    ref[12:15, 20:26, 0:6] = True                            # M1
    ref[12:14, 20:23, 8:11] = True                           # M2
    pred[12:15, 20:26, 0:11] = True                          # merges M1 and M2
    ref[0:4, 20:28, 20:28] = True                            # L2
    pred[1:3, 23:25, 23:25] = True                           # inside L2: too small to detect it
    pred[18:20, 30:32, 30:32] = True                         # FP
    return pred, ref


def test_lesion_detection_by_size_hand_computed():
    pred, ref = _lesion_scene()
    d = metrics.lesion_detection_by_size(pred, ref, (3.0, 1.0, 1.0))
    assert (d["ref_lesions"], d["ref_detected"], d["pred_lesions"], d["pred_correct"], d["fp_lesions"]) == (4, 2, 4, 2, 2)
    assert d["buckets"] == {
        "lt10": {"ref_lesions": 2, "ref_detected": 1, "recall": 0.5, "pred_lesions": 2, "pred_correct": 0, "precision": 0.0},
        "10to20": {"ref_lesions": 1, "ref_detected": 0, "recall": 0.0, "pred_lesions": 1, "pred_correct": 1,
                   "precision": 1.0},
        "gt20": {"ref_lesions": 1, "ref_detected": 1, "recall": 1.0, "pred_lesions": 1, "pred_correct": 1,
                 "precision": 1.0},
    }
    # the totals are lesion_detection's
    assert metrics.lesion_detection(pred, ref) == {k: d[k] for k in metrics.DETECTION_COUNTS}
    # 1 mm isotropic: L1 is 15.53 mm, L2 7.88, the merging prediction 7.23; nothing above 20 mm
    iso = metrics.lesion_detection_by_size(pred, ref, (1.0, 1.0, 1.0))["buckets"]
    assert {k: (b["ref_lesions"], b["ref_detected"], b["pred_lesions"], b["pred_correct"]) for k, b in iso.items()} == {
        "lt10": (3, 1, 3, 1), "10to20": (1, 1, 1, 1), "gt20": (0, 0, 0, 0)}
    assert iso["gt20"]["recall"] is None and iso["gt20"]["precision"] is None
    assert iso["lt10"]["recall"] == pytest.approx(1 / 3) and iso["lt10"]["precision"] == pytest.approx(1 / 3)


def test_lesion_detection_by_size_empty_cases():
    empty = np.zeros((8, 8, 8), bool)
    lesion = cube(empty.shape, (2, 2, 2), 3)   # 27 voxels of 2 mm^3: d (6 * 54 / pi)^(1/3) = 4.69 mm
    both = metrics.lesion_detection_by_size(empty, empty, (2.0, 1.0, 1.0))
    assert both["fp_lesions"] == 0 and both["ref_lesions"] == 0 and both["pred_lesions"] == 0
    assert all(b == {"ref_lesions": 0, "ref_detected": 0, "recall": None, "pred_lesions": 0, "pred_correct": 0,
                     "precision": None} for b in both["buckets"].values())
    false_alarm = metrics.lesion_detection_by_size(lesion, empty, (2.0, 1.0, 1.0))
    assert false_alarm["fp_lesions"] == 1 and false_alarm["buckets"]["lt10"]["precision"] == 0.0
    assert false_alarm["buckets"]["lt10"]["recall"] is None
    missed = metrics.lesion_detection_by_size(empty, lesion, (2.0, 1.0, 1.0))
    assert missed["fp_lesions"] == 0 and missed["buckets"]["lt10"]["recall"] == 0.0
    assert missed["buckets"]["lt10"]["precision"] is None


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
    # the 8-voxel lesion at 0.64 mm^3 per voxel: d = (6 * 5.12 / pi)^(1/3) = 2.14 mm, missed
    assert m["tumour"]["lesions_by_size"]["lt10"]["recall"] == 0.0 and m["tumour"]["fp_lesions"] == 0
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
