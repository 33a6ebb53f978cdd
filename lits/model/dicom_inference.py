"""Segmenting a DICOM CT series: the series' HU volume through the same path as a NIfTI's
(`inference.write_segmentation`), plus a DICOM-SEG that references the series' instances.

A series' report names it by UIDs and folder only: PatientName, PatientID and birth date never
reach a report or a log (the SEG itself carries the source's patient module, as DICOM requires).
"""

from __future__ import annotations

import time
from typing import Dict, Optional, Tuple

from lits.core import dicom, dicom_seg, naming, storage
from lits.model import inference
from lits.model.inference import ModelSpec, Submit

SEG_KEY = "seg"  # the outputs' key of a series' DICOM-SEG
SOFTWARE = "lits 0.1"


def series_outputs(output: str, rel_name: str) -> Dict[str, str]:
    """A series' outputs under `output`: the NIfTI mask, preview and report of any volume, and
    '<rel>_seg.dcm', its DICOM-SEG."""
    return {**naming.output_uris(output, rel_name), SEG_KEY: storage.join(output, rel_name + naming.SEG_SUFFIX)}


def series_head(series: dicom.Series, source: Dict) -> Dict:
    """The report's first fields for a series: where it is, its UIDs, its identity; nothing about
    the patient."""
    return {"input": series.folder, "input_identity": source,
            "dicom": {"series_name": series.name, "study_uid": series.study_uid, "series_uid": series.series_uid,
                      "frame_of_reference_uid": series.frame_of_reference_uid, "uids_derived": series.uids_derived,
                      "files": len(series.files), "modality": "CT"}}


def _seg_writer(datasets, spec: ModelSpec):
    def write(labels_file) -> Dict[str, bytes]:
        return {SEG_KEY: dicom_seg.seg_bytes(labels_file, datasets, model_id=spec.model_id, task=spec.task,
                                             version=SOFTWARE)}
    return write


def segment_series(series: dicom.Series, outputs: Dict[str, str], spec: ModelSpec, submit: Submit, chunk: int = 16,
                   threads: int = 1, source: Optional[Dict] = None) -> Dict:
    """Segment a DICOM CT series; write outputs['mask'] (NIfTI on the series' grid), ['preview'],
    ['seg'] (DICOM-SEG), then ['report'] (last). 'input_identity' is `source` (the caller's
    `dicom.series_identity`), else taken here before the files are read.

    Raises:
        BadInputError: a file unreadable or changed, bad geometry, undecodable pixel data (nothing
            is written).
    """
    t0 = time.perf_counter()
    source = source or dicom.series_identity(series)
    hu_file, geometry, datasets = dicom.read_series(series, threads=max(1, threads))
    return inference.write_segmentation(hu_file, geometry, series.folder, outputs, spec, submit, chunk, threads,
                                        series_head(series, source), t0, extra=_seg_writer(datasets, spec))


def segment_zip(data: bytes, name: str, spec: ModelSpec, submit: Submit, chunk: int = 16,
                threads: int = 1) -> Tuple[bytes, bytes, Dict]:
    """Segment an uploaded zip of one series; returns (DICOM-SEG bytes, NIfTI mask bytes, report).

    Raises:
        BadInputError: not a zip, a zip bomb or path trick, no or several CT series, bad geometry.
    """
    from lits.core import volumes

    t0 = time.perf_counter()
    files = dicom.unzip_series(data, name)
    series = dicom.series_from_files(files, name)
    hu_file, geometry, datasets = dicom.read_series_bytes(files, name, series=series)
    labels_file, _, _, report = inference.segment_decoded(hu_file, geometry, name, spec, submit, chunk,
                                                          time.perf_counter() - t0, threads)
    source = {**inference.upload_identity(data, name), "count": len(files)}
    report = {**series_head(series, source), **report, "input": name}
    t = time.perf_counter()
    seg = _seg_writer(datasets, spec)(labels_file)[SEG_KEY]
    mask = volumes.nifti_bytes(labels_file, geometry.affine_array, compress=True)
    report["seconds"]["encode"] = round(time.perf_counter() - t, 3)
    return seg, mask, report
