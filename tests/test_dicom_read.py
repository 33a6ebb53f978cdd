"""DICOM CT series in (lits.core.dicom): selection, ordering, geometry, HU, zip uploads.

Checked against SimpleITK (ImageSeriesReader, GDCM's sorting) voxel for voxel and in world
coordinates, on the real JPEG 2000 series in tests/data and on small series written here with
pydicom (tests/dicom_factory.py). No Ray; one test uses the module's S3-protocol server.
"""

from __future__ import annotations

import io
import os
import shutil
import zipfile

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicom_factory import phantom_hu, write_series
from lits.core import dicom, storage
from lits.core.errors import BadInputError

HERE = os.path.dirname(os.path.abspath(__file__))
REAL = os.path.join(HERE, "data", "dicom-ct-series")
REAL_LIVER = os.path.join(HERE, "data", "dicom-ct-series-liver.nii.gz")
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS


def sitk_read(files):
    """SimpleITK's volume of `files` (GDCM sorts them): (array (k, j, i), image)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(files))
    image = reader.Execute()
    return sitk.GetArrayFromImage(image), image


def assert_same_as_sitk(hu, geometry, folder):
    """Our (i, j, k) HU equals SimpleITK's voxel for voxel, and the corners' world positions agree."""
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder)
    array, image = sitk_read(files)
    np.testing.assert_array_equal(hu.transpose(2, 1, 0), array)
    lps = LPS @ geometry.affine_array
    for corner in [(0, 0, 0), tuple(s - 1 for s in hu.shape), (hu.shape[0] - 1, 0, 0), (0, 0, hu.shape[2] - 1)]:
        ours = (lps @ np.array([*corner, 1.0]))[:3]
        theirs = np.array(image.TransformIndexToPhysicalPoint([int(c) for c in corner]))
        np.testing.assert_allclose(ours, theirs, atol=1e-3)


@pytest.fixture(scope="module")
def real():
    series, skipped = dicom.discover_series(REAL)
    assert skipped == [] and len(series) == 1
    return series[0], dicom.read_series(series[0])


def test_real_series_equals_simpleitk(real):
    series, (hu, geometry, datasets) = real
    assert hu.shape == (512, 512, 20) and hu.dtype == np.int16 and not hu.flags.writeable
    assert_same_as_sitk(hu, geometry, REAL)
    assert geometry.spacing == pytest.approx((0.9765625, 0.9765625, 2.0))
    # Sorted along the normal (+z): the highest-numbered file (lowest z) first, whatever the names.
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert z == sorted(z) and z[0] == -804.5 and series.files[0].endswith("16592")


def test_real_series_blank_uids_filled(real):
    series, (_, _, datasets) = real
    assert series.uids_derived and series.name == "dicom-ct-series"
    assert series.frame_of_reference_uid == "1.3.12.2.1107.5.1.4.60064.30000022120807274275100000041"
    for ds, path in zip(datasets, series.files):
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        assert ds.SOPInstanceUID == meta.MediaStorageSOPInstanceUID and ds.SOPClassUID == meta.MediaStorageSOPClassUID
        assert ds.SeriesInstanceUID == series.series_uid and ds.StudyInstanceUID == series.study_uid
        assert "PixelData" not in ds
    again, _ = dicom.group_series(list(series.headers)[::-1])
    assert (again[0].series_uid, again[0].study_uid) == (series.series_uid, series.study_uid)


def test_real_series_liver_in_world(real):
    """TotalSegmentator's liver (its own voxel order, rows flipped) lands on liver HU through our affine."""
    _, (hu, geometry, _) = real
    liver = nib.load(REAL_LIVER)
    ijk = np.argwhere(np.asarray(liver.dataobj) == 1)
    ours = (np.linalg.inv(geometry.affine_array) @ liver.affine @ np.c_[ijk, np.ones(len(ijk))].T)[:3].T
    index = np.rint(ours).astype(int)
    np.testing.assert_allclose(ours, index, atol=1e-3)
    assert 80 < hu[tuple(index.T)].mean() < 100  # soft tissue (89 HU), far from air or fat


