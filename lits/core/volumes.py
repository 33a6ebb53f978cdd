"""NIfTI read / validate / canonicalise / save, and the geometry record that undoes it.

Reading is bounded by what the header declares: the header (the first 348 or 540 decoded bytes) is
read and checked first (3-D, real-valued voxels, at most MAX_VOXELS), then exactly the voxels it
declares are inflated (lits.core.inflate: streamed, capped per call) into one preallocated buffer;
whatever follows them is refused without inflating it. A few megabytes of gzip that would inflate to
gigabytes therefore cost one header's worth of memory and a one-line error.
Canonical layout and axis names: see lits.core.schema.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from lits.core import storage
from lits.core.errors import BadInputError
from lits.core.inflate import DecodedStream

log = logging.getLogger(__name__)

try:  # ISA-L's level 1 is ~6x faster than zlib's; fall back to zlib where no wheel exists
    from isal import igzip as _gzip_impl
except ImportError:  # pragma: no cover - exercised only where isal is missing
    import gzip as _gzip_impl

# The file axes are first brought to LPS, then transposed to (S, P, L) = (Z, H, W).
CANONICAL_AXCODES = ("L", "P", "S")
# A dimension outside these bounds is not a CT volume (or a corrupt header).
MIN_DIM, MAX_DIM = 2, 4096
# The most voxels a header may declare: 4x the largest LiTS volume (512 x 512 x 987 = 2.6e8), so
# a corrupt or crafted header cannot make a reader allocate gigabytes. prepare's --max-voxels
# overrides it; serving uses it as is.
MAX_VOXELS = 2 ** 30
# Extensions between the header and the voxels: more than this is no real file's.
MAX_DATA_OFFSET = 64 << 20
_HEADER_CHUNK = 64 << 10  # file bytes read to reach a header: one small (range) read
_DATA_CHUNK = 16 << 20  # file bytes read at a time for the voxels
# What a read holds besides the voxels: one chunk of the file and one inflated piece (lits.core.inflate).
READ_BUFFER_BYTES = 2 * _DATA_CHUNK


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


@dataclass(frozen=True)
class Header:
    """What a NIfTI header declares, checked before any voxel is read.

    Attributes:
        shape: the file array's shape (i, j, k), trailing singleton dimensions dropped.
        dtype: the stored voxel type (real: int, uint or float).
        header_bytes: 348 (NIfTI-1) or 540 (NIfTI-2).
        offset: where the voxels start in the decoded file.
        scaling: (slope, inter) applied on read (voxels become float32), or None.
        geometry: the affine and what follows from it.
    """

    shape: Tuple[int, int, int]
    dtype: np.dtype
    header_bytes: int
    offset: int
    scaling: Optional[Tuple[float, float]]
    geometry: Geometry

    @property
    def voxels(self) -> int:
        return math.prod(self.shape)

    @property
    def file_bytes(self) -> int:
        """The decoded file's size: the header, its extensions and the voxels, nothing after."""
        return self.offset + self.voxels * self.dtype.itemsize

    @property
    def array_bytes(self) -> int:
        """The size of the array a read returns."""
        return self.voxels * (4 if self.scaling else self.dtype.itemsize)


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


def _scaling(slope, inter) -> Optional[Tuple[float, float]]:
    slope_set = slope is not None and not (np.isnan(slope) or slope in (0.0, 1.0))
    inter_set = inter is not None and not np.isnan(inter) and inter != 0.0
    if not (slope_set or inter_set):
        return None
    return (float(slope) if slope and not np.isnan(slope) else 1.0, float(inter) if inter_set else 0.0)


