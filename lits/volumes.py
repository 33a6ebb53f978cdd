"""NIfTI read / validate / canonicalise / save, and the geometry record that undoes it.

Reading decodes the whole file in one call (ISA-L inflate for .nii.gz, see `decompress`) and
views the voxels in place with ``np.frombuffer``: no per-chunk gzip stream, no float64 copy.
Canonical layout and axis names: see lits.schema.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from lits import storage
from lits.errors import BadInputError

log = logging.getLogger(__name__)

try:  # ISA-L's inflate is ~2x zlib's on CT data; fall back to zlib where no wheel exists
    from isal import igzip as _gzip_impl
except ImportError:  # pragma: no cover - exercised only where isal is missing
    _gzip_impl = gzip

# The file axes are first brought to LPS, then transposed to (S, P, L) = (Z, H, W).
CANONICAL_AXCODES = ("L", "P", "S")
# A dimension outside these bounds is not a CT volume (or a corrupt header).
MIN_DIM, MAX_DIM = 2, 4096


def decompress(data: bytes) -> bytes:
    """Inflate a (possibly multi-member) gzip stream in one call; other bytes pass through."""
    if data[:2] != b"\x1f\x8b":
        return data
    return _gzip_impl.decompress(data)


@dataclass(frozen=True)
class Geometry:
    """Where a volume's voxels sit in the patient, as read from its file.

    Attributes:
        affine: 4x4 voxel -> RAS+ mm transform of the file (nested tuples).
        shape: the file array's shape (i, j, k).
        axcodes: the file axes' directions, e.g. 'LPS' or 'RAS'.
        spacing: voxel size in mm along the file axes (i, j, k).
    """

    affine: Tuple[Tuple[float, ...], ...]
    shape: Tuple[int, int, int]
    axcodes: str
    spacing: Tuple[float, float, float]

    @classmethod
    def from_affine(cls, affine: np.ndarray, shape: Tuple[int, ...]) -> "Geometry":
        affine = np.asarray(affine, dtype=np.float64)
        axcodes = "".join(nib.aff2axcodes(affine))
        spacing = tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
        return cls(
            affine=tuple(tuple(float(v) for v in row) for row in affine),
            shape=tuple(int(s) for s in shape),
            axcodes=axcodes,
            spacing=spacing,
        )

    @property
    def affine_array(self) -> np.ndarray:
        return np.array(self.affine, dtype=np.float64)

    def _to_lps(self) -> np.ndarray:
        return ornt_transform(io_orientation(self.affine_array), axcodes2ornt(CANONICAL_AXCODES))

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """View a file-order array (i, j, k) in the canonical (Z, H, W) layout (no copy)."""
        return apply_orientation(array, self._to_lps()).transpose(2, 1, 0)

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        """Undo `to_canonical`: a (Z, H, W) array back to the file's (i, j, k) order (a view)."""
        back = ornt_transform(axcodes2ornt(CANONICAL_AXCODES), io_orientation(self.affine_array))
        return apply_orientation(array.transpose(2, 1, 0), back)

    def _file_axis_of(self, canonical_axis: int) -> Tuple[int, bool]:
        """(file axis, flipped) that becomes LPS axis `canonical_axis` (0 L, 1 P, 2 S)."""
        t = self._to_lps()
        axis = int(np.nonzero(t[:, 0] == canonical_axis)[0][0])
        return axis, bool(t[axis, 1] < 0)

    @property
    def canonical_shape(self) -> Tuple[int, int, int]:
        """(Z, H, W)."""
        return tuple(self.shape[self._file_axis_of(a)[0]] for a in (2, 1, 0))

    @property
    def canonical_spacing(self) -> Tuple[float, float, float]:
        """(x, y, z) mm = (W, H, Z) = (column, row, slice): SimpleITK's spacing order."""
        return tuple(self.spacing[self._file_axis_of(a)[0]] for a in (0, 1, 2))

    @property
    def axial_axis(self) -> int:
        """The file axis that runs through axial slices (canonical Z)."""
        return self._file_axis_of(2)[0]

    def file_slice_index(self, z: np.ndarray) -> np.ndarray:
        """Index along the file's axial axis of canonical slice(s) z."""
        axis, flipped = self._file_axis_of(2)
        z = np.asarray(z)
        return (self.shape[axis] - 1 - z) if flipped else z

    def to_dict(self) -> dict:
        return {
            "affine": [list(r) for r in self.affine],
            "shape": list(self.shape),
            "axcodes": self.axcodes,
            "spacing": list(self.spacing),
        }


def _header_class(raw: bytes, name: str):
    if len(raw) < 348:
        raise BadInputError(f"{name}: truncated or not a NIfTI file ({len(raw)} bytes)")
    for order in ("<", ">"):
        size = int(np.frombuffer(raw[:4], dtype=order + "i4")[0])
        if size == 348:
            return nib.Nifti1Header
        if size == 540:
            return nib.Nifti2Header
    raise BadInputError(f"{name}: not a NIfTI-1/2 file (bad header size); expected .nii or .nii.gz")


