"""DICOM Segmentation (SEG) out and in: lits labels as a SEG that references its source CT series,
and a liver/tumour SEG (ours or another tool's) back to labels with their geometry.

Written (`seg_bytes`): a BINARY SEG (highdicom), one frame per source slice and segment, empty
frames omitted, bit-packed, Explicit VR Little Endian. Two segments that do not overlap (the label
map as it is, as MONAI Deploy's liver-tumour app writes it), both always described:
  1 "Liver": category SCT 91772007 Organ, type SCT 10200004 Liver: label 1 (the liver around the
    tumour; LiTS' liver is segments 1 and 2 together);
  2 "Liver tumour": category SCT 49755003 Morphologically abnormal structure, type SCT 108369006
    Neoplasm (Tumor), anatomic region SCT 10200004 Liver: label 2.
These are the codes of MONAI Deploy's liver-tumour app and highdicom's own examples (DCM 123110
Artificial Intelligence as the algorithm family). Overlapping segments (the liver with its tumour)
would cost highdicom a per-voxel overlap check over a (slices, rows, columns, 2) array.
The SEG's Series Instance UID is derived from (source series, model id), its SOP Instance UID from
(source series, model id, the labels' bytes): a rerun of one model on one series writes the same
UIDs, new content gets a new instance. The patient and study modules are the source's (DICOM
practice); nothing from them is logged.

Read (`read_seg`): segments are mapped by their coded property type, not their labels or
numbers: Liver (SCT 10200004) -> label 1; Neoplasm/Tumor (108369006), Mass (4147007) or Lesion
(52988006), unless the segment names an anatomic region other than the liver -> label 2 (over 1).
Several segments of one kind are united (a liver that includes its tumour reads the same as one
around it); other segments are ignored. The labels come back on the SEG's own grid: the frames'
span (a SEG holds only its non-empty frames), in the file layout of `dicom.read_series` (i = column,
j = row, k = slice along the normal), with a Geometry whose affine maps it to RAS+ mm.
`common_grid` puts two label volumes of one lattice on one grid.
"""

from __future__ import annotations

import hashlib
import io
from typing import Sequence, Tuple, Union

import numpy as np
import pydicom
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from pydicom.sr.codedict import codes
from pydicom.uid import SegmentationStorage, generate_uid

from lits.core import storage, volumes
from lits.core.errors import BadInputError

SERIES_DESCRIPTION = "LiTS liver/tumour SEG"
SEG_SERIES_NUMBER = 99
MANUFACTURER = "lits"
LIVER_CODE = codes.SCT.Liver  # SCT 10200004
TUMOUR_CODES = ("108369006", "4147007", "52988006")  # SCT Neoplasm (Tumor), Mass, Lesion
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SEG_CLASSES = (SegmentationStorage, "1.2.840.10008.5.1.4.1.1.66.7")  # Segmentation, Label Map Segmentation
# Type 2 attributes highdicom copies from the first source image: anonymised series often lack them.
_PATIENT_STUDY_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                        "StudyDate", "StudyTime", "ReferringPhysicianName")


def _segment_descriptions(model_id: str, model_name: str, task: str, version: str):
    import highdicom as hd

    algorithm = hd.AlgorithmIdentificationSequence(
        name=model_name[:64], family=codes.DCM.ArtificialIntelligence, version=model_id[:64],
        parameters={"task": task, "lits": version})
    liver = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Liver", segmented_property_category=codes.SCT.Organ,
        segmented_property_type=LIVER_CODE, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
    tumour = hd.seg.SegmentDescription(
        segment_number=2, segment_label="Liver tumour",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, anatomic_regions=[LIVER_CODE])
    return [liver, tumour]


def _with_type2(dataset: pydicom.Dataset) -> pydicom.Dataset:
    """A header-only copy of `dataset` (the caller's is left as it is) with missing Type 2 patient and
    study attributes present and empty."""
    header = pydicom.Dataset()
    for element in dataset:
        if element.keyword != "PixelData":
            header.add(element)
    if hasattr(dataset, "file_meta"):
        header.file_meta = dataset.file_meta
    for keyword in _PATIENT_STUDY_TYPE2:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def seg_bytes(labels_file: np.ndarray, source: Sequence[pydicom.Dataset], *, model_id: str,
              model_name: str = "lits U-Net", task: str = "liver_tumour", version: str = "") -> bytes:
    """A DICOM SEG file of `labels_file` over the series `source`.

    Args:
        labels_file: uint8 (I, J, K) = (columns, rows, slices) labels 0/1/2, slice k on source[k]
            (the layout and order `dicom.read_series` returns).
        source: the series' datasets in k order (headers suffice; pixel data may be dropped), with
            Study/Series/SOP Instance/SOP Class UIDs and FrameOfReferenceUID set.
        model_id: the model's identity (its weights' hash): the algorithm's version, the device serial.
        model_name, task, version: the algorithm's name, its parameters, the software version.
    Returns:
        the SEG's bytes (a DICOM file: preamble and file meta included).
    Raises:
        ValueError: `labels_file` does not match the series' rows, columns and slices.
        BadInputError: labels outside 0/1/2.
    """
    import highdicom as hd

    first = source[0]
    expected = (int(first.Columns), int(first.Rows), len(source))
    if tuple(labels_file.shape) != expected:
        raise ValueError(f"labels of shape {labels_file.shape} for a series of (columns, rows, slices) {expected}")
    labels = volumes.as_labels(labels_file, "labels")
    # (K, rows, cols) with segment numbers as values: segments that do not overlap, no per-voxel overlap check
    frames = np.ascontiguousarray(labels.transpose(2, 1, 0))
    series = str(first.SeriesInstanceUID)
    digest = hashlib.sha256(np.ascontiguousarray(labels).tobytes()).hexdigest()
    seg = hd.seg.Segmentation(
        source_images=[_with_type2(source[0])] + list(source[1:]), pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(model_id, model_name, task, version),
        series_instance_uid=generate_uid(entropy_srcs=[series, model_id, "lits SEG series"]),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=generate_uid(entropy_srcs=[series, model_id, digest, "lits SEG instance"]),
        instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name=model_name[:64],
        software_versions=version or "unknown", device_serial_number=model_id[:64],
        series_description=SERIES_DESCRIPTION, content_label="LITS", content_description=f"{task} segmentation"[:64],
        omit_empty_frames=True)
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# --- reading -----------------------------------------------------------------------------------

def _is_code(item, values: Sequence[str]) -> bool:
    return item.CodingSchemeDesignator in ("SCT", "SRT") and str(item.CodeValue) in values


def _segment_numbers(seg) -> Tuple[list, list]:
    """(liver segment numbers, tumour segment numbers) by their coded property types."""
    liver, tumour = [], []
    for item in seg.SegmentSequence:
        kind = item.SegmentedPropertyTypeCodeSequence[0]
        regions = item.get("AnatomicRegionSequence") or []
        if _is_code(kind, (LIVER_CODE.value,)):
            liver.append(int(item.SegmentNumber))
        elif _is_code(kind, TUMOUR_CODES) and (not regions or any(_is_code(r, (LIVER_CODE.value,)) for r in regions)):
            tumour.append(int(item.SegmentNumber))
    return liver, tumour


def _parse(data: bytes, name: str):
    import highdicom as hd

    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:
        raise BadInputError(f"{name}: not a DICOM file ({exc}); expected a DICOM Segmentation (.dcm)") from exc
    if dataset.get("SOPClassUID") not in _SEG_CLASSES:
        kind = dataset.get("SOPClassUID")
        raise BadInputError(f"{name}: a DICOM {getattr(kind, 'name', None) or kind or 'file without SOP class'}, not a "
                            "Segmentation (SEG); point at the SEG file (e.g. <name>_seg.dcm)")
    try:
        return hd.seg.Segmentation.from_dataset(dataset, copy=False)
    except Exception as exc:
        raise BadInputError(f"{name}: an unreadable DICOM Segmentation ({exc}); re-export it") from exc


def _file_geometry(array_src: np.ndarray, affine_lps: np.ndarray) -> Tuple[np.ndarray, volumes.Geometry]:
    """(slices, rows, cols) + its LPS affine -> the (cols, rows, slices) array, k along the frame normal."""
    array = array_src.transpose(2, 1, 0)
    affine = affine_lps[:, [2, 1, 0, 3]]
    normal = np.cross(affine[:3, 0], affine[:3, 1])
    if float(np.dot(normal, affine[:3, 2])) < 0:  # k ascends along the normal, as read_series sorts slices
        affine = affine.copy()
        affine[:3, 3] += affine[:3, 2] * (array.shape[2] - 1)
        affine[:3, 2] *= -1
        array = array[:, :, ::-1]
    array.flags.writeable = False  # a view, like a NIfTI read: (slices, rows, cols) C order is (i, j, k) F order
    return array, volumes.Geometry.from_affine(_LPS_TO_RAS @ affine, array.shape)


