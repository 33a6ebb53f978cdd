"""Lesion detection by size over an evaluation's cases: the per-case columns of metrics.csv, the
aggregate in summary.json and the table in report.md.

Definitions (lits.core.metrics.lesion_detection_by_size): a lesion is a 3-D connected component of
tumour (26-connectivity); its size is its equivalent-sphere diameter d = (6 V / pi) ** (1/3) mm, V =
voxel count x voxel volume (the reference's spacing); buckets d < 10 mm, 10 <= d <= 20 mm, d > 20 mm.
A reference lesion is detected when the predicted components touching it have IoU > 0.5 with it
(bucketed by the reference lesion's diameter: recall); a predicted lesion is correct when the
reference components it touches have IoU > 0.5 with it (bucketed by the predicted lesion's own
diameter: precision); a false-positive lesion is a predicted lesion that is not correct.
Aggregates sum the counts over cases, then take the ratios (None, "-" in the report, for an empty
bucket); false-positive lesions per volume is their mean over the evaluated cases.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from lits.core import metrics

DEFINITION = ("lesion = 3-D tumour component (26-connectivity); diameter = equivalent-sphere diameter "
              "(6 V / pi)^(1/3) mm from voxel count x voxel volume; buckets < 10, 10-20 (inclusive), > 20 mm; "
              "a lesion is detected / correct when the components of the other side touching it have IoU > 0.5 "
              "with it; reference lesions bucketed for recall, predicted lesions for precision, each by its own "
              "diameter; FP lesion = predicted lesion not correct")


def column(key: str, field: str) -> str:
    """The metrics.csv column of one bucket's count: e.g. ('lt10', 'ref_lesions') -> 'lesions_lt10_ref_lesions'."""
    return f"lesions_{key}_{field}"


def row_fields(tumour: Dict) -> Dict[str, int]:
    """A case's metrics.csv columns from volume_metrics' 'tumour' dict: 'tumour_fp_lesions' and the
    counts (metrics.DETECTION_COUNTS) of each size bucket."""
    out = {"tumour_fp_lesions": int(tumour["fp_lesions"])}
    for key, _ in metrics.SIZE_BUCKETS:
        for field in metrics.DETECTION_COUNTS:
            out[column(key, field)] = int(tumour["lesions_by_size"][key][field])
    return out


def aggregate(ok: List[Dict]) -> Dict:
    """Lesion detection by size over evaluated rows (those of `row_fields`, without 'error').

    Returns:
        {'definition': str, 'buckets': [{'bucket', 'label', 'ref_lesions', 'ref_detected', 'recall',
        'pred_lesions', 'pred_correct', 'precision'}] per size bucket then 'all', 'fp_lesions_per_volume':
        mean over cases (None without cases), 'fp_lesions_per_case': {case: count}}.
    """
    buckets = []
    for key, label in metrics.SIZE_BUCKETS:
        counts = {f: sum(r[column(key, f)] for r in ok) for f in metrics.DETECTION_COUNTS}
        buckets.append({"bucket": key, "label": label, **metrics.detection_ratios(counts)})
    total = {f: sum(b[f] for b in buckets) for f in metrics.DETECTION_COUNTS}
    buckets.append({"bucket": "all", "label": "all sizes", **metrics.detection_ratios(total)})
    fp = {r["case"]: r["tumour_fp_lesions"] for r in ok}
    per_volume: Optional[float] = sum(fp.values()) / len(fp) if fp else None
    return {"definition": DEFINITION, "buckets": buckets, "fp_lesions_per_volume": per_volume,
            "fp_lesions_per_case": fp}


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def table_md(by_size: Dict) -> List[str]:
    """report.md's lines for `aggregate`'s result: the table per bucket and FP lesions per volume."""
    lines = ["| lesion size | reference lesions | detected | recall | predicted lesions | correct | precision |",
             "|---|---|---|---|---|---|---|"]
    for b in by_size["buckets"]:
        lines.append("| " + " | ".join(_fmt(b[k]) for k in ("label", "ref_lesions", "ref_detected", "recall",
                                                            "pred_lesions", "pred_correct", "precision")) + " |")
    lines += ["", f"False-positive lesions per volume: {_fmt(by_size['fp_lesions_per_volume'])} (mean over cases; "
                  "per case in the table below). Size = equivalent-sphere diameter (6V/pi)^(1/3) from the voxel "
                  "count and spacing; reference lesions are bucketed for recall, predicted lesions for precision, "
                  "each by its own diameter; matching: IoU > 0.5 with the touching components."]
    return lines
