"""Small CT (or MR) DICOM series written with pydicom, for tests: known HU, known geometry.

    write_series(folder, shape=(rows, cols, slices), spacing=(row_mm, col_mm, slice_mm), ...) -> paths

Slice k is written at `position0 + k * spacing[2] * normal` (normal = row direction x column
direction of `orientation`) unless `positions` gives each slice's ImagePositionPatient. `hu` is
indexed [row, column, k] (int, HU); it is stored as int16 with RescaleIntercept -1024, slope 1.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

INTERCEPT = -1024


def phantom_hu(shape, seed: int = 0) -> np.ndarray:
    """int16 (rows, cols, slices) HU: seeded noise plus a value that encodes (row, col, k), so a
    transposed or reordered read cannot match."""
    rows, cols, slices = shape
    r, c, k = np.meshgrid(np.arange(rows), np.arange(cols), np.arange(slices), indexing="ij")
    noise = np.random.default_rng(seed).integers(-50, 50, size=shape)
    return (r * 3 + c * 7 + k * 101 - 900 + noise).astype(np.int16)


def write_series(folder: str, shape=(24, 32, 8), spacing=(0.7, 0.8, 2.5), orientation=(1, 0, 0, 0, 1, 0),
                 position0=(-10.0, -20.0, 30.0), hu: Optional[np.ndarray] = None, modality: str = "CT",
                 series_uid: Optional[str] = None, blank_uids: bool = False,
                 file_names: Optional[Sequence[str]] = None, transfer_syntax=ExplicitVRLittleEndian,
                 image_type=("ORIGINAL", "PRIMARY", "AXIAL"), positions: Optional[Sequence] = None,
                 instance_numbers: Optional[Sequence[int]] = None, series_number: Optional[int] = 1,
                 study_uid: Optional[str] = None, frame_of_reference_uid: Optional[str] = None,
                 sop_class_uid: Optional[str] = None, intercept: float = INTERCEPT, slope: float = 1.0,
                 seed: int = 0) -> List[str]:
    """Write one series, one file per slice, into `folder` (created); return the paths in k order.

    Args:
        shape: (rows, columns, slices).
        spacing: (PixelSpacing row spacing, PixelSpacing column spacing, slice distance) in mm.
        orientation: ImageOrientationPatient (row direction, column direction).
        hu: int (rows, cols, slices) HU; default `phantom_hu(shape, seed)`.
        blank_uids: write empty Study/Series/SOP Instance/SOP Class UIDs in the dataset (the file
            meta keeps the SOP UIDs), as anonymisers do.
        file_names: one name per slice (default 'slice-k.dcm').
        transfer_syntax: uncompressed (explicit or implicit VR), or a compressed one pydicom can encode
            (RLE Lossless, JPEG-LS Lossless).
    """
    rows, cols, slices = shape
    hu = phantom_hu(shape, seed) if hu is None else np.asarray(hu)
    assert hu.shape == (rows, cols, slices)
    os.makedirs(folder, exist_ok=True)
    iop = np.asarray(orientation, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    if positions is None:
        positions = [np.asarray(position0, float) + k * spacing[2] * normal for k in range(slices)]
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_of_reference_uid = frame_of_reference_uid or generate_uid()
    sop_class = sop_class_uid or (CTImageStorage if modality == "CT" else MRImageStorage)
    paths = []
    stored_all = np.rint((hu.astype(np.float64) - intercept) / slope)
    # 12 bits where the values fit (as most CT), so HU stay exact in int16 after the rescale.
    bits = 12 if stored_all.size and -2048 <= stored_all.min() and stored_all.max() <= 2047 else 16
    for k in range(slices):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if transfer_syntax.is_compressed else transfer_syntax
        name = file_names[k] if file_names is not None else f"slice-{k}.dcm"
        path = os.path.join(folder, name)
        ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = "" if blank_uids else sop_class
        ds.SOPInstanceUID = "" if blank_uids else sop_uid
        ds.StudyInstanceUID = "" if blank_uids else study_uid
        ds.SeriesInstanceUID = "" if blank_uids else series_uid
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.Modality = modality
        ds.ImageType = list(image_type)
        ds.PatientName = "Test^Phantom"
        ds.PatientID = "phantom"
        ds.SeriesNumber = series_number
        ds.SeriesDescription = f"{modality} test series"
        ds.InstanceNumber = instance_numbers[k] if instance_numbers is not None else k + 1
        ds.ImagePositionPatient = [float(v) for v in positions[k]]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.PixelSpacing = [spacing[0], spacing[1]]
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 1
        ds.RescaleIntercept = intercept
        ds.RescaleSlope = slope
        ds.PixelData = stored_all[:, :, k].astype(np.int16).tobytes()
        if transfer_syntax.is_compressed:  # RLE and JPEG-LS encode here; JPEG 2000 may not (openjpeg)
            ds.compress(transfer_syntax)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths

