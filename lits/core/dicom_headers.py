"""DICOM file headers and a series' geometry: the records, one file's header, the checks that make a
stack of slices one regular volume, and its voxel -> RAS+ affine.

Axis order of a DICOM series here (the file layout `lits.core.dicom.read_series` returns): i = column
index (along ImageOrientationPatient[0:3], PixelSpacing[1] apart), j = row index (along IOP[3:6],
PixelSpacing[0] apart), k = slice index in ascending position along the slice normal
(IOP[0:3] x IOP[3:6]). DICOM positions are LPS; the affine is RAS+ like NIfTI's.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import pydicom

from lits.core import storage
from lits.core.errors import BadInputError, UserError

log = logging.getLogger(__name__)

# Slices of one volume may differ in spacing by this much (mm, or this fraction of the spacing,
# whichever is larger) before the series counts as unevenly spaced: a voxel grid would misplace them.
SPACING_TOL_MM, SPACING_TOL_REL = 0.01, 0.01
# A step over this many spacings is a missing slice (rather than uneven spacing).
GAP_FACTOR = 1.5
# Two slices closer than this along the normal are duplicates.
DUPLICATE_MM = 1e-3
# In-plane drift of a slice from the first slice's normal line allowed before the series counts as
# tilted (gantry tilt, or shifted slices): this many mm plus this fraction of the distance along
# the normal (2e-3 = 0.11 degrees). Below it a voxel is misplaced by far less than its size.
TILT_ABS_MM, TILT_REL = 0.05, 2e-3
# Same pixel spacing / orientation within a series: relative and absolute tolerances.
PIXEL_SPACING_REL, ORIENTATION_ABS = 1e-4, 1e-4
# The file bytes read for a header (with the usual few kB of tags, one read).
_HEADER_BLOCK = 256 << 10


@dataclass(frozen=True)
class SliceHeader:
    """One DICOM file's header: what grouping, selection and ordering need (small and picklable).

    Attributes:
        uri: the file; size: its bytes; folder: the uri's parent.
        sop_instance_uid, sop_class_uid: the dataset's, else the file meta's Media Storage ones.
        series_uid, study_uid, frame_of_reference_uid: '' when blank or missing.
        modality: e.g. 'CT'; image_type: ImageType values, upper case ('ORIGINAL', 'PRIMARY', ...).
        position: ImagePositionPatient (LPS mm); orientation: ImageOrientationPatient (6); None when
            missing or malformed.
        pixel_spacing: PixelSpacing (row spacing, column spacing) in mm.
        rows, columns: the image size; series_number: SeriesNumber or None.
        transfer_syntax: the file meta's TransferSyntaxUID ('' when missing).
        frames: NumberOfFrames (1 for the single-frame images read here).
        rescale_slope, rescale_intercept: HU = stored * slope + intercept (1 and 0 when missing).
        bits_stored, pixel_signed: the stored values' range (BitsStored, PixelRepresentation == 1).
    """

    uri: str
    size: int
    folder: str
    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    modality: str
    image_type: Tuple[str, ...]
    position: Optional[Tuple[float, float, float]]
    orientation: Optional[Tuple[float, ...]]
    pixel_spacing: Optional[Tuple[float, float]]
    rows: int
    columns: int
    series_number: Optional[int]
    series_description: str
    transfer_syntax: str
    frames: int = 1
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    bits_stored: int = 16
    pixel_signed: bool = False


@dataclass(frozen=True)
class Skipped:
    """A file or a series left out, and why: `what` names it, `reason` is one line; `failed`: a CT
    series that would be segmented but whose geometry cannot make a volume (a bulk job counts it
    as a failed input), rather than a file that is not meant to be (a scout, an MR image)."""

    what: str
    reason: str
    failed: bool = False

    def __str__(self) -> str:
        return f"{self.what}: {self.reason}"


@dataclass(frozen=True)
class Series:
    """One selected CT series, ready for `lits.core.dicom.read_series`.

    Attributes:
        key: SeriesInstanceUID, or (blank UID) 'folder|FrameOfReferenceUID|orientation|rowsxcolumns'.
        name: short readable name for messages and output names: the folder's name, or
            '<folder name>/series-<SeriesNumber or short hash>' where a folder holds several series.
        folder: where the files are.
        files: the files' URIs sorted along the slice normal (ascending position on it).
        headers: their headers, same order.
        study_uid, series_uid, frame_of_reference_uid: the source's, or derived deterministically
            (pydicom.uid.generate_uid with entropy sources) where it left them blank.
        uids_derived: whether any of them (or a SOP Instance UID) was derived.
    """

    key: str
    name: str
    folder: str
    files: Tuple[str, ...]
    headers: Tuple[SliceHeader, ...]
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    uids_derived: bool

    @property
    def slices(self) -> int:
        return len(self.files)

    @property
    def voxels(self) -> int:
        h = self.headers[0]
        return h.rows * h.columns * len(self.headers)

    @property
    def file_bytes(self) -> int:
        return sum(h.size for h in self.headers)


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _floats(ds, keyword: str, count: int) -> Optional[Tuple[float, ...]]:
    value = ds.get(keyword)
    try:
        floats = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return floats if len(floats) == count and all(np.isfinite(floats)) else None


def _int(ds, keyword: str, default=None):
    try:
        value = ds.get(keyword)
        return default if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return default


def _float(ds, keyword: str, default: float) -> float:
    try:
        value = ds.get(keyword)
        value = default if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return default
    return value if np.isfinite(value) else default


def transfer_syntax_of(ds: pydicom.Dataset) -> str:
    """The file meta's TransferSyntaxUID; for a bare dataset (no file meta) the uncompressed syntax
    it was parsed as ('' when unknown)."""
    meta = getattr(ds, "file_meta", None) or {}
    syntax = _text(meta, "TransferSyntaxUID")
    if syntax:
        return syntax
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        return ""
    if implicit:
        return pydicom.uid.ImplicitVRLittleEndian
    return pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian


def _looks_like_dicom(head: bytes) -> bool:
    """A Part 10 file ('DICM' at 128), or a bare dataset starting with a group 0002/0008 tag."""
    return head[128:132] == b"DICM" or head[:2] in (b"\x02\x00", b"\x08\x00")


def header_from_dataset(ds: pydicom.Dataset, uri: str, size: int) -> SliceHeader:
    """The SliceHeader of a dataset read from `uri` (`size` bytes)."""
    meta = getattr(ds, "file_meta", None) or {}
    image_type = ds.get("ImageType", ())
    image_type = (image_type,) if isinstance(image_type, str) else tuple(image_type or ())
    spacing = _floats(ds, "PixelSpacing", 2)
    return SliceHeader(
        uri=uri, size=int(size), folder=_parent(uri),
        sop_instance_uid=_text(ds, "SOPInstanceUID") or _text(meta, "MediaStorageSOPInstanceUID"),
        sop_class_uid=_text(ds, "SOPClassUID") or _text(meta, "MediaStorageSOPClassUID"),
        series_uid=_text(ds, "SeriesInstanceUID"), study_uid=_text(ds, "StudyInstanceUID"),
        frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"), modality=_text(ds, "Modality").upper(),
        image_type=tuple(str(v).strip().upper() for v in image_type if str(v).strip()),
        position=_floats(ds, "ImagePositionPatient", 3), orientation=_floats(ds, "ImageOrientationPatient", 6),
        pixel_spacing=spacing if spacing and min(spacing) > 0 else None,
        rows=_int(ds, "Rows", 0), columns=_int(ds, "Columns", 0), series_number=_int(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription"), transfer_syntax=transfer_syntax_of(ds),
        frames=_int(ds, "NumberOfFrames", 1) or 1, rescale_slope=_float(ds, "RescaleSlope", 1.0),
        rescale_intercept=_float(ds, "RescaleIntercept", 0.0), bits_stored=_int(ds, "BitsStored", 16) or 16,
        pixel_signed=_int(ds, "PixelRepresentation", 0) == 1,
    )


def _parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri else ""


def header_from_file(f, uri: str, size: int) -> Union[SliceHeader, Skipped]:
    """The header of the DICOM file open as binary `f` (read up to the pixel data); Skipped when it is
    not DICOM or holds no image."""
    head = f.read(132)
    if not _looks_like_dicom(head):
        return Skipped(uri, "not a DICOM file")
    f.seek(0)
    try:
        ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        header = header_from_dataset(ds, uri, size)
    except Exception as exc:  # pydicom raises many types on a malformed file; each is this file's fault
        return Skipped(uri, f"not a readable DICOM file ({type(exc).__name__}: {str(exc)[:120]})")
    if not header.rows or not header.columns:
        return Skipped(uri, f"no image in this DICOM file (SOP class {header.sop_class_uid or 'missing'})")
    return header


def read_header(uri: str) -> Union[SliceHeader, Skipped]:
    """One file's header (pixel data not read: one small read, local or s3://).

    Returns Skipped (what = uri) when the file is not DICOM or holds no image (no Rows/Columns);
    raises storage's UserError when it cannot be read at all.
    """
    fs, path = storage.filesystem(uri)
    with storage.user_errors(uri, "read"), fs.open(path, "rb", block_size=_HEADER_BLOCK) as f:
        size = getattr(f, "size", None)
        return header_from_file(f, uri, fs.size(path) if size is None else size)


def read_headers(uris: Sequence[str], threads: int = 16) -> Tuple[List[SliceHeader], List[Skipped]]:
    """`read_header` over many files on `threads` threads (reads are I/O bound); input order kept. A file
    that cannot be read (gone since it was listed, permission denied) is Skipped with the reason."""
    if not uris:
        return [], []
    def one(uri: str) -> Union[SliceHeader, Skipped]:
        try:
            return read_header(uri)
        except UserError as exc:  # gone or unreadable since it was listed: this file only
            return Skipped(uri, str(exc))

    with ThreadPoolExecutor(max(1, min(threads, len(uris)))) as pool:
        results = list(pool.map(one, uris))
    return [r for r in results if isinstance(r, SliceHeader)], [r for r in results if isinstance(r, Skipped)]


def normal_of(orientation: Sequence[float]) -> np.ndarray:
    """The unit slice normal (LPS) of an ImageOrientationPatient: row direction x column direction."""
    iop = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    return normal / np.linalg.norm(normal)


def is_axial(orientation: Sequence[float]) -> bool:
    """Whether the slice normal lies closest to the patient's S axis (as the canonical layout sees it)."""
    n = np.abs(normal_of(orientation))
    return bool(n[2] >= n[0] and n[2] >= n[1])


