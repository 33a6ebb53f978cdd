"""DICOM series in a bulk job (issue 22, items 1, 3, 4): the listing finds CT series beside NIfTI
volumes and says what it left out and why; a series is segmented into a NIfTI mask on its own grid,
a DICOM-SEG that says the same, a preview and a report that names it by UIDs, never by patient;
it is skipped only when the same model saw the same files.

Real files (TotalSegmentator's JPEG 2000 series in tests/data, series written with pydicom), the
job's own listing and volume functions, a tiny random U-Net in this process; no Ray."""

import json
import os
import shutil

import numpy as np
import pydicom
import pytest

from dicom_factory import write_series
from lits.core import dicom_seg, storage, volumes
from lits.model import inference
from lits.serve import job_inputs, job_tasks
from test_inference import tiny_model

REAL = os.path.join(os.path.dirname(__file__), "data", "dicom-ct-series")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    spec, weights = inference.load_spec(tiny_model(tmp_path_factory.mktemp("model")))
    predictor = inference.Predictor(spec, weights, device="cpu")
    return spec, lambda images: inference.Done(predictor(images))


def archive(root, nifti_dir):
    """An archive as hospitals export it: two patients' CT series in their own folders (one of them
    with a scout and an MR series beside it), a tilted CT series, a stray text file, a NIfTI."""
    write_series(str(root / "p1" / "ct"), shape=(16, 16, 6), series_number=2, file_names=[f"IM{k}" for k in (5, 3, 1, 0, 4, 2)])
    write_series(str(root / "p1" / "ct"), shape=(16, 16, 1), orientation=(1, 0, 0, 0, 0, -1), series_number=1,
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), file_names=["scout"])
    write_series(str(root / "p1" / "mr"), shape=(16, 16, 5), modality="MR")
    write_series(str(root / "p2"), shape=(16, 16, 5), blank_uids=True, file_names=[f"{k}.dcm" for k in range(5)])
    tilted = [(-10.0, -20.0 + 0.5 * k, 30.0 + 2.5 * k) for k in range(5)]
    write_series(str(root / "tilted"), shape=(16, 16, 5), positions=tilted)
    (root / "notes.bin").write_bytes(b"not a dicom file" * 20)
    shutil.copy(os.path.join(nifti_dir, "volume-0.nii.gz"), root / "volume-0.nii.gz")


def test_the_listing_finds_series_beside_nifti_and_says_what_it_left_out(tmp_path, nifti_dir):
    root = tmp_path / "in"
    archive(root, nifti_dir)
    listing = job_inputs.list_inputs(str(root), str(tmp_path / "out"))
    names = sorted(rel for _, rel in listing["volumes"])
    assert names == ["p1/ct", "p2", "volume-0"]
    series = {rel: source for source, rel in listing["volumes"] if rel != "volume-0"}
    assert series["p1/ct"].slices == 6 and series["p2"].slices == 5 and series["p2"].uids_derived
    # slice k was written as the k-th name: in position order, never by name
    assert [os.path.basename(f) for f in series["p1/ct"].files] == [f"IM{k}" for k in (5, 3, 1, 0, 4, 2)]
    [(what, reason)] = listing["refused"]  # the tilted series: one line, naming it and why
    assert what.endswith("tilted") and "tilt" in reason
    reasons = {s.what: s.reason for s in listing["skipped"]}
    assert reasons[str(root / "notes.bin")] == "not a DICOM file"
    assert reasons["mr/series-1"].startswith("modality MR, not CT")
    assert reasons["ct/series-1"].startswith("localizer/scout image")


def test_a_series_gets_a_mask_on_its_grid_a_matching_seg_and_a_report_without_the_patient(tmp_path, model):
    root = tmp_path / "in"
    shutil.copytree(REAL, root / "abdomen")
    [(series, rel)] = job_inputs.list_inputs(str(root), str(tmp_path / "out"))["volumes"]
    result = job_tasks.segment_volume(series, rel, str(tmp_path / "out"), *model, overwrite=False, chunk=8)
    assert result["status"] == "done" and result["name"] == "abdomen" and result["slices"] == 20, result
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["abdomen.json", "abdomen_preview.png", "abdomen_seg.dcm", "abdomen_seg.nii.gz"]
    mask, mask_geometry = volumes.read_nifti(str(out / "abdomen_seg.nii.gz"))
    hu, geometry = job_tasks.dicom.read_series(series)[:2]
    assert mask.shape == hu.shape and np.allclose(mask_geometry.affine_array, geometry.affine_array, atol=1e-4)
    seg_labels, seg_geometry = dicom_seg.read_seg(str(out / "abdomen_seg.dcm"))
    assert np.array_equal(seg_geometry.to_canonical(seg_labels), geometry.to_canonical(mask))
    seg = pydicom.dcmread(str(out / "abdomen_seg.dcm"))
    referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID
                          for f in series.files}
    assert seg.FrameOfReferenceUID == series.frame_of_reference_uid
    report = json.loads((out / "abdomen.json").read_text())
    assert report["dicom"]["series_uid"] == series.series_uid and report["dicom"]["uids_derived"] is True
    assert report["seg"] == str(out / "abdomen_seg.dcm") and report["input_identity"]["count"] == 20


