import gzip

import nibabel as nib
import numpy as np
import pytest

from lits.core import volumes
from lits.core.config import PrepareConfig
from lits.core.errors import BadInputError
from lits.core.synthetic import _AXIS

ALL_AXCODES = ["LPS", "RAS", "LPI", "RPI", "LAS", "PLS", "SPL", "IRA", "ASL"]


def affine_for(axcodes, spacing=(0.7, 0.8, 2.5), offset=(10.0, -20.0, 30.0)):
    affine = np.eye(4)
    for i, code in enumerate(axcodes):
        ras_axis, sign = _AXIS[code]
        affine[:3, i] = 0.0
        affine[ras_axis, i] = sign * spacing[ras_axis]
    affine[:3, 3] = offset
    return affine


def world(affine, ijk):
    return affine[:3, :3] @ np.asarray(ijk, float) + affine[:3, 3]


@pytest.mark.parametrize("axcodes", ALL_AXCODES)
def test_canonical_layout_is_radiological_and_round_trips(axcodes):
    affine = affine_for(axcodes)
    shape = (5, 6, 7)
    g = volumes.Geometry.from_affine(affine, shape)
    assert g.axcodes == axcodes
    # a file array holding its own flat index: where each canonical voxel came from
    index = np.arange(np.prod(shape)).reshape(shape)
    canon = g.to_canonical(index)
    assert np.array_equal(g.from_canonical(canon), index)
    zhw = canon.shape
    assert zhw == g.canonical_shape
    ijk = lambda v: np.unravel_index(int(v), shape)  # noqa: E731
    p = world(affine, ijk(canon[0, 0, 0]))
    # one step along W goes to the patient's left (RAS x grows to the right, so x falls),
    # along H posterior (y falls), along Z superior (z grows)
    assert world(affine, ijk(canon[0, 0, 1]))[0] < p[0]
    assert world(affine, ijk(canon[0, 1, 0]))[1] < p[1]
    assert world(affine, ijk(canon[1, 0, 0]))[2] > p[2]
    assert np.allclose(g.canonical_spacing, (0.7, 0.8, 2.5))
    # file_slice_index names the file index along the axial axis of each canonical slice
    axial = [i for i, c in enumerate(axcodes) if c in "SI"][0]
    for z in range(zhw[0]):
        assert ijk(canon[z, 0, 0])[axial] == g.file_slice_index(z)


def test_canonical_agrees_with_nibabel_closest_canonical(rng):
    affine = affine_for("PLS")
    data = rng.integers(-1000, 1000, size=(6, 5, 4)).astype(np.int16)
    ras = nib.as_closest_canonical(nib.Nifti1Image(data, affine)).get_fdata()
    # RAS (x right, y anterior, z superior) -> LPS flips x and y; then (S, P, L)
    expected = ras[::-1, ::-1, :].transpose(2, 1, 0)
    g = volumes.Geometry.from_affine(affine, data.shape)
    assert np.array_equal(g.to_canonical(data), expected)


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint8, np.float64])
@pytest.mark.parametrize("compress", [True, False])
def test_parse_round_trip(rng, dtype, compress):
    data = rng.integers(0, 3, size=(6, 5, 4)).astype(dtype)
    affine = affine_for("LPI")
    arr, g = volumes.parse_nifti(volumes.nifti_bytes(data, affine, compress=compress))
    assert arr.dtype == dtype and np.array_equal(arr, data)
    assert np.allclose(g.affine_array, affine, atol=1e-5)
    assert g.shape == (6, 5, 4)


def test_parse_agrees_with_nibabel_on_nibabel_written_file(tmp_path, rng):
    data = rng.integers(-1024, 2000, size=(9, 8, 7)).astype(np.int16)
    image = nib.Nifti1Image(data, affine_for("RAS"))
    path = tmp_path / "v.nii.gz"
    nib.save(image, path)
    arr, g = volumes.read_nifti(str(path))
    assert np.array_equal(arr, np.asanyarray(nib.load(path).dataobj))
    assert g.axcodes == "RAS"


def test_scaled_data_become_float32_hu(rng):
    raw = rng.integers(0, 2000, size=(4, 4, 4)).astype(np.uint16)
    image = nib.Nifti1Image(raw, np.eye(4))
    image.header.set_slope_inter(1.0, -1024.0)
    arr, _ = volumes.parse_nifti(image.to_bytes())
    assert arr.dtype == np.float32
    assert np.array_equal(arr, raw.astype(np.float32) - 1024)


