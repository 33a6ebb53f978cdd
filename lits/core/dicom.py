"""DICOM CT series in: discovery under any local or s3:// prefix, a series' identity, and the HU volume
with its exact geometry; an uploaded zip of one series. The API of DICOM input (the records and
the selection rules live in dicom_headers and dicom_select and are re-exported here).

    series, skipped = discover_series("s3://bucket/studies/")     # headers only: small reads
    hu, geometry, datasets = read_series(series[0])                # HU (i, j, k), Geometry, headers

Bad geometry is found twice: `group_series` leaves such a series out as one Skipped line, and
`read_series` checks again (its input may come from elsewhere, or its files may have changed) and
raises one BadInputError naming the series. Nothing here ever returns a volume on a wrong grid.
Layout of the returned array: file layout (i = column, j = row, k = slice ascending along the
normal), as `volumes.read_nifti` returns a NIfTI's; `Geometry.to_canonical` views it as (Z, H, W).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pydicom

from lits.core import naming, storage, volumes
from lits.core.dicom_headers import (Series, SliceHeader, Skipped, header_from_dataset, header_from_file,  # noqa: F401
                                     read_header, read_headers, series_geometry)
from lits.core.dicom_select import group_series  # noqa: F401
from lits.core.errors import BadInputError
from lits.core.volumes import Geometry

log = logging.getLogger(__name__)

# Files a discovery never opens: the product's own outputs, NIfTI, pictures, text, archives, hidden files.
IGNORED_SUFFIXES = naming.NIFTI_SUFFIXES + naming.PRODUCT_SUFFIXES + (
    "_seg.dcm", ".json", ".png", ".jpg", ".jpeg", ".txt", ".csv", ".md", ".parquet", ".zip", ".pdf", ".html", ".xml")
IGNORED_NAMES = ("DICOMDIR",)
# An uploaded zip of one series: at most this many members and inflated bytes.
MAX_ZIP_FILES = 10_000
MAX_ZIP_BYTES = 4 << 30
_DECODERS = "pylibjpeg with pylibjpeg-openjpeg (JPEG 2000), pylibjpeg-libjpeg (JPEG), pyjpegls (JPEG-LS)"


def ignored(uri: str) -> bool:
    """Whether discovery passes a file over without opening it (outputs, NIfTI, pictures, text...)."""
    name = storage.basename(uri)
    return name.startswith(".") or name in IGNORED_NAMES or name.lower().endswith(IGNORED_SUFFIXES)


def discover_series(prefix: str, threads: int = 16, exclude: Sequence[str] = ()) -> Tuple[List[Series], List[Skipped]]:
    """The CT series under `prefix` (local or s3://, any layout, names with or without .dcm).

    Args:
        prefix: a folder, bucket prefix or one file.
        threads: header reads in flight (each a small read).
        exclude: prefixes (e.g. the job's output) whose files are not looked at.
    Returns:
        (series, skipped) as `group_series`, plus one Skipped per file that is not DICOM. NIfTI,
        pictures, JSON and the product's own outputs are passed over silently.
    Raises:
        UserError: `prefix` does not exist or cannot be listed.
    """
    excluded = [storage.normalise(e).rstrip("/") for e in exclude]
    uris = [u for u in storage.list_files(prefix) if not ignored(u)
            and not any(u == e or u.startswith(e + "/") for e in excluded)]
    headers, skipped = read_headers(uris, threads)
    series, left_out = group_series(headers)
    log.info("%s: %d DICOM file(s), %d CT series selected, %d skipped", prefix, len(headers), len(series),
             len(skipped) + len(left_out))
    return series, skipped + left_out


def series_identity(series: Series, threads: int = 16) -> Dict:
    """What the series' files are now, from their metadata (one stat or HEAD each, never a read):
    {'name', 'key', 'count', 'size', 'files_hash'}; files_hash is a SHA-256 of every file's (uri,
    size, etag or mtime), so a replaced, added-to or truncated file changes it.
    """
    with ThreadPoolExecutor(max(1, min(threads, len(series.files)))) as pool:
        found = list(pool.map(storage.identity, series.files))
    digest = hashlib.sha256(json.dumps(sorted(found, key=lambda f: f["uri"]), sort_keys=True).encode()).hexdigest()
    return {"name": series.name, "key": series.key, "count": len(found), "size": sum(f["size"] for f in found),
            "files_hash": digest}


def _stored_range(header: SliceHeader) -> Tuple[int, int]:
    """The values BitsStored and PixelRepresentation allow."""
    bits = min(max(header.bits_stored, 1), 32)
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if header.pixel_signed else (0, (1 << bits) - 1)


def _hu_dtype(headers: Sequence[SliceHeader]) -> np.dtype:
    """int16 where every slice's rescale is exact in int16 (slope 1, integral intercept, the stored
    range shifted still inside int16: the usual CT), else float32."""
    for h in headers:
        if h.rescale_slope != 1.0 or h.rescale_intercept != int(h.rescale_intercept):
            return np.dtype(np.float32)
        lo, hi = _stored_range(h)
        if lo + h.rescale_intercept < -32768 or hi + h.rescale_intercept > 32767:
            return np.dtype(np.float32)
    return np.dtype(np.int16)


def _decode_slice(data: bytes, header: SliceHeader, name: str, out: np.ndarray) -> pydicom.Dataset:
    """Decode one file into `out` (rows, cols) as HU; return its dataset without pixel data."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        now = header_from_dataset(ds, header.uri, len(data))
    except Exception as exc:
        raise BadInputError(f"{name}: {header.uri} is no longer a readable DICOM file ({type(exc).__name__}); "
                            "list the series again") from exc
    if (now.position, now.orientation, now.rows, now.columns, now.rescale_slope, now.rescale_intercept) != (
            header.position, header.orientation, header.rows, header.columns, header.rescale_slope,
            header.rescale_intercept):
        raise BadInputError(f"{name}: {header.uri} changed since the series was listed; list it again")
    syntax = header.transfer_syntax or "missing"
    if header.transfer_syntax and "TransferSyntaxUID" not in (getattr(ds, "file_meta", None) or {}):
        if getattr(ds, "file_meta", None) is None:  # a bare dataset: decoded as it was parsed
            ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = header.transfer_syntax
    try:
        stored = ds.pixel_array
    except Exception as exc:
        label = getattr(pydicom.uid.UID(syntax), "name", syntax) if syntax != "missing" else syntax
        raise BadInputError(f"{name}: cannot decode pixel data (transfer syntax {label}: {str(exc).splitlines()[0][:120]}); "
                            f"install {_DECODERS}, or convert the series to uncompressed DICOM") from exc
    if stored.shape != out.shape:
        raise BadInputError(f"{name}: {header.uri} decodes to shape {stored.shape}, not {out.shape} (rows, columns); "
                            "a colour or multi-frame image is not a CT slice")
    if out.dtype == np.int16:
        lo, hi = _stored_range(header)
        if stored.size and (stored.min() < lo or stored.max() > hi):
            raise BadInputError(f"{name}: {header.uri} holds values outside its BitsStored ({header.bits_stored}); "
                                "a corrupt slice")
        # In int16 arithmetic (modulo 2**16): exact, as every true HU value lies in int16 (_hu_dtype).
        np.copyto(out, stored, casting="unsafe")
        out += np.int16(int(header.rescale_intercept))
    else:
        np.copyto(out, stored, casting="unsafe")
        out *= np.float32(header.rescale_slope)
        out += np.float32(header.rescale_intercept)
    del ds.PixelData
    return ds


