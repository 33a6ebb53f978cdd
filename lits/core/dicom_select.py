"""Which DICOM files make which CT series (pure: headers in, series and reasons out).

Files are grouped by SeriesInstanceUID; where it is blank, by folder + FrameOfReferenceUID +
orientation (rounded) + rows x columns. Within a group, files that are not original axial CT images
are left out (one Skipped line per reason); what remains must make one regular volume
(`dicom_headers.series_geometry`), or the whole series is one Skipped line naming it and why.
A returned Series can therefore be read without producing a misplaced mask.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter, defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

from pydicom.uid import generate_uid

from lits.core.dicom_headers import Series, SliceHeader, Skipped, is_axial, series_geometry
from lits.core.errors import BadInputError

# Secondary Capture Image Storage and its multi-frame variants.
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
# Fewer axial slices than this are a scout or single images, not a volume to segment.
MIN_SLICES = 3


def group_key(header: SliceHeader) -> str:
    """SeriesInstanceUID, else 'folder|FrameOfReferenceUID|orientation|rowsxcolumns'."""
    if header.series_uid:
        return header.series_uid
    orientation = ",".join(f"{v:.3f}" for v in header.orientation) if header.orientation else "-"
    return f"{header.folder}|{header.frame_of_reference_uid}|{orientation}|{header.rows}x{header.columns}"


def unwanted(header: SliceHeader) -> Optional[str]:
    """Why a file is not a slice of an original axial CT volume (one line), or None."""
    if header.sop_class_uid.startswith(SECONDARY_CAPTURE):
        return f"secondary capture (SOP class {header.sop_class_uid}), not a CT image"
    if header.modality != "CT":
        return f"modality {header.modality or 'missing'}, not CT"
    if header.frames > 1:
        return (f"multi-frame image ({header.frames} frames, Enhanced CT), not supported; export the series as "
                "single-frame slices")
    if "LOCALIZER" in header.image_type:
        return "localizer/scout image (ImageType LOCALIZER)"
    kind = header.image_type[:2]
    if kind and (kind[0] != "ORIGINAL" or (len(kind) > 1 and kind[1] != "PRIMARY")):
        return f"ImageType {'/'.join(kind)}, not ORIGINAL/PRIMARY (derived or secondary images)"
    if header.position is None or header.orientation is None or header.pixel_spacing is None:
        return "no ImagePositionPatient, ImageOrientationPatient or PixelSpacing (no 3-D geometry)"
    try:
        axial = is_axial(header.orientation)
    except (ValueError, FloatingPointError):
        return f"invalid ImageOrientationPatient {list(header.orientation)}"
    if not axial:
        return f"not axial (ImageOrientationPatient {[round(v, 3) for v in header.orientation]}); only axial CT is read"
    return None


def _folder_of(headers: Sequence[SliceHeader]) -> str:
    """The folder holding the files (their common parent where a series spans folders)."""
    folders = sorted({h.folder for h in headers})
    if len(folders) == 1:
        return folders[0]
    parts = [f.split("/") for f in folders]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return "/".join(common)


def _short_folder_names(folders: Sequence[str]) -> Dict[str, str]:
    """Each folder's shortest trailing path that no other folder shares ('scan1', else 'a/scan1')."""
    split = {folder: [p for p in folder.split("/") if p] for folder in folders}
    names = {}
    for folder, parts in split.items():
        depth = 1
        while depth < len(parts) and any(other != folder and split[other][-depth:] == parts[-depth:] for other in split):
            depth += 1
        names[folder] = "/".join(parts[-depth:]) or "series"
    return names


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def series_names(groups: Sequence[Tuple[str, str, Optional[int]]]) -> Dict[str, str]:
    """{key: name} for (key, folder, SeriesNumber) groups: the folder's short name, plus
    '/series-<SeriesNumber>' (or a hash of the key where the number is missing or repeated) where a
    folder holds several."""
    short = _short_folder_names(sorted({folder for _, folder, _ in groups}))
    by_folder = defaultdict(list)
    for key, folder, number in groups:
        by_folder[folder].append((key, number))
    names = {}
    for folder, members in by_folder.items():
        numbers = Counter(number for _, number in members)
        for key, number in members:
            if len(members) == 1:
                names[key] = short[folder]
            elif number is not None and numbers[number] == 1:
                names[key] = f"{short[folder]}/series-{number}"
            else:
                names[key] = f"{short[folder]}/series-{_short_hash(key)}"
    return names


