"""DICOM-SEG out and in (lits.core.dicom_seg): frames, references, codes and UIDs of what is written,
checked with highdicom and against the same labels as NIfTI; read_seg back onto the series' grid, for
synthetic series (axial, files in reverse order, oblique and flipped) and the real CT series."""

from __future__ import annotations

import io
import os

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from lits.core import dicom, dicom_seg, volumes
from lits.core.errors import BadInputError

TESTDATA = [os.path.join(os.path.dirname(__file__), "data"), os.path.join(os.path.dirname(__file__), "..", "..",
                                                                           "shared", "testdata")]
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
TILT = np.deg2rad(15)
ORIENTATIONS = {  # ImageOrientationPatient: row direction, column direction
    "axial": (1, 0, 0, 0, 1, 0),
    "oblique": (1, 0, 0, 0, np.cos(TILT), -np.sin(TILT)),
    "flipped": (-1, 0, 0, 0, 1, 0),  # normal -z: slices ascend along the normal towards the feet
}


def write_series(folder, shape=(12, 10, 7), spacing=(0.8, 0.7, 2.5), orientation=(1, 0, 0, 0, 1, 0),
                 position0=(10.0, -20.0, -30.0), reverse_files=False):
    """One slice per file (rows, columns, slices = `shape`; spacing (row mm, column mm, slice mm));
    slice k at position0 + k * spacing[2] * normal. reverse_files: the files and instance numbers
    run against the slices' order. Returns the paths."""
    rows, cols, slices = shape
    iop = np.asarray(orientation, float)
    normal = np.cross(iop[:3], iop[3:])
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    os.makedirs(folder, exist_ok=True)
    paths = []
    for k in range(slices):
        n = slices - 1 - k if reverse_files else k
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = os.path.join(folder, f"IM{n:04d}")
        ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientName, ds.PatientID, ds.SeriesNumber, ds.InstanceNumber = "CT", "Doe^J", "P7", 3, n + 1
        ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime = "19700101", "O", "20260101", "120000"
        ds.AccessionNumber, ds.StudyID = "", "1"
        ds.ImagePositionPatient = [float(v) for v in np.asarray(position0) + k * spacing[2] * normal]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.PixelSpacing, ds.SliceThickness = [spacing[0], spacing[1]], spacing[2]
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.zeros((rows, cols), np.int16).tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def read_series(paths):
    """(datasets in k order, Geometry) as lits.core.dicom reads the series, its geometry checked
    against `expected_geometry`."""
    _, geometry, datasets = dicom.read_series_bytes({os.path.basename(p): open(p, "rb").read() for p in paths}, "series")
    expected = expected_geometry(paths)[1]
    assert geometry.shape == expected.shape and np.abs(geometry.affine_array - expected.affine_array).max() < 1e-9
    return datasets, geometry


def expected_geometry(paths):
    """(datasets sorted along the normal, Geometry: (column, row, slice) -> RAS+ mm) computed here
    from the headers, blank UIDs filled from the file meta."""
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    for ds in datasets:
        ds.SOPInstanceUID = ds.SOPInstanceUID or ds.file_meta.MediaStorageSOPInstanceUID
        ds.SOPClassUID = ds.SOPClassUID or ds.file_meta.MediaStorageSOPClassUID
        ds.SeriesInstanceUID = ds.SeriesInstanceUID or generate_uid(entropy_srcs=[str(ds.FrameOfReferenceUID), "series"])
        ds.StudyInstanceUID = ds.StudyInstanceUID or generate_uid(entropy_srcs=[str(ds.FrameOfReferenceUID), "study"])
    iop = np.array(datasets[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    datasets.sort(key=lambda ds: float(np.dot(np.array(ds.ImagePositionPatient, float), normal)))
    first, last = (np.array(d.ImagePositionPatient, float) for d in (datasets[0], datasets[-1]))
    row_mm, col_mm = (float(v) for v in datasets[0].PixelSpacing)
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1] = iop[:3] * col_mm, iop[3:] * row_mm
    affine[:3, 2], affine[:3, 3] = (last - first) / (len(datasets) - 1), first
    shape = (int(datasets[0].Columns), int(datasets[0].Rows), len(datasets))
    return datasets, volumes.Geometry.from_affine(LPS_TO_RAS @ affine, shape)


def blobs(shape, seed):
    """uint8 (I, J, K) labels: an off-centre liver ellipsoid with a tumour inside it, asymmetric in
    every axis (a flip or transpose cannot match), empty first and last slices."""
    i, j, k = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    labels = (((i - 0.15) / 0.7) ** 2 + ((j + 0.1) / 0.55) ** 2 + (k / 0.6) ** 2 < 1).astype(np.uint8)
    labels[((i - 0.35) ** 2 + (j + 0.2) ** 2 + (k - 0.2) ** 2 < 0.08) & (labels == 1)] = 2
    labels[np.random.default_rng(seed).random(shape) < 0.02] = 0
    return labels


@pytest.fixture(params=["axial", "reversed", "oblique", "flipped"])
def series(request, tmp_path):
    kind = request.param
    paths = write_series(str(tmp_path / kind), orientation=ORIENTATIONS.get(kind, ORIENTATIONS["axial"]),
                         reverse_files=kind == "reversed")
    datasets, geometry = read_series(paths)
    return datasets, geometry, blobs(geometry.shape, seed=len(kind))


def frames_on_source_grid(seg, datasets):
    """uint8 (I, J, K, 2): segment s's frames placed by their referenced source instance; also
    each frame's ImagePositionPatient against its source slice's."""
    k_of = {str(ds.SOPInstanceUID): k for k, ds in enumerate(datasets)}
    out = np.zeros((int(seg.Columns), int(seg.Rows), len(datasets), 2), np.uint8)
    pixels = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        source = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = k_of[str(source)]
        position = item.PlanePositionSequence[0].ImagePositionPatient
        assert np.allclose(np.array(position, float), np.array(datasets[k].ImagePositionPatient, float), atol=1e-4)
        out[:, :, k, int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber) - 1] = frame.T
    return out


