"""What a bulk job segments under its input prefix: NIfTI volumes by name, DICOM CT series by their
headers (`lits.core.dicom`), and what is ignored, skipped (with reasons) or refused.

A series' outputs are named after its folder below the input (`series_rel_name`): the NIfTI mask,
preview and report as any volume's, plus '<rel>_seg.dcm', its DICOM-SEG. Discovery reads every
candidate file's header (a small read each, `threads` at once) in the job's actor, before any
volume starts: about a minute per 100,000 files at 20 ms a read.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

from lits.core import dicom, naming, storage
from lits.core.errors import UserError
from lits.serve.job_spec import JOBS_FOLDER


def list_inputs(input_uri: str, output_uri: str, threads: int = 16,
                inputs: Optional[Sequence[str]] = None) -> Dict[str, List]:
    """The volumes a job segments: {'volumes': [(uri or dicom.Series, rel_name)], 'ignored': [uri],
    'refused': [(uri, reason)], 'skipped': [dicom.Skipped]}.

    `inputs` None: every file under `input_uri` (one listing). Else exactly those keys below it
    (`JobSpec.inputs`, already checked by `job_spec.refused_input`): a NIfTI object each, or a
    folder of DICOM files (ending in '/', listed on its own); nothing else under the input is read,
    and the outputs are named as they would be with `inputs` None. A folder that is gone or
    cannot be listed is refused with the reason; a series there whose geometry refuses it is
    named by its folder's URI.

    NIfTI files are volumes by their names; every other file (but the product's outputs, pictures,
    JSON and the like: `dicom.IGNORED_SUFFIXES`) has its DICOM header read (`threads` at once) and
    the CT series among them are volumes too (`series_inputs`). Files and series left out of the
    DICOM selection (scouts, other modalities, not DICOM) are 'skipped' with their reasons; a
    series whose geometry cannot make a volume is refused with its reason.

    Ignored: reference segmentations (segmentation-N.nii*: `naming.is_reference`), the product's
    own masks (*_seg.nii*: `naming.is_mask`) and anything under the output prefix, so a job may
    point at a LiTS folder and write inside it; reports (.json) and previews (.png) are not NIfTI
    and never listed. Refused (each a failed volume with its reason, never segmented): a name
    `naming.refused_name` refuses (a '..', '.' or empty part, a control character), one whose
    outputs would land among the job summaries (`_jobs/`), and one whose outputs another input
    already names (`a.nii` beside `a.nii.gz`).

    Raises:
        UserError: a folder input that is the output or lies inside it (the job would skip it all).
    """
    root = storage.normalise(input_uri)
    out = storage.normalise(output_uri).rstrip("/")
    refused: List[Tuple[str, str]] = []
    if inputs is None:
        groups = [(None, storage.list_files(root))]
    else:
        groups = _chosen(root, inputs, refused)
    files = [uri for _, uris in groups for uri in uris]
    single = inputs is None and files == [root]
    if not single and (root == out or root.startswith(out + "/")):
        raise UserError(f"the input {root} lies inside the output {out}: every file there would be skipped as "
                        f"an output; write beside the input or inside it (e.g. {root}/seg)")
    volumes, ignored, skipped, named = [], [], [], {}
    for uri in files:
        if not uri.endswith(naming.NIFTI_SUFFIXES):
            continue
        rel = os.path.basename(uri) if single else uri[len(root) + 1:]
        base = os.path.basename(uri)
        if (not single and uri.startswith(out + "/")) or naming.is_reference(base) or naming.is_mask(base):
            ignored.append(uri)
            continue
        why = naming.refused_name(rel)
        stem = None if why else naming.output_name(rel)
        why = why or _name_taken(stem, named)
        if why:
            refused.append((uri, why))
            continue
        named[stem] = uri
        volumes.append((uri, stem))
    for folder, uris in groups:
        others = [u for u in uris if not u.endswith(naming.NIFTI_SUFFIXES) and not dicom.ignored(u)
                  and (single or not u.startswith(out + "/"))]
        series, left_out = series_inputs(others, root, threads)
        skipped.extend(left_out)
        for source, rel, why in series:
            why = why or _name_taken(rel, named)
            if why:
                refused.append((source.folder if isinstance(source, dicom.Series) else folder or source, why))
                continue
            named[rel] = source.folder
            volumes.append((source, rel))
    return {"volumes": volumes, "ignored": ignored, "refused": refused, "skipped": skipped}


def _chosen(root: str, inputs: Sequence[str], refused: List[Tuple[str, str]]) -> List[Tuple[Optional[str], List[str]]]:
    """[(folder URI or None, its files)] of a job's explicit `inputs` below `root`: a NIfTI key as
    (None, [its URI]), a folder key ('p1/ct/') as (its URI, the files listed under it). A folder that
    cannot be listed goes to `refused` with the reason."""
    groups: List[Tuple[Optional[str], List[str]]] = []
    for key in inputs:
        uri = storage.join(root, key.rstrip("/"))
        if not key.endswith("/"):
            groups.append((None, [uri]))
            continue
        try:
            groups.append((uri, storage.list_files(uri)))
        except UserError as exc:
            refused.append((uri, f"cannot list it: {exc}"))
    return groups


def _name_taken(stem: str, named: Dict[str, str]) -> Optional[str]:
    if stem.startswith(JOBS_FOLDER + "/"):
        return f"its outputs would be written among the job summaries ({JOBS_FOLDER}/); rename or move it"
    if stem in named:
        return f"its outputs would have the names of {named[stem]}'s ({stem}_seg.nii.gz...); rename one of them"
    return None


def series_rel_name(series: dicom.Series, root: str) -> str:
    """The name a series' outputs take below the job's output: its folder's path below the input
    (the input's own name when the input is the series' folder), plus '/series-<n>' where the
    folder holds several series ('in/p1/ct' under 'in' -> 'p1/ct', 'p1/ct/series-3')."""
    folder = series.folder.rstrip("/")
    rel = folder[len(root) + 1:] if folder.startswith(root + "/") else storage.basename(folder)
    return rel + ("/series-" + series.name.split("/series-", 1)[1] if "/series-" in series.name else "")


def series_inputs(uris: Sequence[str], root: str, threads: int = 16
                  ) -> Tuple[List[Tuple[Union[dicom.Series, str], str, Optional[str]]], List[dicom.Skipped]]:
    """The DICOM CT series among `uris` (headers read `threads` at once): ([(series, rel_name, None)]
    plus [(series name, '', reason)] for each series whose geometry or name refuses it), and the
    files and series the selection left out (`dicom.group_series`)."""
    if not uris:
        return [], []
    headers, skipped = dicom.read_headers(uris, threads)
    selected, left_out = dicom.group_series(headers)
    found = []
    for s in left_out:
        if s.failed:  # a CT series that cannot make a volume: one failed input with its reason
            found.append((s.what, "", s.reason))
        else:
            skipped.append(s)
    for series in selected:
        rel = series_rel_name(series, root)
        found.append((series, rel, naming.refused_name(rel)))
    return found, skipped
