"""Evaluate predicted segmentations against references with the LiTS challenge metrics.

Pairs files by case, computes `metrics.volume_metrics` per pair (one Ray task each, or in
this process), aggregates the challenge's way (Dice per case and Dice global) and the original
notebook's way (slice-level Dice and IoU), and writes metrics.csv, summary.json, report.md,
overlays.png (worst, median and best cases: by tumour Dice among the cases whose reference holds
tumour) and dice_boxplot.png; lesion detection by size in lits.evaluate.lesions. summary.json is
written last.
Either side may be a DICOM Segmentation ('.dcm', lits.core.dicom_seg): then the pair is scored in
world coordinates, on the reference's voxel lattice (the box holding both: a SEG holds only the
slices its frames cover).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from lits.core import ct, dicom_seg, metrics, naming, reports, storage, volumes
from lits.evaluate import lesions
from lits.runtime import fanout
from lits.core.config import EvaluateConfig
from lits.core.errors import BadInputError, UserError
from lits.core.schema import WINDOW_LIVER

log = logging.getLogger(__name__)

CLASS_FIELDS = ("dice", "jaccard", "voe", "rvd", "assd", "mssd", "rmsd", "slice_dice", "slice_iou")
TUMOUR_FIELDS = ("ref_lesions", "ref_detected", "pred_lesions", "pred_correct")
AFFINE_TOLERANCE_MM = 1e-2


def case_key(uri: str) -> Optional[str]:
    """The case a file belongs to: 'volume-3_seg.nii.gz', 'volume-3_seg.dcm', 'segmentation-3.nii'
    -> '3'; other '<stem>_seg.nii.gz' / '<stem>_seg.dcm' / '<stem>.nii[.gz]' / '<stem>.dcm' ->
    '<stem>'; None for files that are neither NIfTI nor '.dcm'."""
    name = os.path.basename(uri)
    if naming.is_mask(name):
        stem = naming.mask_stem(name)
    elif name.endswith(naming.NIFTI_SUFFIXES):
        stem = naming.strip_nifti(name)
    elif name.endswith(naming.DICOM_SUFFIX):
        stem = name[: -len(naming.DICOM_SUFFIX)]
    else:
        return None
    match = re.fullmatch(r"(?:volume|segmentation)-(\d+)", stem)
    return str(int(match.group(1))) if match else stem


def _index(files: List[str], wanted: Callable[[str], bool]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for uri in files:
        key = case_key(uri)
        if key is not None and wanted(os.path.basename(uri)):
            out.setdefault(key, uri)
    return out


def pair_files(pred: str, ref: str, images: Optional[str] = None) -> Dict:
    """{'pairs': [(key, pred_uri, ref_uri, image_uri or None)], 'unmatched_pred': [...], 'unmatched_ref': [...]}.

    Predictions: '<name>_seg.nii[.gz]' or '<name>_seg.dcm' (bulk-job output), or 'segmentation-N.nii[.gz]'
    or 'segmentation-N.dcm'.
    References: 'segmentation-N.nii[.gz]' or 'segmentation-N.dcm' (or '<name>.nii[.gz]' / '<name>.dcm'
    matching a '<name>_seg' prediction); a '.dcm' is read as a DICOM Segmentation.
    Images (optional): 'volume-N.nii[.gz]'.
    """
    def is_pred(name: str) -> bool:
        return naming.is_mask(name) or naming.is_reference(name)

    def is_image(name: str) -> bool:  # a NIfTI CT (pictures read NIfTI only)
        return not naming.is_reference(name) and not naming.is_mask(name) and not name.endswith(naming.DICOM_SUFFIX)

    def is_ref(name: str) -> bool:
        return not naming.is_volume(name) and not naming.is_mask(name)

    preds = _index(storage.list_files(pred), is_pred)
    refs = _index(storage.list_files(ref), is_ref)
    imgs = _index(storage.list_files(images), is_image) if images else {}

    def order(k: str):
        return (0, int(k), "") if k.isdigit() else (1, 0, k)

    keys = sorted(set(preds) & set(refs), key=order)
    return {
        "pairs": [(k, preds[k], refs[k], imgs.get(k)) for k in keys],
        "unmatched_pred": [preds[k] for k in sorted(set(preds) - set(refs), key=order)],
        "unmatched_ref": [refs[k] for k in sorted(set(refs) - set(preds), key=order)],
    }


def _check_geometry(pred: volumes.Geometry, ref: volumes.Geometry, pred_uri: str, ref_uri: str) -> None:
    if pred.shape != ref.shape:
        raise BadInputError(f"{pred_uri}: geometry mismatch: shape {pred.shape} vs the reference's {ref.shape} "
                            f"({ref_uri}); predictions must be written on the reference's grid")
    diff = float(np.abs(pred.affine_array - ref.affine_array).max())
    if diff > AFFINE_TOLERANCE_MM:
        raise BadInputError(f"{pred_uri}: geometry mismatch: its affine differs from the reference's by up to "
                            f"{diff:.3g} mm ({pred.axcodes} vs {ref.axcodes}); resample it onto the reference's grid")


def _is_seg(uri: str) -> bool:
    return uri.endswith(naming.DICOM_SUFFIX)


def _read(uri: str) -> Tuple[np.ndarray, volumes.Geometry]:
    return dicom_seg.read_seg(uri) if _is_seg(uri) else volumes.read_nifti(uri)


def read_pair(pred_uri: str, ref_uri: str) -> Tuple[np.ndarray, np.ndarray, volumes.Geometry]:
    """(prediction, reference, geometry): uint8 labels on one grid, file order (i, j, k).

    Two NIfTI files must share the reference's grid (shape and affine). When either is a DICOM SEG,
    both go onto the reference's lattice in world coordinates (the box holding both, LPS axes).
    Raises BadInputError: an unreadable file, bad labels, or a geometry mismatch.
    """
    pred_raw, pred_geometry = _read(pred_uri)
    ref_raw, ref_geometry = _read(ref_uri)
    if not (_is_seg(pred_uri) or _is_seg(ref_uri)):
        _check_geometry(pred_geometry, ref_geometry, pred_uri, ref_uri)
        return volumes.as_labels(pred_raw, pred_uri), volumes.as_labels(ref_raw, ref_uri), ref_geometry
    pred, ref = volumes.as_labels(pred_raw, pred_uri), volumes.as_labels(ref_raw, ref_uri)
    try:
        return dicom_seg.common_grid(pred, pred_geometry, ref, ref_geometry, AFFINE_TOLERANCE_MM)
    except ValueError as exc:
        raise BadInputError(f"{pred_uri}: geometry mismatch: {exc} ({ref_uri}); predictions must be written on "
                            "the reference's series or grid") from exc


def evaluate_pair(key: str, pred_uri: str, ref_uri: str) -> Dict:
    """One row of metrics.csv (flattened) for a pair; {'case', 'error'} for an unusable pair."""
    t0 = time.perf_counter()
    row: Dict = {"case": key, "prediction": pred_uri, "reference": ref_uri}
    try:
        pred, ref, geometry = read_pair(pred_uri, ref_uri)
        m = metrics.volume_metrics(pred, ref, geometry.spacing, axial_axis=geometry.axial_axis)
    except BadInputError as exc:
        return {**row, "error": str(exc)}
    voxel_ml = float(np.prod(geometry.spacing)) / 1000.0
    for name in metrics.CLASSES:
        for field in CLASS_FIELDS + ("intersection", "pred_voxels", "ref_voxels", "slices_with_class"):
            row[f"{name}_{field}"] = m[name][field]
        row[f"{name}_ref_ml"] = m[name]["ref_voxels"] * voxel_ml
        row[f"{name}_pred_ml"] = m[name]["pred_voxels"] * voxel_ml
    for field in TUMOUR_FIELDS:
        row[f"tumour_{field}"] = m["tumour"][field]
    row.update(lesions.row_fields(m["tumour"]))
    row.update(burden_ref=m["tumour_burden"]["ref"], burden_pred=m["tumour_burden"]["pred"],
               burden_error=m["tumour_burden"]["error"], seconds=round(time.perf_counter() - t0, 3))
    return row


# --- running -----------------------------------------------------------------------------------

def run_local(pairs: List[Tuple]) -> Iterator[Dict]:
    for key, pred, ref, _ in pairs:
        yield evaluate_pair(key, pred, ref)


def run_ray(pairs: List[Tuple]) -> Iterator[Dict]:
    """One Ray task per pair (1 CPU each, two per CPU in flight as the cluster grows, a CPU per pair
    asked of the autoscaler), results as they finish."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=2)(evaluate_pair)
    for outcome in fanout.fan_out(task, [(key, pred, ref) for key, pred, ref, _ in pairs], {},
                                  fanout.window, ask_cpus=1):
        if outcome.error is not None:
            raise outcome.error
        yield outcome.value