def _same_image_grid(headers: Sequence[SliceHeader]) -> Optional[str]:
    """Why the slices cannot share one image grid (sizes, spacings, orientations), or None."""
    sizes = sorted({(h.rows, h.columns) for h in headers})
    if len(sizes) > 1:
        return "mixed image sizes " + ", ".join(f"{r}x{c}" for r, c in sizes[:4]) + " (rows x columns)"
    first = headers[0]
    if any(h.pixel_spacing is None or h.orientation is None or h.position is None for h in headers):
        return "a slice lacks ImagePositionPatient, ImageOrientationPatient or PixelSpacing"
    spacing = np.array([h.pixel_spacing for h in headers])
    if np.any(np.abs(spacing - spacing[0]) > PIXEL_SPACING_REL * spacing[0]):
        return "mixed pixel spacings " + ", ".join(sorted({f"{a:g}x{b:g}" for a, b in spacing})[:4]) + " mm"
    iops = np.array([h.orientation for h in headers])
    if np.any(np.abs(iops - iops[0]) > ORIENTATION_ABS):
        return "mixed image orientations (ImageOrientationPatient differs between slices)"
    iop = np.asarray(first.orientation)
    norms = np.linalg.norm(iop[:3]), np.linalg.norm(iop[3:])
    if abs(norms[0] - 1) > 1e-3 or abs(norms[1] - 1) > 1e-3 or abs(float(iop[:3] @ iop[3:])) > 1e-3:
        return f"ImageOrientationPatient {list(first.orientation)} is not two orthogonal unit vectors"
    return None