def test_no_patient_identity_reaches_a_report_and_a_replaced_file_is_segmented_again(tmp_path, model):
    root, out = tmp_path / "in", tmp_path / "out"
    paths = write_series(str(root / "case"), shape=(24, 24, 6))
    for p in paths:  # what an identified archive holds
        ds = pydicom.dcmread(p)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "MRN-4711", "19500101"
        ds.save_as(p)
    [(series, rel)] = job_inputs.list_inputs(str(root), str(out))["volumes"]
    first = job_tasks.segment_volume(series, rel, str(out), *model, overwrite=False, chunk=8)
    assert first["status"] == "done", first
    text = (out / "case.json").read_text()
    assert "Doe" not in text and "MRN-4711" not in text and "19500101" not in text
    assert pydicom.dcmread(str(out / "case_seg.dcm")).PatientID == "MRN-4711"  # the SEG belongs to the patient
    again = job_tasks.segment_volume(series, rel, str(out), *model, overwrite=False, chunk=8)
    assert again["status"] == "skipped"
    ds = pydicom.dcmread(paths[2])
    ds.SeriesDescription = "re-sent from the scanner"  # same slice, other bytes
    ds.save_as(paths[2])
    [(series, rel)] = job_inputs.list_inputs(str(root), str(out))["volumes"]
    redo = job_tasks.segment_volume(series, rel, str(out), *model, overwrite=False, chunk=8)
    assert redo["status"] == "done", redo
    assert json.loads((out / "case.json").read_text())["input_identity"] != json.loads(text)["input_identity"]


def test_a_series_that_fails_to_decode_leaves_nothing_under_its_final_names(tmp_path, model):
    root, out = tmp_path / "in", tmp_path / "out"
    paths = write_series(str(root / "case"), shape=(24, 24, 5))
    [(series, rel)] = job_inputs.list_inputs(str(root), str(out))["volumes"]
    with open(paths[3], "r+b") as f:  # truncated after listing: its pixel data is short
        f.truncate(os.path.getsize(paths[3]) - 200)
    result = job_tasks.segment_volume(series, rel, str(out), *model, overwrite=False, chunk=8)
    assert result["status"] == "failed" and "case" in result["reason"], result
    assert not storage.exists(str(out)) or os.listdir(out) == []


def test_liver_agreement_is_measured_in_world_coordinates(tmp_path):
    """TotalSegmentator's liver (stored L-A-S, rows the other way round from the DICOM files) written
    on the series' own grid agrees with itself 1.0 wherever it is stored; the same mask flipped
    front to back on that grid agrees far less; tumour voxels count as liver and as tumour mL."""
    from lits.core import dicom
    from lits.evaluate.agreement import liver_agreement

    ref_uri = os.path.join(os.path.dirname(REAL), "dicom-ct-series-liver.nii.gz")
    ref, ref_geometry = volumes.read_nifti(ref_uri)
    [series], _ = dicom.discover_series(REAL)
    geometry = dicom.read_series(series)[1]
    assert ref_geometry.axcodes != geometry.axcodes  # the two files store the voxels differently
    on_series = geometry.from_canonical(ref_geometry.to_canonical(ref)).astype(np.uint8)
    on_series[on_series > 0] = 1
    liver = np.argwhere(on_series == 1)
    centre = tuple(liver[len(liver) // 2])
    tumour = tuple(slice(c - 2, c + 3) for c in centre)  # 5 x 5 x 5 voxels inside the liver
    on_series[tumour] = 2
    volumes.write_nifti(str(tmp_path / "pred.nii.gz"), on_series, geometry.affine_array)
    same = liver_agreement(str(tmp_path / "pred.nii.gz"), ref_uri)
    voxel_ml = float(np.prod(geometry.spacing)) / 1000
    assert same["liver_dice"] == 1.0 and same["pred_lesions"] == 1
    assert same["pred_tumour_ml"] == round(125 * voxel_ml, 2) and same["ref_liver_ml"] == same["pred_liver_ml"] > 500
    volumes.write_nifti(str(tmp_path / "flipped.nii.gz"), on_series[:, ::-1].copy(), geometry.affine_array)
    assert liver_agreement(str(tmp_path / "flipped.nii.gz"), ref_uri)["liver_dice"] < 0.6