# --- aggregation -------------------------------------------------------------------------------

def _mean(values) -> Optional[float]:
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(v)) if v else None


def aggregate(rows: List[Dict]) -> Dict:
    """Challenge aggregates over the evaluated rows (those without 'error')."""
    ok = [r for r in rows if "error" not in r]
    out: Dict = {"cases": len(ok)}
    for name in metrics.CLASSES:
        inter = sum(r[f"{name}_intersection"] for r in ok)
        size = sum(r[f"{name}_pred_voxels"] + r[f"{name}_ref_voxels"] for r in ok)
        c: Dict = {
            "dice_per_case": _mean(r[f"{name}_dice"] for r in ok),
            # a case without the class scores 1 when none is predicted: a model that predicts little tumour
            # anywhere raises the per-case mean without finding any; this mean does not move that way
            "dice_per_case_present": _mean(r[f"{name}_dice"] for r in ok if r[f"{name}_ref_voxels"] > 0),
            "dice_global": (2 * inter / size if size else 1.0) if ok else None,
        }
        for field in ("jaccard", "voe", "rvd", "assd", "mssd", "rmsd"):
            c[field] = _mean(r[f"{name}_{field}"] for r in ok)
        c["distance_undefined_cases"] = sum(1 for r in ok if math.isnan(r[f"{name}_assd"]))
        # the original notebook's numbers: smoothed per-slice scores over slices holding the class
        weights = [r[f"{name}_slices_with_class"] for r in ok]
        for field in ("slice_dice", "slice_iou"):
            vals = [(r[f"{name}_{field}"], w) for r, w in zip(ok, weights) if w]
            c[field] = float(sum(v * w for v, w in vals) / sum(w for _, w in vals)) if vals else None
        out[name] = c
    ref_lesions = sum(r["tumour_ref_lesions"] for r in ok)
    pred_lesions = sum(r["tumour_pred_lesions"] for r in ok)
    out["lesions"] = {
        "reference": ref_lesions,
        "detected": sum(r["tumour_ref_detected"] for r in ok),
        "predicted": pred_lesions,
        "recall": sum(r["tumour_ref_detected"] for r in ok) / ref_lesions if ref_lesions else None,
        "precision": sum(r["tumour_pred_correct"] for r in ok) / pred_lesions if pred_lesions else None,
    }
    out["lesions_by_size"] = lesions.aggregate(ok)
    errors = np.array([r["burden_error"] for r in ok], float)
    out["tumour_burden"] = {"rmse": float(np.sqrt(np.mean(errors ** 2))) if ok else None,
                            "max_abs_error": float(np.abs(errors).max()) if ok else None}
    return out