def _with_uids(key: str, name: str, headers: List[SliceHeader]) -> Series:
    """The Series of checked, ordered slices, its blank UIDs derived deterministically."""
    first = next((h for h in headers if h.series_uid), headers[0])
    sops = sorted(h.sop_instance_uid or h.uri for h in headers)
    # Derived from what the files hold (not where they are): the same series read from a copy
    # elsewhere gets the same UIDs.
    series_uid = first.series_uid or generate_uid(entropy_srcs=["lits-series", first.frame_of_reference_uid, *sops])
    study_uid = next((h.study_uid for h in headers if h.study_uid), "") or generate_uid(
        entropy_srcs=["lits-study", first.frame_of_reference_uid or first.folder])
    frame_uid = next((h.frame_of_reference_uid for h in headers if h.frame_of_reference_uid), "") or generate_uid(
        entropy_srcs=["lits-frame-of-reference", series_uid])
    derived = not (first.series_uid and any(h.study_uid for h in headers) and first.frame_of_reference_uid)
    filled = []
    for h in headers:
        if not h.sop_instance_uid:
            derived = True
            h = dataclasses.replace(h, sop_instance_uid=generate_uid(entropy_srcs=["lits-sop", series_uid, h.uri]))
        filled.append(h)
    return Series(key=key, name=name, folder=_folder_of(headers), files=tuple(h.uri for h in filled),
                  headers=tuple(filled), study_uid=study_uid, series_uid=series_uid,
                  frame_of_reference_uid=frame_uid, uids_derived=derived)


def _label(folder: str, headers: Sequence[SliceHeader], key: str) -> str:
    """How a group left out as a whole is named: '<folder>/series-<number or hash>'."""
    number = next((h.series_number for h in headers if h.series_number is not None), None)
    return f"{folder.rstrip('/').rsplit('/', 1)[-1] or 'series'}/series-{number if number is not None else _short_hash(key)}"


def group_series(headers: Sequence[SliceHeader]) -> Tuple[List[Series], List[Skipped]]:
    """Group file headers into CT series, select the ones to segment and order their slices.

    Args:
        headers: any files' headers (`read_headers`), any order, any folders.
    Returns:
        (series, skipped): the selected series sorted by (folder, name), each with its files
        ascending along the slice normal (never by file name or InstanceNumber); one Skipped line
        per group or reason left out: non-CT modality, secondary capture, localizer, derived,
        non-axial, too few slices, and bad geometry (mixed sizes/spacings/orientations, duplicate
        positions, a missing slice, uneven spacing, gantry tilt) naming the series.
    """
    groups: Dict[str, List[SliceHeader]] = defaultdict(list)
    for h in headers:
        groups[group_key(h)].append(h)
    skipped: List[Skipped] = []
    candidates = []
    for key in sorted(groups, key=lambda k: (_folder_of(groups[k]), k)):
        members = sorted(groups[key], key=lambda h: h.uri)
        reasons = {h.uri: unwanted(h) for h in members}
        kept = [h for h in members if reasons[h.uri] is None]
        dropped = Counter(r for r in reasons.values() if r is not None)
        if kept:
            candidates.append((key, kept, dropped, len(members)))
            continue
        reason, count = dropped.most_common(1)[0]
        skipped.append(Skipped(_label(_folder_of(members), members, key), f"{reason} ({count} of {len(members)} files)"))
    names = series_names([(key, _folder_of(kept), kept[0].series_number) for key, kept, _, _ in candidates])
    series = []
    for key, kept, dropped, total in candidates:
        name = names[key]
        for reason, count in sorted(dropped.items()):
            skipped.append(Skipped(name, f"{count} of {total} files left out: {reason}"))
        if len(kept) < MIN_SLICES:
            skipped.append(Skipped(name, f"only {len(kept)} axial slice(s); a CT volume needs at least {MIN_SLICES}"))
            continue
        try:
            order, _ = series_geometry(kept, name)
        except BadInputError as exc:
            skipped.append(Skipped(name, str(exc).removeprefix(f"{name}: "), failed=True))
            continue
        series.append(_with_uids(key, name, [kept[i] for i in order]))
    return sorted(series, key=lambda s: (s.folder, s.name)), skipped