def read_seg(data_or_uri: Union[bytes, str], name: str = "<bytes>",
             max_voxels: int = volumes.MAX_VOXELS) -> Tuple[np.ndarray, volumes.Geometry]:
    """A liver/tumour DICOM SEG as lits labels on the SEG's own grid (see the module's docstring).

    Args:
        data_or_uri: the SEG file's bytes, or its URI (then errors name the URI).
        name: how errors name bytes.
        max_voxels: the most voxels the frames may declare.
    Returns:
        (labels uint8 (I, J, K) = (columns, rows, slices) 0/1/2, Geometry: voxel -> RAS+ mm).
    Raises:
        BadInputError: not DICOM, not a SEG, no liver segment, too large, or frames that are not one
            regular 3-D grid of a patient frame of reference.
    """
    if isinstance(data_or_uri, str):
        name = data_or_uri
        try:
            data_or_uri = storage.read_bytes(data_or_uri)
        except Exception as exc:
            raise BadInputError(f"{name}: cannot read ({exc})") from exc
    seg = _parse(data_or_uri, name)
    liver, tumour = _segment_numbers(seg)
    if not liver:
        labels = [str(item.get("SegmentLabel", "?")) for item in seg.SegmentSequence]
        raise BadInputError(f"{name}: no liver segment (property type SNOMED CT 10200004 Liver) among its segments "
                            f"{labels[:8]}; expected a liver/tumour segmentation")
    declared = int(seg.get("NumberOfFrames", 1)) * int(seg.Rows) * int(seg.Columns)
    if declared > max_voxels:
        raise BadInputError(f"{name}: {declared} voxels in its frames, over the limit of {max_voxels}")
    fractional = seg.SegmentationType == "FRACTIONAL"  # rescaled to 0..1, counted from 0.5
    try:
        volume = seg.get_volume(segment_numbers=liver + tumour, combine_segments=False,
                                dtype=np.float32 if fractional else np.uint8)
    except Exception as exc:
        raise BadInputError(f"{name}: its frames do not form one regular 3-D volume ({exc}); expected a SEG of "
                            "an axial CT series") from exc
    present = volume.array >= 0.5 if fractional else volume.array > 0
    labels = np.zeros(present.shape[:3], np.uint8)
    for channel in range(len(liver) + len(tumour)):
        labels[present[..., channel]] = 1 if channel < len(liver) else 2
    return _file_geometry(labels, np.asarray(volume.affine, dtype=np.float64))


# --- one grid for two volumes -------------------------------------------------------------------

def _lps(labels: np.ndarray, geometry: volumes.Geometry) -> Tuple[np.ndarray, np.ndarray]:
    """The array reoriented to (L, P, S) axes and its affine (nibabel's reorientation)."""
    ornt = ornt_transform(io_orientation(geometry.affine_array), axcodes2ornt(volumes.CANONICAL_AXCODES))
    return apply_orientation(labels, ornt), geometry.affine_array @ inv_ornt_aff(ornt, labels.shape)


def common_grid(a: np.ndarray, a_geometry: volumes.Geometry, b: np.ndarray, b_geometry: volumes.Geometry,
                tolerance_mm: float = 1e-2) -> Tuple[np.ndarray, np.ndarray, volumes.Geometry]:
    """Two label volumes of one voxel lattice on one grid: the smallest box holding both, with b's
    axes, spacing and voxel centres, zeros where a volume has no voxels.

    Args:
        a, b: (I, J, K) file-order arrays with their geometries.
    Returns:
        (a, b, geometry): both (L, P, S)-ordered on the common grid, and its geometry (axcodes LPS).
    Raises:
        ValueError: the lattices differ (orientation, spacing, or an offset that is not whole
            voxels) by more than `tolerance_mm` anywhere in a's extent; the message says how.
    """
    a_lps, a_affine = _lps(a, a_geometry)
    b_lps, b_affine = _lps(b, b_geometry)
    offset = (np.linalg.inv(b_affine) @ a_affine[:, 3])[:3]
    whole = np.rint(offset).astype(int)
    corners = np.array([[i, j, k, 1] for i in (0, a_lps.shape[0] - 1) for j in (0, a_lps.shape[1] - 1)
                        for k in (0, a_lps.shape[2] - 1)], float).T
    shifted = corners.copy()
    shifted[:3] += whole[:, None]
    error = float(np.abs(a_affine @ corners - b_affine @ shifted).max())
    if error > tolerance_mm:
        raise ValueError(f"its voxels lie up to {error:.3g} mm off the reference's lattice ({a_geometry.axcodes} "
                         f"spacing {np.round(a_geometry.spacing, 4).tolist()} vs {b_geometry.axcodes} "
                         f"{np.round(b_geometry.spacing, 4).tolist()})")
    low = np.minimum(whole, 0)
    high = np.maximum(np.array(b_lps.shape), whole + np.array(a_lps.shape))
    shape = tuple(int(s) for s in high - low)
    a_out, b_out = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    b_out[tuple(slice(-lo, -lo + n) for lo, n in zip(low, b_lps.shape))] = b_lps
    a_out[tuple(slice(w - lo, w - lo + n) for w, lo, n in zip(whole, low, a_lps.shape))] = a_lps
    translate = np.eye(4)
    translate[:3, 3] = low
    return a_out, b_out, volumes.Geometry.from_affine(b_affine @ translate, shape)