# --- pictures ----------------------------------------------------------------------------------

def rank_for_overlays(rows: List[Dict]) -> Tuple[str, List[Dict]]:
    """(ranked_by, evaluated rows worst first) for overlays.png.

    The cases whose reference holds tumour, by tumour Dice (ties by liver Dice): while any case has
    tumour, the cases without it are left out (their tumour Dice is 1 or 0 by the empty-mask rule,
    no measure of segmenting tumour). When no reference holds tumour, every case by liver Dice.
    ranked_by is 'tumour_dice' or 'liver_dice'.
    """
    ok = [r for r in rows if "error" not in r]
    with_tumour = [r for r in ok if r["tumour_ref_voxels"] > 0]
    if with_tumour:
        return "tumour_dice", sorted(with_tumour, key=lambda r: (r["tumour_dice"], r["liver_dice"]))
    return "liver_dice", sorted(ok, key=lambda r: r["liver_dice"])


def pick_cases(rows: List[Dict]) -> List[Tuple[str, Dict]]:
    """(label, row) for the worst, median and best cases of `rank_for_overlays`, worst first; each case
    once, under its extreme label when it is also the median (two cases: worst and best)."""
    _, ranked = rank_for_overlays(rows)
    if not ranked:
        return []
    chosen: Dict[int, str] = {}
    for label, i in (("worst", 0), ("best", len(ranked) - 1), ("median", len(ranked) // 2)):
        chosen.setdefault(i, label)
    return [(chosen[i], ranked[i]) for i in sorted(chosen)]


def case_picture(row: Dict, image_uri: Optional[str]) -> Tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """(caption, grey (H, W) uint8, reference (H, W), prediction (H, W)) of the axial slice with the
    most reference liver, canonical orientation, the CT's liver window when `image_uri` is given."""
    pred_file, ref_file, geometry = read_pair(row["prediction"], row["reference"])
    ref, pred = geometry.to_canonical(ref_file), geometry.to_canonical(pred_file)
    area = np.count_nonzero(ref, axis=(1, 2)) + np.count_nonzero(pred, axis=(1, 2))
    z = int(np.argmax(area))
    if image_uri:
        hu, image_geometry = volumes.read_nifti(image_uri)
        grey = image_geometry.to_canonical(hu)[z] if image_geometry.canonical_shape == geometry.canonical_shape else None
    else:
        grey = None
    grey = np.full(ref.shape[1:], 40, np.uint8) if grey is None else ct.window(grey, *WINDOW_LIVER)
    caption = f"case {row['case']}: liver {row['liver_dice']:.3f}, tumour {row['tumour_dice']:.3f}"
    return caption, grey, np.ascontiguousarray(ref[z]), np.ascontiguousarray(pred[z])


def boxplot_png(rows: List[Dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    data = [[r[f"{c}_dice"] for r in ok] for c in metrics.CLASSES]
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(metrics.CLASSES) + 1), labels=list(metrics.CLASSES))
    for i, values in enumerate(data, start=1):
        ax.scatter(np.full(len(values), i) + np.linspace(-0.08, 0.08, len(values)), values, s=10, alpha=0.6)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Dice per case")
    ax.set_title(f"{len(ok)} cases")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# --- outputs -----------------------------------------------------------------------------------

def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def report_md(summary: Dict, rows: List[Dict]) -> str:
    agg = summary["aggregate"]
    lines = [f"# LiTS evaluation: {summary['cases_evaluated']} case(s)", "",
             f"Predictions `{summary['pred']}`, references `{summary['ref']}`.", "",
             "| class | Dice per case | Dice global | Jaccard | VOE | RVD | ASSD mm | MSSD mm | RMSD mm | slice Dice | slice IoU |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in metrics.CLASSES:
        c = agg[name]
        lines.append("| " + " | ".join([name] + [_fmt(c[k]) for k in ("dice_per_case", "dice_global", "jaccard", "voe", "rvd",
                                                                        "assd", "mssd", "rmsd", "slice_dice", "slice_iou")]) + " |")
    les, burden = agg["lesions"], agg["tumour_burden"]
    lines += ["", f"Lesions: {les['reference']} in the references, {les['predicted']} predicted; recall "
                  f"{_fmt(les['recall'])}, precision {_fmt(les['precision'])} (IoU > 0.5). Tumour burden: RMSE "
                  f"{_fmt(burden['rmse'])}, max error {_fmt(burden['max_abs_error'])}.",
              "", "Slice Dice / IoU are the original notebook's (smoothed per-slice scores over slices holding the "
                  "class; it reported 0.85 / 0.74 for tumour on 200 tumour slices); Dice per case and Dice global "
                  "are the LiTS challenge's; a case without tumour scores tumour Dice 1 when none is predicted, so "
                  f"the tumour's Dice per case over the cases that hold tumour is "
                  f"{_fmt(agg['tumour']['dice_per_case_present'])}.", "", "## Lesion detection by size", ""]
    lines += lesions.table_md(agg["lesions_by_size"])
    lines += ["", "| case | liver Dice | tumour Dice | liver ASSD mm | tumour ASSD mm | lesions found / reference | FP lesions |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | error: {r['error']} | | | | | |")
        else:
            lines.append(f"| {r['case']} | {_fmt(r['liver_dice'])} | {_fmt(r['tumour_dice'])} | {_fmt(r['liver_assd'])} | "
                         f"{_fmt(r['tumour_assd'])} | {r['tumour_ref_detected']} / {r['tumour_ref_lesions']} | "
                         f"{r['tumour_fp_lesions']} |")
    if summary["unmatched_pred"] or summary["unmatched_ref"]:
        lines += ["", "Unmatched files (not evaluated):"]
        lines += [f"- prediction without reference: `{u}`" for u in summary["unmatched_pred"]]
        lines += [f"- reference without prediction: `{u}`" for u in summary["unmatched_ref"]]
    if summary.get("pictures"):
        shown = summary["overlays"]
        basis = ("tumour Dice, among the cases whose reference holds tumour" if shown["ranked_by"] == "tumour_dice"
                 else "liver Dice (no reference holds tumour)")
        cases = ", ".join(f"{label} case {case}" for label, case in shown["cases"].items())
        lines += ["", f"Overlays: {cases}; ranked by {basis}.", "",
                  "![worst, median and best cases](overlays.png)", "", "![Dice per case](dice_boxplot.png)"]
    return "\n".join(lines) + "\n"


def check_inputs(cfg: EvaluateConfig) -> None:
    """UserError naming the first of cfg's input folders that does not exist."""
    for uri in (cfg.pred, cfg.ref) + ((cfg.images,) if cfg.images else ()):
        storage.require(uri)


def evaluate(cfg: EvaluateConfig, progress: Optional[Callable[[int, int, Dict], None]] = None) -> Dict:
    """Evaluate every matched pair of `cfg`; write the outputs under cfg.output (default
    PRED/_evaluation); one Ray task per case, or in this process with cfg.local.

    Raises:
        UserError: a missing folder, or no pair at all.
    """
    check_inputs(cfg)
    pred, ref = storage.normalise(cfg.pred), storage.normalise(cfg.ref)
    output = storage.normalise(cfg.output) if cfg.output else storage.join(pred, "_evaluation")
    images = storage.normalise(cfg.images) if cfg.images else None
    runner = run_local if cfg.local else run_ray
    found = pair_files(pred, ref, images)
    if not found["pairs"]:
        raise UserError(f"no prediction under {pred} matches a reference under {ref} (predictions: '<name>_seg.nii.gz', "
                        f"'<name>_seg.dcm' or 'segmentation-N.nii[.gz]'; references: 'segmentation-N.nii[.gz]' or "
                        f"'segmentation-N.dcm'); "
                        f"{len(found['unmatched_pred'])} prediction(s), {len(found['unmatched_ref'])} reference(s) found")
    return evaluate_pairs(found, output, {"pred": pred, "ref": ref, "images": images}, runner, progress)


def evaluate_pairs(found: Dict, output: str, sources: Dict, runner: Callable = run_ray,
                   progress: Optional[Callable[[int, int, Dict], None]] = None) -> Dict:
    """Evaluate `found['pairs']` ((case, pred URI, ref URI, image URI or None)) and write the outputs.

    Args:
        found: as `pair_files` returns it.
        output: folder or prefix for metrics.csv, report.md, pictures and summary.json (last).
        sources: {'pred', 'ref', 'images'}: what the report says was compared.
    """
    t0 = time.perf_counter()
    output = storage.normalise(output)
    storage.check_writable(output)
    rows: List[Dict] = []
    for row in runner(found["pairs"]):
        rows.append(row)
        if progress:
            progress(len(rows), len(found["pairs"]), row)
    order = {k: i for i, (k, *_) in enumerate(found["pairs"])}
    rows.sort(key=lambda r: order[r["case"]])
    image_of = {k: img for k, _, _, img in found["pairs"]}
    summary = {
        **sources, "output": output,
        "cases_evaluated": sum(1 for r in rows if "error" not in r),
        "failed": [{"case": r["case"], "prediction": r["prediction"], "reason": r["error"]} for r in rows if "error" in r],
        "unmatched_pred": found.get("unmatched_pred", []), "unmatched_ref": found.get("unmatched_ref", []),
        "aggregate": aggregate(rows),
    }
    picks = pick_cases(rows)
    if picks:
        summary["overlays"] = {"ranked_by": rank_for_overlays(rows)[0], "cases": {label: r["case"] for label, r in picks}}
        tiles = []
        for label, row in picks:
            caption, grey, ref_slice, pred_slice = case_picture(row, image_of.get(row["case"]))
            tiles.append((f"{label} {caption}", grey, ref_slice, pred_slice))
        storage.write_bytes(storage.join(output, "overlays.png"), reports.comparison_sheet(tiles))
        storage.write_bytes(storage.join(output, "dice_boxplot.png"), boxplot_png(rows))
        summary["pictures"] = ["overlays.png", "dice_boxplot.png"]
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    storage.write_bytes(storage.join(output, "metrics.csv"), reports.csv_bytes(rows))
    storage.write_bytes(storage.join(output, "report.md"), report_md(summary, rows).encode())
    storage.write_bytes(storage.join(output, "summary.json"), json.dumps(summary, indent=1).encode())
    return summary