def _read_header(stream: DecodedStream, name: str, max_voxels: int) -> Header:
    """Read and check the header at the start of `stream` (only its bytes are inflated)."""
    raw = stream.read(348)
    header_class = _header_class(raw, name)
    if header_class is nib.Nifti2Header:
        raw += stream.read(540 - 348)
        if len(raw) < 540:
            raise BadInputError(f"{name}: truncated NIfTI-2 header ({len(raw)} of 540 bytes); re-download the file")
    try:
        header = header_class.from_fileobj(io.BytesIO(raw), check=True)
        shape = tuple(int(s) for s in header.get_data_shape())
        dtype = header.get_data_dtype()
        kind = header.get_value_label("datatype")
        offset = int(header.get_data_offset())
        affine = header.get_best_affine()
        slope, inter = header.get_slope_inter()
    except Exception as exc:
        raise BadInputError(f"{name}: unreadable NIfTI header ({exc})") from exc
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise BadInputError(f"{name}: data is {len(shape)}-D {shape}; a CT volume must be 3-D")
    if dtype.fields is not None or dtype.kind not in "iuf":
        raise BadInputError(f"{name}: voxels are {kind} ({dtype.name if dtype.fields is None else 'RGB'}), not one "
                            "real number each; save HU as int16 or float32 and labels as uint8")
    if any(not MIN_DIM <= s <= MAX_DIM for s in shape):
        raise BadInputError(f"{name}: implausible dimensions {shape} (each must be {MIN_DIM}..{MAX_DIM})")
    count = math.prod(shape)
    if count > max_voxels:
        raise BadInputError(f"{name}: the header declares {shape[0]}x{shape[1]}x{shape[2]} = {count} voxels, over the "
                            f"limit of {max_voxels}; a corrupt or crafted file (prepare's --max-voxels raises the limit)")
    if not len(raw) <= offset <= MAX_DATA_OFFSET:
        raise BadInputError(f"{name}: the header puts the voxels at byte {offset}, outside {len(raw)}..{MAX_DATA_OFFSET} "
                            "(a .hdr of a .hdr/.img pair, or corrupt); save the volume as one .nii.gz")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise BadInputError(f"{name}: the header's affine is singular or not finite")
    return Header(shape=shape, dtype=dtype, header_bytes=len(raw), offset=offset,
                  scaling=_scaling(slope, inter), geometry=Geometry.from_affine(affine, shape))


def _decode(stream: DecodedStream, name: str, max_voxels: int) -> Tuple[np.ndarray, Geometry]:
    header = _read_header(stream, name, max_voxels)
    held = header.header_bytes + stream.skip(header.offset - header.header_bytes)
    raw = np.empty(header.voxels * header.dtype.itemsize, np.uint8)
    held += stream.readinto(memoryview(raw))
    if held < header.file_bytes:
        raise BadInputError(
            f"{name}: truncated: the header promises {header.file_bytes} bytes, the file holds {held}; re-download it"
        )
    if not stream.at_end():
        raise BadInputError(f"{name}: data continue after the {header.file_bytes} bytes the header declares (trailing "
                            "data: a corrupt or crafted file); re-export the volume")
    array = raw.view(header.dtype).reshape(header.shape, order="F")
    if not header.dtype.isnative:
        array = array.byteswap(inplace=True).view(header.dtype.newbyteorder("="))
    if header.scaling:
        scaled = array.astype(np.float32)
        del array, raw
        scaled *= np.float32(header.scaling[0])
        scaled += np.float32(header.scaling[1])
        array = scaled
    array.flags.writeable = False
    return array, header.geometry


def parse_nifti(data: bytes, name: str = "<bytes>", max_voxels: int = MAX_VOXELS) -> Tuple[np.ndarray, Geometry]:
    """Decode NIfTI bytes (.nii or .nii.gz) into a read-only file-order array and its geometry.

    Args:
        data: the file's bytes, gzip-compressed or not.
        name: how errors name the input.
        max_voxels: the most voxels the header may declare.
    Returns:
        (array, geometry): the voxels in file order (i, j, k), with scl_slope/inter applied (then
        float32; otherwise the stored dtype, e.g. int16 or uint8), in native byte order.
    Raises:
        BadInputError: truncated or corrupt file, not NIfTI, not 3-D, complex or RGB voxels, absurd
            dimensions, more than `max_voxels` voxels, data after the declared voxels.
    """
    return _decode(DecodedStream([data], name), name, max_voxels)


@contextlib.contextmanager
def _file(uri: str, chunk_size: int) -> Iterator[DecodedStream]:
    """The file at `uri` as a `DecodedStream` stream read `chunk_size` bytes at a time."""
    def chunks() -> Iterator[bytes]:
        try:
            yield from storage.iter_bytes(uri, chunk_size)
        except Exception as exc:
            raise BadInputError(f"{uri}: cannot read ({exc})") from exc

    reader = chunks()
    try:
        yield DecodedStream(reader, uri)
    finally:
        reader.close()


def read_nifti(uri: str, max_voxels: int = MAX_VOXELS) -> Tuple[np.ndarray, Geometry]:
    """Read a .nii / .nii.gz from any URI, streamed (never the whole file in memory); see `parse_nifti`."""
    with _file(uri, _DATA_CHUNK) as stream:
        return _decode(stream, uri, max_voxels)


def read_header(uri: str, max_voxels: int = MAX_VOXELS) -> Header:
    """Read and check only the header of a .nii / .nii.gz (one small read); see `parse_nifti`."""
    with _file(uri, _HEADER_CHUNK) as stream:
        return _read_header(stream, uri, max_voxels)


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


def write_nifti(uri: str, array: np.ndarray, affine: np.ndarray) -> None:
    """Write atomically; gzip when `uri` ends with .gz."""
    storage.write_bytes(uri, nifti_bytes(array, affine, compress=uri.endswith(".gz")))