def _fill_uids(ds: pydicom.Dataset, header: SliceHeader, series: Series) -> None:
    """Blank UIDs filled as `series` has them (SOP ones from the file meta or derived)."""
    for keyword, value in (("SOPInstanceUID", header.sop_instance_uid), ("SOPClassUID", header.sop_class_uid),
                           ("StudyInstanceUID", series.study_uid), ("SeriesInstanceUID", series.series_uid),
                           ("FrameOfReferenceUID", series.frame_of_reference_uid)):
        if not str(ds.get(keyword, "") or "").strip() and value:
            setattr(ds, keyword, value)


def _read(series: Series, load: Callable[[str], bytes], max_voxels: int,
          threads: int) -> Tuple[np.ndarray, Geometry, List[pydicom.Dataset]]:
    headers = series.headers
    if not headers:
        raise BadInputError(f"{series.name}: no slices")
    first = headers[0]
    count = first.columns * first.rows * len(headers)
    if count > max_voxels:
        raise BadInputError(f"{series.name}: {first.columns}x{first.rows}x{len(headers)} = {count} voxels, over the "
                            f"limit of {max_voxels}; split the series or raise the limit (--max-voxels)")
    order, affine = series_geometry(headers, series.name)
    headers = [headers[i] for i in order]
    dtype = _hu_dtype(headers)
    buffer = np.empty((len(headers), first.rows, first.columns), dtype=dtype)  # (k, row, column)

    def one(k: int) -> pydicom.Dataset:
        header = headers[k]
        ds = _decode_slice(load(header.uri), header, series.name, buffer[k])
        _fill_uids(ds, header, series)
        return ds

    with ThreadPoolExecutor(max(1, min(threads, len(headers)))) as pool:
        datasets = list(pool.map(one, range(len(headers))))
    hu = buffer.transpose(2, 1, 0)  # (i = column, j = row, k): Fortran order, as read_nifti's
    hu.flags.writeable = False
    return hu, Geometry.from_affine(affine, hu.shape), datasets