def parse_nifti(data: bytes, name: str = "<bytes>") -> Tuple[np.ndarray, Geometry]:
    """Decode NIfTI bytes (.nii or .nii.gz) into a read-only file-order array and its geometry.

    Args:
        data: the file's bytes, gzip-compressed or not.
        name: how errors name the input.
    Returns:
        (array, geometry): the voxels in file order (i, j, k), with scl_slope/inter applied (then
        float32; otherwise the stored dtype, e.g. int16 or uint8), viewing the decoded buffer.
    Raises:
        BadInputError: truncated or corrupt file, not NIfTI, not 3-D, absurd dimensions.
    """
    try:
        raw = decompress(data)
    except Exception as exc:  # isal/zlib raise several types for corrupt or cut-off streams
        raise BadInputError(f"{name}: truncated or corrupt gzip data ({exc}); re-download the file") from exc
    header_class = _header_class(raw, name)
    try:
        header = header_class.from_fileobj(io.BytesIO(raw), check=True)
        shape = tuple(int(s) for s in header.get_data_shape())
        dtype = header.get_data_dtype()
        offset = int(header.get_data_offset())
        affine = header.get_best_affine()
        slope, inter = header.get_slope_inter()
    except BadInputError:
        raise
    except Exception as exc:
        raise BadInputError(f"{name}: unreadable NIfTI header ({exc})") from exc
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise BadInputError(f"{name}: data is {len(shape)}-D {shape}; a CT volume must be 3-D")
    if any(not MIN_DIM <= s <= MAX_DIM for s in shape):
        raise BadInputError(f"{name}: implausible dimensions {shape} (each must be {MIN_DIM}..{MAX_DIM})")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise BadInputError(f"{name}: the header's affine is singular or not finite")
    count = math.prod(shape)
    needed = offset + count * dtype.itemsize
    if len(raw) < needed:
        raise BadInputError(
            f"{name}: truncated: the header promises {needed} bytes, the file holds {len(raw)}; re-download it"
        )
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape, order="F")
    if not dtype.isnative:
        array = array.astype(dtype.newbyteorder("="))
    scaled = slope is not None and not (np.isnan(slope) or slope in (0.0, 1.0)) or (
        inter is not None and not np.isnan(inter) and inter != 0.0
    )
    if scaled:
        array = array.astype(np.float32) * np.float32(slope if slope and not np.isnan(slope) else 1.0)
        array += np.float32(inter if inter and not np.isnan(inter) else 0.0)
    return array, Geometry.from_affine(affine, shape)


def read_nifti(uri: str, s3_endpoint: Optional[str] = None) -> Tuple[np.ndarray, Geometry]:
    """Read a .nii / .nii.gz from any URI; see `parse_nifti`."""
    try:
        data = storage.read_bytes(uri, s3_endpoint)
    except Exception as exc:
        raise BadInputError(f"{uri}: cannot read ({exc})") from exc
    return parse_nifti(data, uri)


def _chunks(n: int, step: int = 32):
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def check_hu(hu: np.ndarray, name: str) -> None:
    """Raise BadInputError unless every voxel is finite (integer volumes always are)."""
    if hu.dtype.kind == "f":
        lo, hi = float(np.min(hu)), float(np.max(hu))  # NaN or inf propagate into min/max
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise BadInputError(f"{name}: contains NaN or infinite HU values; fix or exclude the volume")


def as_labels(segmentation: np.ndarray, name: str) -> np.ndarray:
    """Validate a segmentation and return it as uint8 labels (a view when already uint8).

    Raises BadInputError unless every value is one of LABELS (float 0.0/1.0/2.0 is accepted).
    """
    if segmentation.dtype == np.uint8:
        # One reduction over the file-order buffer, no copy; the bad values only on failure.
        if segmentation.max() > 2:
            bad = [int(v) for v in np.unique(segmentation) if v > 2]
            raise BadInputError(f"{name}: labels {bad[:5]} outside {{0, 1, 2}}; expected 0 background, 1 liver, 2 tumour")
        return segmentation
    out = np.empty(segmentation.shape, dtype=np.uint8)
    # Chunks along the last file axis keep temporaries to a few slices.
    for sl in _chunks(segmentation.shape[-1]):
        part = segmentation[..., sl]
        if part.dtype.kind == "f" and not np.all(np.isfinite(part)):
            raise BadInputError(f"{name}: segmentation contains NaN or infinite values")
        rounded = np.rint(part) if part.dtype.kind == "f" else part
        if part.dtype.kind == "f" and np.any(rounded != part):
            raise BadInputError(f"{name}: segmentation has non-integral values; expected labels 0, 1, 2")
        lo, hi = rounded.min(), rounded.max()
        if lo < 0 or hi > 2:
            bad = sorted({int(v) for v in np.unique(rounded) if v < 0 or v > 2})
            raise BadInputError(f"{name}: labels {bad[:5]} outside {{0, 1, 2}}; expected 0 background, 1 liver, 2 tumour")
        out[..., sl] = rounded
    return out


def nifti_bytes(array: np.ndarray, affine: np.ndarray, compress: bool = True, level: int = 1) -> bytes:
    """Serialise a file-order array with `affine` to NIfTI-1 bytes (.nii.gz when compress)."""
    image = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    image.header.set_xyzt_units("mm", "sec")
    image.header.set_qform(image.affine, code=1)
    image.header.set_sform(image.affine, code=1)
    raw = image.to_bytes()
    # ISA-L's level 1 is ~6x faster than zlib's and smaller on label masks.
    return _gzip_impl.compress(raw, compresslevel=level, mtime=0) if compress else raw


def write_nifti(uri: str, array: np.ndarray, affine: np.ndarray, s3_endpoint: Optional[str] = None) -> None:
    """Write atomically; gzip when `uri` ends with .gz."""
    storage.write_bytes(uri, nifti_bytes(array, affine, compress=uri.endswith(".gz")), s3_endpoint)
