"""Evaluation: pairing, geometry checks, aggregates against direct computation, outputs, the workflow."""

import copy
import csv
import io
import json
import os
import shutil

import numpy as np
import pytest

from conftest import make_bucket, run_workflow, upload_tree
from lits.evaluate import evaluation, lesions
from lits.core import metrics, storage, volumes
from lits.core.config import EvaluateConfig


def test_case_keys():
    assert evaluation.case_key("s3://b/x/volume-3_seg.nii.gz") == "3"
    assert evaluation.case_key("/d/segmentation-03.nii") == "3"
    assert evaluation.case_key("/d/sub/patient7_seg.nii.gz") == "patient7"
    assert evaluation.case_key("/d/patient7.nii.gz") == "patient7"
    assert evaluation.case_key("/d/volume-3.json") is None


def _labels(path):
    data, geometry = volumes.read_nifti(str(path))
    return volumes.as_labels(data, str(path)), geometry


@pytest.fixture
def folders(nifti_dir, tmp_path):
    """pred/: case 0 perfect, case 1 with its tumour removed and liver eroded, case 2 on a shifted
    grid, case 5 without a reference; ref/: segmentations 0-3 (3 without a prediction)."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    for i in range(4):
        shutil.copy(os.path.join(nifti_dir, f"segmentation-{i}.nii.gz"), ref / f"segmentation-{i}.nii.gz")
    shutil.copy(os.path.join(nifti_dir, "segmentation-0.nii.gz"), pred / "volume-0_seg.nii.gz")
    labels, geometry = _labels(ref / "segmentation-1.nii.gz")
    worse = np.where(labels == 2, 1, labels).astype(np.uint8)
    worse[:, :, ::4] = 0
    volumes.write_nifti(str(pred / "volume-1_seg.nii.gz"), worse, geometry.affine_array)
    labels2, geometry2 = _labels(ref / "segmentation-2.nii.gz")
    shifted = geometry2.affine_array.copy()
    shifted[:3, 3] += 5.0
    volumes.write_nifti(str(pred / "volume-2_seg.nii.gz"), labels2, shifted)
    shutil.copy(os.path.join(nifti_dir, "segmentation-5.nii.gz"), pred / "volume-5_seg.nii.gz")
    return {"ref": ref, "pred": pred, "images": nifti_dir, "worse": worse}


def test_tumour_dice_over_the_cases_that_hold_tumour(folders, tmp_path):
    """A case without tumour that predicts none scores tumour Dice 1 (the LiTS rule), lifting the per-case
    mean; the mean over the cases that hold tumour leaves it out."""
    ref, pred = tmp_path / "healthy-ref", tmp_path / "healthy-pred"
    ref.mkdir()
    pred.mkdir()
    labels, geometry = _labels(folders["ref"] / "segmentation-0.nii.gz")
    healthy = np.where(labels == 2, 1, labels).astype(np.uint8)
    for folder, name in ((ref, "segmentation-0.nii.gz"), (pred, "volume-0_seg.nii.gz")):
        volumes.write_nifti(str(folder / name), healthy, geometry.affine_array)
    shutil.copy(folders["ref"] / "segmentation-1.nii.gz", ref / "segmentation-1.nii.gz")
    shutil.copy(folders["pred"] / "volume-1_seg.nii.gz", pred / "volume-1_seg.nii.gz")  # its tumour removed
    summary = evaluation.evaluate(EvaluateConfig(pred=str(pred), ref=str(ref), output=str(tmp_path / "eval"), local=True))
    tumour = summary["aggregate"]["tumour"]
    assert tumour["dice_per_case"] == pytest.approx(0.5) and tumour["dice_per_case_present"] == 0.0
    assert "cases that hold tumour is 0.0000" in (tmp_path / "eval" / "report.md").read_text()


def test_pairing_lists_unmatched_files(folders):
    found = evaluation.pair_files(str(folders["pred"]), str(folders["ref"]), str(folders["images"]))
    assert [p[0] for p in found["pairs"]] == ["0", "1", "2"]
    assert all(os.path.basename(p[3]).startswith("volume-") for p in found["pairs"])
    assert [os.path.basename(u) for u in found["unmatched_pred"]] == ["volume-5_seg.nii.gz"]
    assert [os.path.basename(u) for u in found["unmatched_ref"]] == ["segmentation-3.nii.gz"]


def test_evaluate_writes_exact_metrics_and_pictures(folders, tmp_path):
    out = tmp_path / "eval"
    summary = evaluation.evaluate(EvaluateConfig(pred=str(folders["pred"]), ref=str(folders["ref"]), output=str(out),
                                                 images=str(folders["images"]), local=True))
    assert summary["cases_evaluated"] == 2
    assert [f["case"] for f in summary["failed"]] == ["2"] and "geometry mismatch" in summary["failed"][0]["reason"]
    rows = list(csv.DictReader(io.StringIO((out / "metrics.csv").read_text())))
    assert [r["case"] for r in rows] == ["0", "1", "2"]
    assert float(rows[0]["liver_dice"]) == 1.0 and float(rows[0]["tumour_assd"]) == 0.0
    # case 1 against a direct computation of the same metrics
    ref, geometry = _labels(folders["ref"] / "segmentation-1.nii.gz")
    direct = metrics.volume_metrics(folders["worse"], ref, geometry.spacing, axial_axis=geometry.axial_axis)
    assert float(rows[1]["liver_dice"]) == pytest.approx(direct["liver"]["dice"])
    assert float(rows[1]["liver_assd"]) == pytest.approx(direct["liver"]["assd"])
    assert float(rows[1]["tumour_dice"]) == 0.0 and direct["tumour"]["ref_voxels"] > 0
    agg = summary["aggregate"]
    assert agg["liver"]["dice_per_case"] == pytest.approx((1.0 + direct["liver"]["dice"]) / 2)
    ref0, _ = _labels(folders["ref"] / "segmentation-0.nii.gz")
    inter = np.count_nonzero(ref0 >= 1) + direct["liver"]["intersection"]
    size = 2 * np.count_nonzero(ref0 >= 1) + direct["liver"]["pred_voxels"] + direct["liver"]["ref_voxels"]
    assert agg["liver"]["dice_global"] == pytest.approx(2 * inter / size)
    # every lesion of case 0 is found, none of case 1's
    lesions0 = metrics.lesion_detection(ref0 == 2, ref0 == 2)["ref_lesions"]
    assert agg["lesions"]["recall"] == pytest.approx(lesions0 / (lesions0 + direct["tumour"]["ref_lesions"]))
    assert agg["tumour"]["distance_undefined_cases"] == 1  # case 1 predicts no tumour
    # by size: case 0's lesions all found by identical predictions, case 1's all missed, no prediction
    by0 = metrics.lesion_detection_by_size(ref0 == 2, ref0 == 2, _labels(folders["ref"] / "segmentation-0.nii.gz")[1].spacing)
    by_size = {b["bucket"]: b for b in agg["lesions_by_size"]["buckets"]}
    for key, _ in metrics.SIZE_BUCKETS:
        n0, n1 = by0["buckets"][key]["ref_lesions"], direct["tumour"]["lesions_by_size"][key]["ref_lesions"]
        assert (by_size[key]["ref_lesions"], by_size[key]["ref_detected"], by_size[key]["pred_lesions"],
                by_size[key]["pred_correct"]) == (n0 + n1, n0, n0, n0), key
        assert by_size[key]["recall"] == (n0 / (n0 + n1) if n0 + n1 else None), key
    assert by_size["all"]["ref_lesions"] == lesions0 + direct["tumour"]["ref_lesions"] and lesions0 > 0
    assert by_size["all"]["recall"] == pytest.approx(agg["lesions"]["recall"])
    assert agg["lesions_by_size"]["fp_lesions_per_volume"] == 0.0
    assert agg["lesions_by_size"]["fp_lesions_per_case"] == {"0": 0, "1": 0}
    assert int(rows[1]["lesions_lt10_ref_lesions"]) == direct["tumour"]["lesions_by_size"]["lt10"]["ref_lesions"]
    # overlays: both references hold tumour; case 1 (tumour Dice 0) is the worst, case 0 (1.0) the best
    assert summary["overlays"] == {"ranked_by": "tumour_dice", "cases": {"worst": "1", "best": "0"}}
    saved = json.loads((out / "summary.json").read_text())
    assert saved["aggregate"]["liver"]["dice_per_case"] == pytest.approx(agg["liver"]["dice_per_case"])
    report = (out / "report.md").read_text()
    assert "| liver |" in report and "geometry mismatch" in report and "segmentation-3.nii.gz" in report
    assert saved["aggregate"]["lesions_by_size"]["buckets"][-1]["ref_lesions"] == by_size["all"]["ref_lesions"]
    assert "| lesion size | reference lesions | detected | recall | predicted lesions | correct | precision |" in report
    assert (f"| all sizes | {by_size['all']['ref_lesions']} | {lesions0} | {by_size['all']['recall']:.4f} | {lesions0} | "
            f"{lesions0} | 1.0000 |") in report
    assert "False-positive lesions per volume: 0.0000" in report
    assert "Overlays: worst case 1, best case 0; ranked by tumour Dice" in report
    for picture in ("overlays.png", "dice_boxplot.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_pairs_is_one_clear_error(folders, tmp_path):
    from lits.core.errors import UserError

    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="no prediction under .* matches a reference"):
        evaluation.evaluate(EvaluateConfig(pred=str(empty), ref=str(folders["ref"]), local=True))


@pytest.mark.slow
def test_evaluate_workflow_on_ray_and_s3(folders, ray_cluster, s3_server, tmp_path):
    """The endpoint only on the command line (none in the workflow's environment): --s3-endpoint
    reaches the workflow's own storage calls and, in its job's runtime_env, the workers of the
    cluster it joins (whose processes were started without it: conftest.local_ray)."""
    make_bucket(s3_server, "evalb")
    upload_tree(s3_server, str(folders["pred"]), "s3://evalb/pred")
    upload_tree(s3_server, str(folders["ref"]), "s3://evalb/ref")
    proc = run_workflow("evaluate", "--pred", "s3://evalb/pred", "--ref", "s3://evalb/ref", "--output", "s3://evalb/eval",
                        "--address", ray_cluster, "--s3-endpoint", s3_server, unset=storage.ENDPOINT_VARS)
    assert proc.returncode == 1, proc.stderr  # case 2 could not be evaluated
    assert "evaluated 2 case(s)" in proc.stdout and "geometry mismatch" in proc.stdout
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    summary = json.loads(fs.cat_file("evalb/eval/summary.json"))
    assert summary["cases_evaluated"] == 2 and summary["aggregate"]["liver"]["dice_per_case"] < 1.0
    missing = run_workflow("evaluate", "--pred", str(tmp_path / "nope"), "--ref", str(folders["ref"]), "--local")
    assert missing.returncode == 2 and "does not exist" in missing.stderr


# --- one pair, two orientations (issue 26) -----------------------------------------------------------

def predicted_and_reference(rng, shape):
    """uint8 (Z, H, W) labels (prediction, reference): a smooth random liver with tumour inside it
    where a second field peaks; the prediction thresholds the same fields plus smooth noise (close
    to the reference, not equal)."""
    from scipy import ndimage

    def field(sigma):
        f = ndimage.gaussian_filter(rng.random(shape), sigma)
        return (f - f.mean()) / f.std()

    liver_field, tumour_field = field(3), field(2)
    out = []
    for noise in (0.5 * field(2), np.zeros(shape)):
        liver = liver_field + noise > np.quantile(liver_field, 0.75)
        tumour = liver & (tumour_field + noise > np.quantile(tumour_field, 0.9))
        out.append((liver.astype(np.uint8) + tumour).astype(np.uint8))
    return tuple(out)


def test_one_pair_in_two_orientations_has_medpys_metrics_in_both(tmp_path):
    """The same prediction and reference (canonical (Z, H, W) = (20, 30, 36), spacing x 0.7, y 0.8,
    z 2.5 mm) stored axial axis last (LPS: file spacing (0.7, 0.8, 2.5)) and axial axis first
    (SPL: (2.5, 0.8, 0.7)): every metric agrees between the two files, and each equals medpy's on
    that file's array with that file's spacing."""
    import medpy.metric.binary as medpy

    rng = np.random.default_rng(26)
    pred_zhw, ref_zhw = predicted_and_reference(rng, (20, 30, 36))
    stored = {
        # file axes i, j, k = L, P, S: (W, H, Z); RAS columns of the affine (L is -x, P is -y)
        "LPS": (np.array([[-0.7, 0, 0, 10], [0, -0.8, 0, 20], [0, 0, 2.5, -30], [0, 0, 0, 1]]), (2, 1, 0),
                (0.7, 0.8, 2.5)),
        # file axes i, j, k = S, P, L: (Z, H, W)
        "SPL": (np.array([[0, 0, -0.7, 10], [0, -0.8, 0, 20], [2.5, 0, 0, -30], [0, 0, 0, 1]]), (0, 1, 2),
                (2.5, 0.8, 0.7)),
    }
    rows = {}
    for axcodes, (affine, axes, spacing) in stored.items():
        pred, ref = pred_zhw.transpose(axes), ref_zhw.transpose(axes)
        geometry = volumes.Geometry.from_affine(affine, ref.shape)
        assert geometry.axcodes == axcodes and geometry.spacing == pytest.approx(spacing)
        assert geometry.canonical_spacing == pytest.approx((0.7, 0.8, 2.5))
        pred_uri, ref_uri = str(tmp_path / f"{axcodes}_seg.nii.gz"), str(tmp_path / f"{axcodes}.nii.gz")
        volumes.write_nifti(pred_uri, pred, affine)
        volumes.write_nifti(ref_uri, ref, affine)
        spacing = volumes.read_nifti(ref_uri)[1].spacing  # as stored: the header's float32
        row = evaluation.evaluate_pair(axcodes, pred_uri, ref_uri)
        assert "error" not in row, row.get("error")
        rows[axcodes] = row
        for name, c in (("liver", 1), ("tumour", 2)):
            p, r = (pred >= c, ref >= c) if c == 1 else (pred == c, ref == c)
            assert p.any() and r.any() and not np.array_equal(p, r)
            assert row[f"{name}_dice"] == pytest.approx(medpy.dc(p, r), rel=1e-12)
            assert row[f"{name}_jaccard"] == pytest.approx(medpy.jc(p, r), rel=1e-12)
            assert row[f"{name}_rvd"] == pytest.approx(medpy.ravd(p, r), rel=1e-12)
            assert row[f"{name}_assd"] == pytest.approx(medpy.assd(p, r, voxelspacing=spacing), rel=1e-9)
            assert row[f"{name}_mssd"] == pytest.approx(medpy.hd(p, r, voxelspacing=spacing), rel=1e-9)
            surface_distances = getattr(medpy, "__surface_distances")  # medpy's own; LiTS pools both ways
            pooled = np.concatenate([surface_distances(p, r, spacing), surface_distances(r, p, spacing)])
            assert row[f"{name}_rmsd"] == pytest.approx(np.sqrt(np.mean(pooled ** 2)), rel=1e-9)
            assert row[f"{name}_ref_ml"] == pytest.approx(r.sum() * 0.7 * 0.8 * 2.5 / 1000, rel=1e-6)
    # the spacing's order matters on this pair: the (Z, H, W) array with (x, y, z) spacing is far off
    p, r = pred_zhw >= 1, ref_zhw >= 1
    assert medpy.assd(p, r, voxelspacing=(0.7, 0.8, 2.5)) != pytest.approx(rows["SPL"]["liver_assd"], rel=0.05)
    lps, spl = rows["LPS"], rows["SPL"]
    numbers = [k for k, v in lps.items() if isinstance(v, (int, float)) and k != "seconds"]
    assert len(numbers) > 30
    for k in numbers:
        assert spl[k] == pytest.approx(lps[k], rel=1e-9), k


# --- predictions and references as DICOM-SEG (issue 22) ------------------------------------------------

def test_dicom_seg_predictions_and_references_score_as_their_nifti(tmp_path):
    """A prediction written as DICOM-SEG (empty end slices omitted: a shorter grid) against a NIfTI
    reference stored with its rows reversed (another voxel order, same world grid), and a NIfTI
    prediction against a SEG reference, score exactly as the NIfTI pair on the series' grid; a SEG
    of a series 0.3 mm off (0.7 mm columns) is a geometry mismatch."""
    from lits.core import dicom_seg
    from test_dicom_seg import read_series, write_series

    datasets, geometry = read_series(write_series(str(tmp_path / "series"), shape=(30, 36, 12),
                                                   orientation=(-1, 0, 0, 0, 1, 0), reverse_files=True))
    pred, ref = predicted_and_reference(np.random.default_rng(22), geometry.shape)
    pred[:, :, :2] = pred[:, :, -1:] = 0
    affine = geometry.affine_array
    rows_reversed = affine @ np.array([[1, 0, 0, 0], [0, -1, 0, geometry.shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]])
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    volumes.write_nifti(str(tmp_path / "pred.nii.gz"), pred, affine)
    volumes.write_nifti(str(tmp_path / "ref.nii.gz"), ref, affine)
    storage.write_bytes(str(pred_dir / "volume-7_seg.dcm"), dicom_seg.seg_bytes(pred, datasets, model_id="m"))
    volumes.write_nifti(str(ref_dir / "segmentation-7.nii.gz"), ref[:, ::-1, :], rows_reversed)
    volumes.write_nifti(str(pred_dir / "volume-8_seg.nii.gz"), pred, affine)
    storage.write_bytes(str(ref_dir / "segmentation-8.dcm"), dicom_seg.seg_bytes(ref, datasets, model_id="reader"))
    shifted = [copy.deepcopy(ds) for ds in datasets]
    for ds in shifted:
        ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]) + 0.3] + list(ds.ImagePositionPatient[1:])
    storage.write_bytes(str(pred_dir / "volume-9_seg.dcm"), dicom_seg.seg_bytes(pred, shifted, model_id="m"))
    volumes.write_nifti(str(ref_dir / "segmentation-9.nii.gz"), ref, affine)

    nifti = evaluation.evaluate_pair("0", str(tmp_path / "pred.nii.gz"), str(tmp_path / "ref.nii.gz"))
    assert 0.5 < nifti["liver_dice"] < 1 and 0 < nifti["tumour_dice"] < 1 and nifti["liver_pred_voxels"] > 1000
    images = tmp_path / "images"  # a CT slice named like case 7 is no picture's image (pictures read NIfTI)
    images.mkdir()
    shutil.copy(tmp_path / "series" / "IM0000", images / "7.dcm")
    volumes.write_nifti(str(images / "volume-8.nii.gz"), ref.astype(np.int16), affine)
    found = evaluation.pair_files(str(pred_dir), str(ref_dir), str(images))
    assert [(k, os.path.basename(p), os.path.basename(r), img and os.path.basename(img)) for k, p, r, img in
            found["pairs"]] == [("7", "volume-7_seg.dcm", "segmentation-7.nii.gz", None),
                                ("8", "volume-8_seg.nii.gz", "segmentation-8.dcm", "volume-8.nii.gz"),
                                ("9", "volume-9_seg.dcm", "segmentation-9.nii.gz", None)]
    out = tmp_path / "eval"
    summary = evaluation.evaluate(EvaluateConfig(pred=str(pred_dir), ref=str(ref_dir), output=str(out),
                                                 images=str(images), local=True))
    assert summary["cases_evaluated"] == 2 and [f["case"] for f in summary["failed"]] == ["9"]
    assert "geometry mismatch: its voxels lie up to 0.3 mm off" in summary["failed"][0]["reason"]
    rows = {r["case"]: r for r in csv.DictReader(io.StringIO((out / "metrics.csv").read_text()))}
    numbers = [k for k, v in nifti.items() if isinstance(v, (int, float)) and k != "seconds"]
    assert len(numbers) > 30
    for case, rel in (("7", 1e-9), ("8", 1e-6)):  # 8: the SEG reference's spacing, not the NIfTI's float32
        for k in numbers:
            assert float(rows[case][k]) == pytest.approx(nifti[k], rel=rel, abs=1e-12), (case, k)
    assert (out / "overlays.png").read_bytes()[:4] == b"\x89PNG"


# --- lesion detection by size, overlays' ranking (issue 23) -------------------------------------------

def _lesion_row(case, fp, **buckets):
    """A metrics.csv row's lesion columns: buckets {key: (ref, detected, pred, correct)}, others 0."""
    row = {"case": case, "tumour_fp_lesions": fp}
    for key, _ in metrics.SIZE_BUCKETS:
        for field, n in zip(metrics.DETECTION_COUNTS, buckets.get(key, (0, 0, 0, 0))):
            row[lesions.column(key, field)] = n
    return row


def test_lesion_aggregate_sums_counts_then_takes_ratios():
    # case a: one small lesion found, 2 FPs; case b: three small lesions missed, one 10-20 mm found
    rows = [_lesion_row("a", 2, lt10=(1, 1, 3, 1)), _lesion_row("b", 0, lt10=(3, 0, 0, 0), **{"10to20": (1, 1, 1, 1)})]
    agg = lesions.aggregate(rows)
    b = {x["bucket"]: x for x in agg["buckets"]}
    assert [x["bucket"] for x in agg["buckets"]] == ["lt10", "10to20", "gt20", "all"]
    assert b["lt10"] == {"bucket": "lt10", "label": "< 10 mm", "ref_lesions": 4, "ref_detected": 1, "recall": 0.25,
                         "pred_lesions": 3, "pred_correct": 1, "precision": pytest.approx(1 / 3)}  # not (1 + 0) / 2
    assert b["10to20"]["recall"] == 1.0 and b["10to20"]["precision"] == 1.0
    assert b["gt20"]["recall"] is None and b["gt20"]["precision"] is None
    assert (b["all"]["ref_lesions"], b["all"]["ref_detected"], b["all"]["pred_lesions"], b["all"]["pred_correct"]) == (5, 2, 4, 2)
    assert agg["fp_lesions_per_volume"] == 1.0 and agg["fp_lesions_per_case"] == {"a": 2, "b": 0}
    table = lesions.table_md(agg)
    assert "| < 10 mm | 4 | 1 | 0.2500 | 3 | 1 | 0.3333 |" in table
    assert "| > 20 mm | 0 | 0 | - | 0 | 0 | - |" in table
    assert lesions.aggregate([])["fp_lesions_per_volume"] is None


def _dice_row(case, liver, tumour, ref_tumour_voxels):
    return {"case": case, "liver_dice": liver, "tumour_dice": tumour, "tumour_ref_voxels": ref_tumour_voxels}


def test_overlays_rank_cases_with_tumour_by_tumour_dice():
    rows = [_dice_row("good-liver-bad-tumour", 0.99, 0.10, 500),
            _dice_row("mid", 0.95, 0.60, 300),
            _dice_row("bad-liver-good-tumour", 0.80, 0.90, 200),
            _dice_row("no-tumour", 0.50, 1.00, 0),       # lowest liver Dice, no tumour: not in the ranking
            {"case": "broken", "error": "geometry mismatch"}]
    picks = evaluation.pick_cases(rows)
    assert [(label, r["case"]) for label, r in picks] == [
        ("worst", "good-liver-bad-tumour"), ("median", "mid"), ("best", "bad-liver-good-tumour")]
    assert evaluation.rank_for_overlays(rows)[0] == "tumour_dice"
    # without tumour in any reference: by liver Dice
    plain = [_dice_row("a", 0.9, 1.0, 0), _dice_row("b", 0.7, 1.0, 0), _dice_row("c", 0.95, 0.0, 0)]
    assert evaluation.rank_for_overlays(plain)[0] == "liver_dice"
    assert [(label, r["case"]) for label, r in evaluation.pick_cases(plain)] == [("worst", "b"), ("median", "a"), ("best", "c")]
    assert evaluation.pick_cases([{"case": "x", "error": "e"}]) == []