def _spacing_problem(steps: np.ndarray, along: np.ndarray) -> Optional[str]:
    """Why sorted positions `along` the normal (steps = their differences) are not one even grid."""
    if np.any(steps < DUPLICATE_MM):
        k = int(np.argmax(steps < DUPLICATE_MM))
        count = int(np.sum(steps < DUPLICATE_MM))
        return (f"duplicate slice positions: {count + 1} or more slices share a position (e.g. {along[k]:.3f} mm "
                "along the normal); keep one acquisition per series")
    spacing = float(np.median(steps))
    gaps = np.nonzero(steps > GAP_FACTOR * spacing)[0]
    if gaps.size:
        k = int(gaps[0])
        return (f"missing slice(s): a gap of {steps[k]:.3f} mm after slice {k} of {steps.size + 1} where slices are "
                f"{spacing:.3f} mm apart; export the complete series")
    tolerance = max(SPACING_TOL_MM, SPACING_TOL_REL * spacing)
    if np.max(np.abs(steps - spacing)) > tolerance:
        return (f"uneven slice spacing: {steps.min():.3f} to {steps.max():.3f} mm (tolerance {tolerance:.3f} mm); "
                "resample to even spacing first")
    return None


def series_geometry(headers: Sequence[SliceHeader], name: str) -> Tuple[List[int], np.ndarray]:
    """Check that the slices make one regular volume; return their order and its affine.

    Args:
        headers: one series' slices, any order.
        name: how the message names the series.
    Returns:
        (order, affine): indices into `headers` ascending along the slice normal (k = 0, 1, ...);
        float64 (4, 4) affine mapping (i = column, j = row, k) to RAS+ mm.
    Raises:
        BadInputError (one line naming `name`): mixed sizes, spacings or orientations, a missing
            position, duplicate positions, a missing slice, uneven spacing, gantry tilt.
    """
    if not headers:
        raise BadInputError(f"{name}: no slices")
    problem = _same_image_grid(headers)
    if problem:
        raise BadInputError(f"{name}: {problem}")
    first = headers[0]
    normal = normal_of(first.orientation)
    positions = np.array([h.position for h in headers], dtype=np.float64)
    along_all = positions @ normal
    order = [int(i) for i in np.argsort(along_all, kind="stable")]
    positions, along = positions[order], along_all[order]
    if len(headers) > 1:
        problem = _spacing_problem(np.diff(along), along)
        if problem:
            raise BadInputError(f"{name}: {problem}")
        offsets = positions - positions[0]
        distance = along - along[0]
        drift = np.linalg.norm(offsets - distance[:, None] * normal[None, :], axis=1)
        if np.any(drift > TILT_ABS_MM + TILT_REL * distance):
            k = int(np.argmax(drift - TILT_REL * distance))
            degrees = float(np.degrees(np.arctan2(drift[k], max(distance[k], 1e-9))))
            raise BadInputError(
                f"{name}: gantry tilt or shifted slices: slice {k} sits {drift[k]:.2f} mm off the slice normal through "
                f"slice 0 ({degrees:.1f} degrees); reconstruct without tilt or resample to an untilted grid")
        step = (along[-1] - along[0]) / (len(headers) - 1)
    else:
        step = float(first.pixel_spacing[0])  # one slice: any thickness; nothing is placed by it
    iop = np.asarray(first.orientation, dtype=np.float64)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * first.pixel_spacing[1]
    lps[:3, 1] = iop[3:] * first.pixel_spacing[0]
    lps[:3, 2] = normal * step
    lps[:3, 3] = positions[0]
    return order, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