def test_trailing_singleton_dimension_is_squeezed(rng):
    data = rng.integers(0, 5, size=(4, 5, 6, 1)).astype(np.int16)
    arr, g = volumes.parse_nifti(nib.Nifti1Image(data, np.eye(4)).to_bytes())
    assert arr.shape == (4, 5, 6) and g.shape == (4, 5, 6)


def test_bad_files_give_one_clear_error(rng):
    good = volumes.nifti_bytes(rng.integers(0, 3, size=(8, 8, 8)).astype(np.int16), np.eye(4), compress=True)
    with pytest.raises(BadInputError, match="x.nii.gz: truncated or corrupt gzip"):
        volumes.parse_nifti(good[: len(good) // 2], "x.nii.gz")
    raw = gzip.decompress(good)
    with pytest.raises(BadInputError, match="truncated: the header promises"):
        volumes.parse_nifti(raw[:-100], "x.nii")
    with pytest.raises(BadInputError, match="not a NIfTI"):
        volumes.parse_nifti(b"\x00" * 400, "x.nii")
    with pytest.raises(BadInputError, match="4-D"):
        volumes.parse_nifti(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.int16), np.eye(4)).to_bytes(), "x.nii")
    with pytest.raises(BadInputError, match="cannot read"):
        volumes.read_nifti("/nonexistent/volume-1.nii")


def test_check_hu_rejects_nan_and_inf():
    hu = np.zeros((3, 3, 3), np.float32)
    volumes.check_hu(hu, "v")
    volumes.check_hu(np.zeros((3, 3, 3), np.int16), "v")
    for bad in (np.nan, np.inf):
        hu[1, 1, 1] = bad
        with pytest.raises(BadInputError, match="v: contains NaN"):
            volumes.check_hu(hu, "v")


def test_as_labels_accepts_uint8_and_integral_floats_only():
    seg = np.array([[[0, 1, 2]]], np.uint8)
    assert volumes.as_labels(seg, "s") is seg
    as_float = volumes.as_labels(seg.astype(np.float32), "s")
    assert as_float.dtype == np.uint8 and as_float.tolist() == [[[0, 1, 2]]]
    with pytest.raises(BadInputError, match=r"labels \[3\] outside"):
        volumes.as_labels(np.array([[[0, 3]]], np.uint8), "s")
    with pytest.raises(BadInputError, match="non-integral"):
        volumes.as_labels(np.array([[[0.0, 1.5]]], np.float32), "s")
    with pytest.raises(BadInputError, match=r"labels \[-1\] outside"):
        volumes.as_labels(np.array([[[0, -1]]], np.int16), "s")


@pytest.mark.parametrize("axcodes", ["LPS", "RAS", "LPI", "PLS", "SPL"])
def test_canonical_layout_agrees_with_simpleitk(tmp_path, rng, axcodes):
    """A second reader: SimpleITK oriented to LPS gives its array as [S, P, L] = our (Z, H, W)."""
    import SimpleITK as sitk  # a test dependency: without it this fails, it does not skip
    data = rng.integers(-1000, 1000, size=(7, 6, 5)).astype(np.int16)
    path = str(tmp_path / "v.nii.gz")
    volumes.write_nifti(path, data, affine_for(axcodes, spacing=(0.7, 0.8, 2.5)))
    arr, g = volumes.read_nifti(path)
    image = sitk.DICOMOrient(sitk.ReadImage(path), "LPS")
    assert np.array_equal(g.to_canonical(arr), sitk.GetArrayFromImage(image))
    assert np.allclose(g.canonical_spacing, image.GetSpacing(), rtol=1e-6)


# --- bounded reading: the header first, then exactly the voxels it declares ------------------

def _gzip_members(*parts: bytes) -> bytes:
    return b"".join(gzip.compress(p, mtime=0) for p in parts)