def test_seg_frames_references_and_codes(series):
    datasets, geometry, labels = series
    data = dicom_seg.seg_bytes(labels, datasets, model_id="sha256-0123abcd", version="1.2.3")
    seg = hd.seg.segread(io.BytesIO(data))
    # each frame on the slice it references equals the NIfTI mask of the same labels, in canonical layout
    nifti, nifti_geometry = volumes.parse_nifti(volumes.nifti_bytes(labels, geometry.affine_array))
    frames = frames_on_source_grid(seg, datasets)
    assert np.array_equal(nifti_geometry.to_canonical(nifti == 1), geometry.to_canonical(frames[..., 0] == 1))
    assert np.array_equal(nifti_geometry.to_canonical(nifti == 2), geometry.to_canonical(frames[..., 1] == 1))
    # the frame positions are where the NIfTI affine puts slice k (LPS), for every frame written
    for item in seg.PerFrameFunctionalGroupsSequence:
        k = [str(ds.SOPInstanceUID) for ds in datasets].index(
            str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID))
        lps = (LPS_TO_RAS @ nifti_geometry.affine_array @ [0, 0, k, 1])[:3]
        assert np.allclose(np.array(item.PlanePositionSequence[0].ImagePositionPatient, float), lps, atol=1e-3)
    assert seg.NumberOfFrames == np.any(labels == 1, axis=(0, 1)).sum() + np.any(labels == 2, axis=(0, 1)).sum()
    assert seg.SegmentsOverlap == "NO"
    # references: the source series, its instances, its frame of reference
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == datasets[0].SeriesInstanceUID
    sources = {str(ds.SOPInstanceUID) for ds in datasets}
    referenced = {str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced and referenced <= sources
    assert seg.FrameOfReferenceUID == datasets[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == datasets[0].StudyInstanceUID and seg.SeriesDescription == "LiTS liver/tumour SEG"
    # the segments' codes and the algorithm
    liver, tumour = seg.SegmentSequence
    assert (liver.SegmentLabel, tumour.SegmentLabel) == ("Liver", "Liver tumour")
    assert liver.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91772007"  # Organ
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # Liver
    assert tumour.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"  # Morphologically abnormal
    assert tumour.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"  # Neoplasm
    assert tumour.AnatomicRegionSequence[0].CodeValue == "10200004"
    for segment in (liver, tumour):
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmVersion == "sha256-0123abcd" and algorithm.AlgorithmName == "lits U-Net"


def test_uids_are_the_same_for_a_rerun_and_new_for_new_labels(series):
    datasets, geometry, labels = series
    first, again = (pydicom.dcmread(io.BytesIO(dicom_seg.seg_bytes(labels, datasets, model_id="m1"))) for _ in "12")
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (again.SeriesInstanceUID, again.SOPInstanceUID)
    changed = labels.copy()
    changed[labels == 2] = 1
    other = pydicom.dcmread(io.BytesIO(dicom_seg.seg_bytes(changed, datasets, model_id="m1")))
    assert other.SeriesInstanceUID == first.SeriesInstanceUID and other.SOPInstanceUID != first.SOPInstanceUID
    assert other.SOPInstanceUID not in {str(ds.SOPInstanceUID) for ds in datasets}
    model2 = pydicom.dcmread(io.BytesIO(dicom_seg.seg_bytes(labels, datasets, model_id="m2")))
    assert model2.SeriesInstanceUID != first.SeriesInstanceUID


def test_a_series_without_type2_patient_attributes_gets_a_seg_and_keeps_its_headers(series):
    """Anonymisers delete what highdicom copies into the SEG's patient and study modules."""
    datasets, geometry, labels = series
    gone = ("PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber", "StudyTime")
    for ds in datasets:
        for keyword in gone:
            delattr(ds, keyword)
    seg = pydicom.dcmread(io.BytesIO(dicom_seg.seg_bytes(labels, datasets, model_id="m")))
    assert all(keyword in seg and not seg[keyword].value for keyword in gone)
    assert seg.PatientName == "Doe^J" and seg.PatientID == "P7"  # the source's patient module, as DICOM wants
    assert not any(keyword in ds for ds in datasets for keyword in gone)


def test_read_seg_round_trips_labels_and_geometry(series):
    datasets, geometry, labels = series
    full = labels.copy()
    full[0, 0, 0] = full[-1, -1, -1] = 1  # frames on the first and last slices: the SEG spans the series
    back, back_geometry = dicom_seg.read_seg(dicom_seg.seg_bytes(full, datasets, model_id="m"))
    assert back_geometry.shape == geometry.shape
    assert np.abs(back_geometry.affine_array - geometry.affine_array).max() < 1e-4
    assert np.array_equal(back, full)
    # empty end slices are not written: the SEG's grid is the span of its frames, on the series' lattice
    part, part_geometry = dicom_seg.read_seg(dicom_seg.seg_bytes(labels, datasets, model_id="m"))
    k0 = int(np.argmax(labels.any(axis=(0, 1))))
    assert part_geometry.shape[2] < geometry.shape[2]
    assert np.abs(part_geometry.affine_array - geometry.affine_array @ _shift(0, 0, k0)).max() < 1e-4
    on_series, source, grid = dicom_seg.common_grid(part, part_geometry, np.zeros_like(labels), geometry)
    assert grid.canonical_shape == geometry.canonical_shape
    assert np.array_equal(grid.to_canonical(on_series), geometry.to_canonical(labels)) and not source.any()
    # frames on slices 1 and 4 only (the gap's empty frames omitted too), and a single frame
    for kept in ((1, 4), (3,)):
        sparse = np.zeros_like(labels)
        sparse[..., list(kept)] = np.maximum(labels[..., list(kept)], 1)
        back, back_geometry = dicom_seg.read_seg(dicom_seg.seg_bytes(sparse, datasets, model_id="m"))
        on_series, _, grid = dicom_seg.common_grid(back, back_geometry, np.zeros_like(labels), geometry)
        assert back_geometry.shape[2] == kept[-1] - kept[0] + 1 and grid.canonical_shape == geometry.canonical_shape
        assert np.array_equal(grid.to_canonical(on_series), geometry.to_canonical(sparse))


def test_an_empty_mask_is_a_seg_of_the_whole_series(series):
    """Nothing segmented: highdicom keeps every (empty) frame, and the SEG reads back as zeros on the
    series' grid."""
    datasets, geometry, labels = series
    back, back_geometry = dicom_seg.read_seg(dicom_seg.seg_bytes(np.zeros_like(labels), datasets, model_id="m"))
    assert back.shape == labels.shape and not back.any()
    assert np.abs(back_geometry.affine_array - geometry.affine_array).max() < 1e-4


def _shift(i, j, k):
    out = np.eye(4)
    out[:3, 3] = (i, j, k)
    return out


def test_read_seg_maps_another_tools_segments_by_their_codes(series):
    """A SEG written by another tool: kidney, tumour ('Mass' in the liver) and liver (its tumour
    included: overlapping) in that order; segments go to labels by property type, not by number or label."""
    datasets, geometry, labels = series
    algorithm = hd.AlgorithmIdentificationSequence("other", codes.DCM.ArtificialIntelligence, "9")
    described = [(codes.SCT.Organ, codes.SCT.Kidney, None, "K"),
                 (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Mass, [codes.SCT.Liver], "M"),
                 (codes.SCT.Organ, codes.SCT.Liver, None, "L")]
    descriptions = [hd.seg.SegmentDescription(n, label, category, kind, "SEMIAUTOMATIC", algorithm, anatomic_regions=regions)
                    for n, (category, kind, regions, label) in enumerate(described, start=1)]
    kidney = np.zeros_like(labels, bool)
    kidney[:2, :2, 2:4] = True  # outside the liver: ignored
    masks = np.stack([kidney, labels == 2, labels >= 1], axis=-1).transpose(2, 1, 0, 3)
    seg = hd.seg.Segmentation(datasets, masks, "BINARY", descriptions, generate_uid(), 5, generate_uid(), 1, "x", "x",
                              "x", "x", omit_empty_frames=False)
    buffer = io.BytesIO()
    seg.save_as(buffer)
    back, back_geometry = dicom_seg.read_seg(buffer.getvalue())
    assert np.array_equal(back, labels) and np.abs(back_geometry.affine_array - geometry.affine_array).max() < 1e-4


def test_read_seg_refuses_what_is_not_a_liver_seg(series, tmp_path):
    datasets, geometry, labels = series
    ct = write_series(str(tmp_path / "ct"), shape=(4, 4, 2))[0]
    with pytest.raises(BadInputError, match=r"^.*IM0000: a DICOM CT Image Storage, not a Segmentation \(SEG\)"):
        dicom_seg.read_seg(ct)
    (tmp_path / "junk.dcm").write_bytes(b"\0" * 300)
    with pytest.raises(BadInputError, match="junk.dcm: not a DICOM file"):
        dicom_seg.read_seg(str(tmp_path / "junk.dcm"))
    spleen = hd.seg.SegmentDescription(1, "Spleen", codes.SCT.Organ, codes.SCT.Spleen, "MANUAL")
    seg = hd.seg.Segmentation(datasets, (labels >= 1).transpose(2, 1, 0), "BINARY", [spleen], generate_uid(), 5,
                              generate_uid(), 1, "x", "x", "x", "x")
    buffer = io.BytesIO()
    seg.save_as(buffer)
    with pytest.raises(BadInputError, match=r"spleen.dcm: no liver segment .* among its segments \['Spleen'\]"):
        dicom_seg.read_seg(buffer.getvalue(), name="spleen.dcm")


def real_series():
    for root in TESTDATA:
        folder = os.path.join(root, "dicom-ct-series")
        if os.path.isdir(folder):
            return folder, os.path.join(root, "dicom-ct-series-liver.nii.gz")
    pytest.skip("the real CT series is in neither tests/data nor ../shared/testdata")


def test_real_series_liver_written_and_read_back():
    """TotalSegmentator's liver of the real series (LAS voxel order, rows against the files') onto the
    series' grid through world coordinates, as a SEG, and back."""
    folder, liver_uri = real_series()
    (series,), _ = dicom.discover_series(folder)
    _, geometry, datasets = dicom.read_series(series)
    liver, liver_geometry = volumes.read_nifti(liver_uri)
    assert liver_geometry.axcodes != geometry.axcodes  # a real reorientation
    assert np.abs(liver_geometry.to_canonical(np.zeros(liver.shape)).shape != np.array(geometry.canonical_shape)).sum() == 0
    labels = np.ascontiguousarray(geometry.from_canonical(liver_geometry.to_canonical(volumes.as_labels(liver, liver_uri))))
    data = dicom_seg.seg_bytes(labels, datasets, model_id="totalsegmentator-pseudo-reference")
    back, back_geometry = dicom_seg.read_seg(data)
    on_series, _, grid = dicom_seg.common_grid(back, back_geometry, labels, geometry)
    assert np.array_equal(grid.to_canonical(on_series), geometry.to_canonical(labels))
    assert np.array_equal(grid.to_canonical(on_series), liver_geometry.to_canonical(liver))
    assert labels.sum() > 10000 and len(data) < 2 << 20
    # world coordinates: the liver's centroid is the same point read from the NIfTI and from the SEG
    def centroid(mask, g):
        return (g.affine_array @ np.r_[np.argwhere(mask).mean(axis=0), 1])[:3]
    assert np.allclose(centroid(back >= 1, back_geometry), centroid(liver >= 1, liver_geometry), atol=1e-3)