def read_series(series: Series, max_voxels: int = volumes.MAX_VOXELS,
                threads: int = 4) -> Tuple[np.ndarray, Geometry, List[pydicom.Dataset]]:
    """Read a series' HU volume and geometry (files local or s3://).

    Args:
        series: from `discover_series` / `group_series`.
        max_voxels: refused before any pixel is decoded when the slices hold more voxels.
        threads: files read and decoded at once.
    Returns:
        (hu, geometry, datasets): read-only HU (columns, rows, slices) = (i, j, k), int16 where
        every slice's rescale is exact in int16 (slope 1, integral intercept), else float32;
        `Geometry` whose affine maps (i, j, k) to RAS+ mm; the slices' datasets (pixel data
        dropped) in k order, blank UIDs filled as `series` has them.
    Raises:
        BadInputError (one line naming the series): too many voxels, bad geometry, undecodable
            pixel data (the transfer syntax and the decoder to install), a file changed or gone.
    """
    def load(uri: str) -> bytes:
        try:
            return storage.read_bytes(uri)
        except Exception as exc:
            raise BadInputError(f"{series.name}: cannot read {uri} ({exc})") from exc

    return _read(series, load, max_voxels, threads)


def series_from_files(files: Mapping[str, bytes], name: str) -> Series:
    """The one CT series among uploaded files {relative name: bytes}, named `name`.

    Raises:
        BadInputError: no CT series among them (with the first reasons), or more than one.
    """
    headers, skipped = [], []
    for relative, data in sorted(files.items()):
        found = header_from_file(io.BytesIO(data), f"{name}/{relative}", len(data))
        (headers if isinstance(found, SliceHeader) else skipped).append(found)
    series, left_out = group_series(headers)
    skipped += left_out
    if not series:
        why = "; ".join(str(s) for s in skipped[:2]) or "no files"
        raise BadInputError(f"{name}: no CT series to read ({why}); upload the slices of one axial CT series")
    if len(series) > 1:
        raise BadInputError(f"{name}: {len(series)} CT series ({', '.join(s.name for s in series[:4])}); upload one "
                            "series at a time")
    found = series[0]
    return Series(key=found.key, name=name, folder=found.folder, files=found.files, headers=found.headers,
                  study_uid=found.study_uid, series_uid=found.series_uid,
                  frame_of_reference_uid=found.frame_of_reference_uid, uids_derived=found.uids_derived)


def read_series_bytes(files: Mapping[str, bytes], name: str, max_voxels: int = volumes.MAX_VOXELS,
                      threads: int = 4, series: Optional[Series] = None) -> Tuple[np.ndarray, Geometry, List[pydicom.Dataset]]:
    """`read_series` of the one CT series among uploaded files {relative name: bytes} (`series`: their
    `series_from_files`, when the caller has it already)."""
    series = series or series_from_files(files, name)
    by_uri = {f"{name}/{relative}": data for relative, data in files.items()}
    return _read(series, by_uri.__getitem__, max_voxels, threads)


def unzip_series(data: bytes, name: str, max_bytes: int = MAX_ZIP_BYTES,
                 max_files: int = MAX_ZIP_FILES) -> Dict[str, bytes]:
    """The members of a zip {relative name: bytes}, refusing zip bombs and path tricks (one line).

    Folders, hidden files and __MACOSX/ are passed over. Each member is inflated no further than it
    declares, and all of them no further than `max_bytes`.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in archive.infolist() if not m.is_dir()]
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise BadInputError(f"{name}: not a readable zip archive ({exc}); upload a .zip of the series' files") from exc
    if len(members) > max_files:
        raise BadInputError(f"{name}: {len(members)} files in the zip, over the limit of {max_files}; "
                            "upload one series")
    declared = sum(m.file_size for m in members)
    if declared > max_bytes:
        raise BadInputError(f"{name}: the zip inflates to {declared} bytes, over the limit of {max_bytes}")
    files = {}
    for member in members:
        parts = member.filename.replace("\\", "/").split("/")
        if member.filename.startswith(("/", "\\")) or ":" in parts[0] or ".." in parts or any(ord(c) < 32 for c in member.filename):
            raise BadInputError(f"{name}: the zip member {member.filename!r} has an absolute or '..' path; "
                                "zip the series' files with relative names")
        if parts[0] == "__MACOSX" or parts[-1].startswith("."):
            continue
        try:
            with archive.open(member) as f:
                content = f.read(member.file_size + 1)
        except (zipfile.BadZipFile, NotImplementedError, OSError, RuntimeError) as exc:
            raise BadInputError(f"{name}: cannot unpack {member.filename!r} ({exc}); re-create the zip") from exc
        if len(content) != member.file_size:
            raise BadInputError(f"{name}: {member.filename!r} inflates to more or less than the {member.file_size} "
                                "bytes its entry declares; a corrupt or crafted zip")
        files["/".join(p for p in parts if p not in ("", "."))] = content
    return files


def read_series_zip(data: bytes, name: str, max_bytes: int = MAX_ZIP_BYTES, max_files: int = MAX_ZIP_FILES,
                    max_voxels: int = volumes.MAX_VOXELS) -> Tuple[np.ndarray, Geometry, List[pydicom.Dataset]]:
    """`read_series` of an uploaded zip holding ONE CT series (any folder layout inside)."""
    return read_series_bytes(unzip_series(data, name, max_bytes, max_files), name, max_voxels)