def test_voxel_types_other_than_real_numbers_are_one_clear_error(tmp_path):
    rgb = np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    path = str(tmp_path / "volume-3.nii.gz")
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), path)
    with pytest.raises(BadInputError) as caught:
        volumes.read_nifti(path)
    assert str(caught.value) == (f"{path}: voxels are RGB (RGB), not one real number each; save HU as int16 or "
                                 "float32 and labels as uint8")
    complex_bytes = nib.Nifti1Image(np.zeros((4, 4, 4), np.complex64), np.eye(4)).to_bytes()
    with pytest.raises(BadInputError) as caught:
        volumes.parse_nifti(complex_bytes, "upload.nii")
    assert str(caught.value) == ("upload.nii: voxels are complex64 (complex64), not one real number each; save HU "
                                 "as int16 or float32 and labels as uint8")


def test_a_header_over_the_voxel_limit_is_refused_before_its_voxels(rng):
    data = rng.integers(0, 3, size=(6, 5, 4)).astype(np.int16)
    good = volumes.nifti_bytes(data, np.eye(4))
    assert np.array_equal(volumes.parse_nifti(good, "v", max_voxels=120)[0], data)
    message = ("v: the header declares 6x5x4 = 120 voxels, over the limit of 119; a corrupt or crafted file "
               "(prepare's --max-voxels raises the limit)")
    with pytest.raises(BadInputError) as caught:
        volumes.parse_nifti(good, "v", max_voxels=119)
    assert str(caught.value) == message
    # refused from the header alone: the same file cut right after its header says the same
    header_only = _gzip_members(gzip.decompress(good)[:352])
    with pytest.raises(BadInputError) as caught:
        volumes.parse_nifti(header_only, "v", max_voxels=119)
    assert str(caught.value) == message
    assert volumes.MAX_VOXELS == 2 ** 30 == PrepareConfig(input="i", output="o").max_voxels


def test_data_after_the_declared_voxels_is_refused(rng):
    data = rng.integers(0, 3, size=(6, 5, 4)).astype(np.int16)
    raw = volumes.nifti_bytes(data, np.eye(4), compress=False)
    declared = len(raw)
    message = (f"v: data continue after the {declared} bytes the header declares (trailing data: a corrupt or "
               "crafted file); re-export the volume")
    for bad in (raw + b"\x00", _gzip_members(raw + b"\x00"), _gzip_members(raw, b"\x00" * 10),
                _gzip_members(raw) + b"garbage"):
        with pytest.raises(BadInputError) as caught:
            volumes.parse_nifti(bad, "v")
        assert str(caught.value) == message
    # what a gzip stream may hold and still be the same file: several members, an empty last one (bgzip)
    for fine in (_gzip_members(raw[:100], raw[100:300], raw[300:]), _gzip_members(raw, b"")):
        assert np.array_equal(volumes.parse_nifti(fine, "v")[0], data)


def test_big_endian_and_scaled_files_decode_in_place(rng):
    data = rng.integers(-1000, 1000, size=(5, 4, 3)).astype(np.int16)
    header = nib.Nifti1Header(endianness=">")
    header.set_data_dtype(np.int16)
    image = nib.Nifti1Image(data, np.eye(4), header=header)
    assert image.to_bytes()[:4] == (348).to_bytes(4, "big")
    arr, _ = volumes.parse_nifti(image.to_bytes(), "v")
    assert arr.dtype == np.dtype("=i2") and arr.dtype.isnative and np.array_equal(arr, data)
    image.header.set_slope_inter(2.0, -1024.0)
    arr, _ = volumes.parse_nifti(gzip.compress(image.to_bytes()), "v")
    assert arr.dtype == np.float32 and np.array_equal(arr, data.astype(np.float32) * 2 - 1024)
    assert not arr.flags.writeable


def test_read_header_reads_only_the_header(tmp_path, rng):
    data = rng.integers(0, 3, size=(40, 30, 20)).astype(np.uint8)
    path = str(tmp_path / "segmentation-1.nii.gz")
    volumes.write_nifti(path, data, affine_for("RAS"))
    with open(path, "rb") as f:
        cut = f.read(300)  # the header, a few of the voxels: read_nifti calls it truncated
    open(path, "wb").write(cut)
    header = volumes.read_header(path)
    assert (header.shape, header.dtype, header.offset, header.scaling) == ((40, 30, 20), np.uint8, 352, None)
    assert header.file_bytes == 352 + 24000 and header.geometry.axcodes == "RAS"
    with pytest.raises(BadInputError, match="truncated or corrupt gzip"):
        volumes.read_nifti(path)
