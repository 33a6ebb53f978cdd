"""The names of the product's files: NIfTI inputs and the outputs written per volume.

LiTS names a case's scan `volume-N.nii[.gz]` and its reference labels `segmentation-N.nii[.gz]`.
Input `<rel>.nii[.gz]` -> `<rel>_seg.nii.gz` (the mask), `<rel>_preview.png`, `<rel>.json` (the
report, written last). Every module that names, strips or recognises these files asks here.
"""

from __future__ import annotations

import unicodedata
from typing import Dict, Optional

from lits.core import storage

NIFTI_SUFFIXES = (".nii.gz", ".nii")
VOLUME_PREFIX = "volume-"
REFERENCE_PREFIX = "segmentation-"
MASK_SUFFIX = "_seg.nii.gz"
# A mask written as a DICOM Segmentation (lits.core.dicom_seg), for a DICOM series input.
SEG_SUFFIX = "_seg.dcm"
DICOM_SUFFIX = ".dcm"
PREVIEW_SUFFIX = "_preview.png"
REPORT_SUFFIX = ".json"
# Files the product writes itself: a job pointed at a folder holding earlier outputs skips them.
PRODUCT_SUFFIXES = (MASK_SUFFIX, "_seg.nii", SEG_SUFFIX)
OUTPUTS_TEXT = f"<name>{MASK_SUFFIX}, <name>{PREVIEW_SUFFIX}, <name>{REPORT_SUFFIX}"


def strip_nifti(name: str) -> str:
    """'volume-3.nii.gz' -> 'volume-3'; a name without a NIfTI suffix is returned as it is."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def output_name(relative: str) -> str:
    """'sub/volume-3.nii.gz' -> 'sub/volume-3' (the stem outputs are named after)."""
    if not relative.endswith(NIFTI_SUFFIXES):
        raise ValueError(f"{relative} is not .nii or .nii.gz")
    return strip_nifti(relative)


def hidden_character(text: str) -> Optional[str]:
    """The first control or format character in `text` (C0, DEL, C1; bidi overrides, zero-width
    characters: Unicode categories Cc and Cf), named ('U+202E RIGHT-TO-LEFT OVERRIDE'); None
    without one. Such a character hides or reorders what a reader of the name sees."""
    for c in text:
        if unicodedata.category(c) in ("Cc", "Cf"):
            return f"U+{ord(c):04X} {unicodedata.name(c, 'control character')}"
    return None


def refused_name(relative: str) -> Optional[str]:
    """Why an input named `relative` (its '/'-separated path below the job's input) cannot name
    outputs, or None when it can. An S3 key may hold anything: a '..' part ('in/../../x.nii.gz')
    would put its outputs outside the output prefix once a path is normalised (locally, behind a
    normalising gateway, after a sync to disk), and an empty or '.' part ('in//x.nii.gz') names
    another input's outputs. Control and format characters (DEL, bidi overrides) are refused, as in
    job URIs, and so is '?': s3fs reads 'a.nii.gz?versionId=x' as object 'a.nii.gz', so such a key
    would read another object and write all its outputs to that one name."""
    parts = relative.split("/")
    bad = sorted({repr(p) for p in parts if p in ("", ".", "..")})
    if bad:
        return (f"its name {relative!r} has {' and '.join(bad)} path parts, which would name outputs outside the "
                "job's output or another input's; rename it")
    hidden = hidden_character(relative)
    if hidden:
        return f"its name {relative!r} holds {hidden}, a control or format character; rename it"
    if "?" in relative:
        return f"its name {relative!r} holds '?', which S3 clients read as a query (?versionId=); rename it"
    return None


def is_reference(name: str) -> bool:
    """Whether a file name is a LiTS reference label volume ('segmentation-N...')."""
    return name.startswith(REFERENCE_PREFIX)


def is_volume(name: str) -> bool:
    """Whether a file name is a LiTS scan ('volume-N...')."""
    return name.startswith(VOLUME_PREFIX)


def is_mask(name: str) -> bool:
    """Whether a file name is a mask the product wrote ('<stem>_seg.nii.gz', '_seg.nii' or '_seg.dcm')."""
    return name.endswith(PRODUCT_SUFFIXES)


def mask_name(stem: str) -> str:
    return stem + MASK_SUFFIX


def mask_stem(mask: str) -> str:
    """'OUT/volume-3_seg.nii.gz' (or '_seg.nii', '_seg.dcm') -> 'OUT/volume-3'; other names as they are."""
    for suffix in PRODUCT_SUFFIXES:
        if mask.endswith(suffix):
            return mask[: -len(suffix)]
    return mask


def output_uris(output: str, rel_name: str) -> Dict[str, str]:
    """A volume's outputs under the prefix `output`: {'mask', 'preview', 'report'}."""
    return {"mask": storage.join(output, mask_name(rel_name)), "preview": storage.join(output, rel_name + PREVIEW_SUFFIX),
            "report": storage.join(output, rel_name + REPORT_SUFFIX)}