def test_hand_computed_affine(tmp_path):
    """Rows along +y, columns along +x (normal -z): every affine entry worked out by hand."""
    shape, spacing = (24, 32, 8), (0.7, 0.8, 2.5)
    write_series(str(tmp_path / "s"), shape=shape, spacing=spacing, orientation=(0, 1, 0, 1, 0, 0),
                 position0=(-10.0, -20.0, 30.0))
    (series,), skipped = dicom.discover_series(str(tmp_path))
    hu, geometry, _ = dicom.read_series(series)
    # LPS: i (column) steps IOP[0:3] * 0.8 = (0, .8, 0); j (row) steps IOP[3:6] * 0.7 = (.7, 0, 0);
    # k steps normal (0,1,0)x(1,0,0) = (0, 0, -1) times 2.5; origin (-10, -20, 30). RAS flips x and y.
    expected = [[0, -0.7, 0, 10], [-0.8, 0, 0, 20], [0, 0, -2.5, 30], [0, 0, 0, 1]]
    np.testing.assert_allclose(geometry.affine_array, expected, atol=1e-9)
    assert hu.shape == (32, 24, 8) and skipped == []
    np.testing.assert_array_equal(hu, phantom_hu(shape).transpose(1, 0, 2))
    assert_same_as_sitk(hu, geometry, str(tmp_path / "s"))


def _rotation(axis, degrees):
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    if axis == "z":
        return (c, s, 0, -s, c, 0)
    return (1, 0, 0, 0, c, s)  # about x: an oblique (not tilted) axial series


@pytest.mark.parametrize("case", ["shuffled", "oblique-z", "oblique-x", "blank-uids", "rescaled", "jpeg-ls"])
def test_synthetic_equals_simpleitk(tmp_path, case):
    n = 8
    kwargs = dict(shape=(24, 32, n), spacing=(0.7, 0.8, 2.5), position0=(5.5, -3.0, -100.0))
    if case == "shuffled":  # names sort against the positions; InstanceNumbers run backwards
        order = np.random.default_rng(0).permutation(n)
        kwargs.update(file_names=[f"IM{int(o):04d}" for o in order], instance_numbers=list(range(n, 0, -1)))
    elif case.startswith("oblique"):
        kwargs.update(orientation=_rotation(case[-1], 20 if case.endswith("z") else 15))
    elif case == "blank-uids":
        kwargs.update(blank_uids=True)
    elif case == "jpeg-ls":
        kwargs.update(transfer_syntax=pydicom.uid.JPEGLSLossless)
    else:
        kwargs.update(intercept=-1000, slope=2.0, hu=(phantom_hu(kwargs["shape"]) // 2) * 2)
    folder = str(tmp_path / case)
    write_series(folder, **kwargs)
    (series,), skipped = dicom.discover_series(folder)
    hu, geometry, _ = dicom.read_series(series)
    assert skipped == [] and hu.dtype == (np.float32 if case == "rescaled" else np.int16)
    assert_same_as_sitk(hu, geometry, folder)
    assert series.uids_derived == (case == "blank-uids")
    assert series.headers[0].transfer_syntax == kwargs.get("transfer_syntax", pydicom.uid.ExplicitVRLittleEndian)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One folder with two CT series, a scout, an MR series, a secondary capture, a derived series,
    a non-DICOM file and outputs to pass over; folders of bad series; one of blank UIDs."""
    root = tmp_path_factory.mktemp("study")
    mixed = str(root / "mixed")
    shape = (24, 32, 8)
    write_series(mixed, shape=shape, series_number=1, file_names=[f"{k:03d}" for k in range(8)][::-1],
                 instance_numbers=list(range(8, 0, -1)))
    write_series(mixed, shape=(16, 16, 5), series_number=2, file_names=[f"b{k}.dcm" for k in range(5)], seed=2)
    write_series(mixed, shape=(24, 32, 1), series_number=3, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                 orientation=(1, 0, 0, 0, 0, -1), file_names=["scout"])
    write_series(mixed, shape=shape, series_number=4, modality="MR", file_names=[f"mr{k}" for k in range(8)])
    write_series(mixed, shape=(24, 32, 3), series_number=5, sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                 file_names=[f"sc{k}" for k in range(3)])
    write_series(mixed, shape=shape, series_number=6, image_type=("DERIVED", "SECONDARY", "MPR"),
                 file_names=[f"mpr{k}" for k in range(8)])
    with open(os.path.join(mixed, "notes"), "w") as f:
        f.write("not an image\n")
    for name in ("volume-1.nii.gz", "mixed_seg.nii.gz", "report.json", "preview.png"):
        (root / "mixed" / name).write_bytes(b"x")
    z = [0, 2.5, 5, 7.5, 12.5, 15, 17.5, 20]  # 10 is missing
    write_series(str(root / "gap"), positions=[(0, 0, v) for v in z])
    write_series(str(root / "tilt"), positions=[(0, 0.6 * k, 2.5 * k) for k in range(8)])
    write_series(str(root / "dup"), positions=[(0, 0, 2.5 * min(k, 6)) for k in range(8)])
    write_series(str(root / "uneven"), positions=[(0, 0, 2.5 * k + (0.3 if k == 4 else 0)) for k in range(8)])
    uid = pydicom.uid.generate_uid()
    write_series(str(root / "sizes"), shape=(24, 32, 4), series_uid=uid, file_names=[f"a{k}" for k in range(4)])
    write_series(str(root / "sizes"), shape=(24, 24, 4), series_uid=uid, position0=(-10, -20, 40),
                 file_names=[f"b{k}" for k in range(4)])
    uid = pydicom.uid.generate_uid()  # a scout inside the axial series (same SeriesInstanceUID)
    write_series(str(root / "with-scout"), series_uid=uid, file_names=[f"ax{k}" for k in range(8)])
    write_series(str(root / "with-scout"), shape=(24, 32, 1), series_uid=uid, file_names=["scout"],
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), orientation=(1, 0, 0, 0, 0, -1))
    write_series(str(root / "blank"), blank_uids=True, file_names=[f"{k}" for k in range(8)])
    write_series(str(root / "blank"), shape=(24, 32, 1), blank_uids=True, orientation=(0, 1, 0, 0, 0, -1),
                 file_names=["sagittal"])
    return str(root)


def test_selection_keeps_good_series_and_names_each_bad_one(study):
    series, skipped = dicom.discover_series(study)
    assert [s.name for s in series] == ["blank", "mixed/series-1", "mixed/series-2", "with-scout"]
    lines = sorted(str(s) for s in skipped)
    expected = {
        "gap: missing slice": 1, "tilt: gantry tilt": 1, "dup: duplicate slice positions": 1,
        "uneven: uneven slice spacing": 1, "sizes: mixed image sizes": 1,
        "mixed/series-3: localizer/scout image": 1, "mixed/series-4: modality MR, not CT": 1,
        "mixed/series-5: secondary capture": 1, "mixed/series-6: ImageType DERIVED/SECONDARY": 1,
        "/mixed/notes: not a DICOM file": 1, "blank/series-1: not axial": 1,
        "with-scout: 1 of 9 files left out: localizer/scout image": 1,
    }
    for start, count in expected.items():
        assert sum(start in line for line in lines) == count, (start, lines)
    assert len(lines) == len(expected), lines
    assert all("\n" not in line for line in lines)
    # Bad geometry fails a series a job would segment; the rest were never meant to be segmented.
    assert sorted(s.what for s in skipped if s.failed) == ["dup", "gap", "sizes", "tilt", "uneven"]
    assert series[3].slices == 8
    main = series[1]
    # Named and numbered against their positions: neither file names nor InstanceNumbers give this order.
    assert [os.path.basename(f) for f in main.files] == [f"{k:03d}" for k in range(8)][::-1]
    z = [h.position[2] for h in main.headers]
    assert z == sorted(z)


def test_blank_uids_fall_back_to_geometry(study):
    series, _ = dicom.discover_series(os.path.join(study, "blank"))
    (blank,) = series
    assert blank.uids_derived and blank.slices == 8 and "|" in blank.key
    assert blank.series_uid and all(h.sop_instance_uid for h in blank.headers)


def test_read_series_refuses_bad_geometry_in_one_line(study):
    """read_series checks again: a Series built around group_series still cannot give a wrong grid."""
    headers, _ = dicom.read_headers(storage.list_files(os.path.join(study, "tilt")))
    (good,), _ = dicom.discover_series(os.path.join(study, "blank"))
    bad = dicom.Series(key="k", name="tilted-one", folder="f", files=tuple(h.uri for h in headers),
                       headers=tuple(headers), study_uid="1.2", series_uid="1.3", frame_of_reference_uid="1.4",
                       uids_derived=False)
    with pytest.raises(BadInputError, match=r"^tilted-one: gantry tilt or shifted slices: .*degrees") as err:
        dicom.read_series(bad)
    assert "\n" not in str(err.value)
    with pytest.raises(BadInputError, match=r"^blank: 32x24x8 = 6144 voxels, over the limit of 6000"):
        dicom.read_series(good, max_voxels=6000)


def test_undecodable_pixel_data_names_the_syntax(tmp_path):
    paths = write_series(str(tmp_path / "j"), shape=(8, 8, 3))
    for path in paths:  # claim JPEG Lossless and hold garbage fragments
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLosslessSV1
        ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8 not a jpeg \xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds.save_as(path, enforce_file_format=True)
    (series,), _ = dicom.discover_series(str(tmp_path))
    with pytest.raises(BadInputError, match=r"^j: cannot decode pixel data \(transfer syntax JPEG Lossless.*install"):
        dicom.read_series(series)


def _zip(members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_zip_upload(tmp_path):
    paths = write_series(str(tmp_path / "s"), file_names=[f"{k}" for k in range(8)][::-1])
    members = {f"export/DICOM/{os.path.basename(p)}": open(p, "rb").read() for p in paths}
    members["__MACOSX/._0"] = b"junk"
    hu, geometry, datasets = dicom.read_series_zip(_zip(members), "upload-1")
    (series,), _ = dicom.discover_series(str(tmp_path / "s"))
    want_hu, want_geometry, _ = dicom.read_series(series)
    np.testing.assert_array_equal(hu, want_hu)
    assert geometry == want_geometry and len(datasets) == 8
    with pytest.raises(BadInputError, match=r"^upload-1: the zip member '../x' has an absolute or '..' path"):
        dicom.read_series_zip(_zip({**members, "../x": b"1"}), "upload-1")
    with pytest.raises(BadInputError, match=r"^upload-1: the zip inflates to \d+ bytes, over the limit of 1000$"):
        dicom.read_series_zip(_zip(members), "upload-1", max_bytes=1000)
    other = write_series(str(tmp_path / "t"), series_number=2, seed=3)
    two = {**members, **{f"b/{os.path.basename(p)}": open(p, "rb").read() for p in other}}
    with pytest.raises(BadInputError, match=r"^upload-1: 2 CT series .* upload one series at a time$"):
        dicom.read_series_zip(_zip(two), "upload-1")
    with pytest.raises(BadInputError, match=r"^upload-1: not a readable zip archive"):
        dicom.read_series_zip(b"PK nothing", "upload-1")


def test_series_identity_changes_when_a_file_is_replaced(tmp_path):
    paths = write_series(str(tmp_path / "s"))
    (series,), _ = dicom.discover_series(str(tmp_path))
    before = dicom.series_identity(series)
    assert before["count"] == 8 and before["size"] == sum(os.path.getsize(p) for p in paths)
    assert dicom.series_identity(series) == before
    shutil.copy(paths[0], paths[0] + ".tmp")
    os.replace(paths[0] + ".tmp", paths[0])
    os.utime(paths[0], (1e9, 1e9))
    assert dicom.series_identity(series)["files_hash"] != before["files_hash"]


def test_s3_series_equals_local(tmp_path, s3_server):
    from conftest import make_bucket, upload_tree

    folder = str(tmp_path / "ct")
    write_series(folder, shape=(24, 32, 4), file_names=[f"x{k}" for k in range(4)][::-1])
    make_bucket(s3_server, "dicom")
    upload_tree(s3_server, folder, "s3://dicom/in/ct")
    (remote,), skipped = dicom.discover_series("s3://dicom/in")
    (local,), _ = dicom.discover_series(folder)
    hu, geometry, _ = dicom.read_series(remote)
    want_hu, want_geometry, _ = dicom.read_series(local)
    np.testing.assert_array_equal(hu, want_hu)
    assert geometry == want_geometry and skipped == [] and remote.name == "ct"
    assert remote.files[0].startswith("s3://dicom/in/ct/") and "etag" not in dicom.series_identity(remote)


def test_geometry_checks_on_headers(tmp_path):
    """series_geometry and group_series are pure: headers edited by hand give each reason in one line."""
    import dataclasses

    headers, _ = dicom.read_headers(write_series(str(tmp_path / "a" / "scan")))
    order, affine = dicom.series_geometry(headers[::-1], "s")
    assert order == list(range(8))[::-1] and affine[2, 3] == 30.0
    edits = {
        "mixed pixel spacings 0.7x0.8, 0.7x0.9 mm": dict(pixel_spacing=(0.7, 0.9)),
        "mixed image orientations": dict(orientation=(1, 0, 0, 0, 0.999, 0.0447)),
        "a slice lacks ImagePositionPatient": dict(position=None),
    }
    for reason, change in edits.items():
        bad = headers[:3] + [dataclasses.replace(headers[3], **change)] + headers[4:]
        with pytest.raises(BadInputError, match=f"^s: {reason}"):
            dicom.series_geometry(bad, "s")
    skewed = [dataclasses.replace(h, orientation=(1, 0, 0, 0.1, 1, 0)) for h in headers]
    with pytest.raises(BadInputError, match=r"^s: ImageOrientationPatient .* is not two orthogonal unit vectors$"):
        dicom.series_geometry(skewed, "s")
    # Same folder name in two places: names keep one more path part.
    other, _ = dicom.read_headers(write_series(str(tmp_path / "b" / "scan"), seed=1))
    series, skipped = dicom.group_series(headers + other)
    assert sorted(s.name for s in series) == ["a/scan", "b/scan"] and skipped == []


def test_files_without_preamble(tmp_path):
    """Bare datasets (no 128-byte preamble, no 'DICM', no file meta) are read like Part 10 files."""
    paths = write_series(str(tmp_path / "bare"), shape=(8, 8, 4))
    (series,), _ = dicom.discover_series(str(tmp_path))
    want, _, _ = dicom.read_series(series)
    for path in paths:
        ds = pydicom.dcmread(path)
        del ds.file_meta
        ds.preamble = None
        pydicom.dcmwrite(path, ds, enforce_file_format=False, implicit_vr=False, little_endian=True)
        with open(path, "rb") as f:
            assert f.read(2) == b"\x08\x00"
    (series,), skipped = dicom.discover_series(str(tmp_path))
    hu, _, datasets = dicom.read_series(series)
    np.testing.assert_array_equal(hu, want)
    assert skipped == [] and datasets[0].SOPClassUID == pydicom.uid.CTImageStorage
