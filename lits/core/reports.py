"""What people read and look at: summaries of stage results (aligned text tables), progress lines,
per-volume measurements of a predicted label volume, CSV files, and the pictures (contact sheets,
comparison sheets, previews) that go with them."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from lits.core import ct, naming, postprocess
from lits.core.schema import CATEGORY_NAMES, LIVER, SPLITS, TUMOUR, WINDOW_LIVER


def table(header: Sequence[str], rows: List[Sequence], align_right_from: int = 1) -> str:
    """A fixed-width text table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r):
        return "  ".join(c.rjust(w) if i >= align_right_from else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def prepare_summary(manifest: Dict, output: str) -> str:
    """The table that ends `prepare`: slices per category and split, then every failure."""
    totals = manifest["totals"]
    rows = []
    for split in SPLITS:
        s = manifest["splits"][split]
        rows.append([split, s["volumes"], *(s["kept"][c] for c in CATEGORY_NAMES), s["slices"], len(s["shards"])])
    rows.append(["all (kept)", totals["volumes"], *(totals["kept"][c] for c in CATEGORY_NAMES),
                 sum(totals["kept"].values()), sum(len(manifest["splits"][s]["shards"]) for s in SPLITS)])
    rows.append(["all (before filter)", totals["volumes"], *(totals["slices"][c] for c in CATEGORY_NAMES),
                 sum(totals["slices"].values()), ""])
    text = [
        f"prepared {totals['volumes']} volume(s) from {manifest['input']} ({manifest['input_format']}) "
        f"in {manifest['seconds']:.1f} s",
        "",
        table(["split", "volumes", *CATEGORY_NAMES, "slices", "shards"], rows),
        "",
    ]
    failed = manifest["failed"]
    if failed:
        text.append(f"failed inputs: {len(failed)}")
        text += [f"  {f['input']}: {f['reason']}" for f in failed]
        text.append("")
    if totals["volumes"]:
        text.append(f"output: {output} (manifest.json, {', '.join(s + '/' for s in SPLITS)})")
        if manifest.get("preview"):
            text.append(f"picture of sample slices: {output.rstrip('/')}/{manifest['preview']}")
    else:
        text.append(f"no volume succeeded; {output} was left as it was")
    return "\n".join(text)


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """An RGB picture of one slice: its first channel in grey with liver (green) and tumour (red)
    outlines.

    Args:
        image: uint8 (H, W, C).
        mask: uint8 (H, W) labels.
    Returns:
        uint8 (H, W, 3) RGB.
    """
    grey = np.repeat(image[..., :1], 3, axis=2).copy()
    _outline(grey, mask, ((1, (0, 220, 0)), (2, (255, 40, 40))))
    return grey


def contact_sheet(tiles: List[Tuple[str, np.ndarray, np.ndarray]], columns: int = 4, tile: int = 192) -> bytes:
    """PNG bytes of a grid of slice overlays, each captioned.

    Args:
        tiles: (caption, image uint8 (H, W, C), mask uint8 (H, W)) per slice.
        columns: tiles per row.
        tile: side of each tile in pixels.
    """
    rows = max(1, -(-len(tiles) // columns))
    sheet = np.full((rows * (tile + 18), columns * tile, 3), 24, np.uint8)
    for n, (caption, image, mask) in enumerate(tiles):
        r, c = divmod(n, columns)
        picture = cv2.resize(overlay(image, mask), (tile, tile), interpolation=cv2.INTER_NEAREST)
        y, x = r * (tile + 18), c * tile
        sheet[y + 18:y + 18 + tile, x:x + tile] = picture
        cv2.putText(sheet, caption[:32], (x + 3, y + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (230, 230, 230), 1, cv2.LINE_AA)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    return buf.tobytes()


def progress_line(job: Dict, width: int = 30) -> str:
    """One line of a job's progress: bar, counts, throughput."""
    c = job["counts"]
    finished = c["done"] + c["skipped"] + c["failed"]
    filled = int(round(width * job["progress"]))
    rate = f", {job['slices_per_s']:.1f} slices/s" if job.get("slices_per_s") else ""
    total = c["total"] if c["total"] else "?"
    return (f"[{'#' * filled}{'.' * (width - filled)}] {finished}/{total} volumes "
            f"(done {c['done']}, skipped {c['skipped']}, failed {c['failed']}){rate} {job['state']}")


def job_summary(job: Dict) -> str:
    """The table that ends a bulk job: counts, throughput, every failed volume, where outputs are."""
    c = job["counts"]
    lines = [
        f"job {job['job_id']} {job['state']} in {job['elapsed_s']:.1f} s (model {job['model_id']})",
        "",
        table(["volumes", "done", "skipped", "failed", "ignored", "slices segmented", "slices/s"],
              [[c["total"], c["done"], c["skipped"], c["failed"], c["ignored"], job["slices_segmented"],
                job["slices_per_s"] if job["slices_per_s"] is not None else "-"]], align_right_from=0),
    ]
    if job.get("error"):
        lines += ["", f"error: {job['error']}"]
    if job["failed"]:
        lines += ["", f"failed volumes: {len(job['failed'])}"]
        lines += [f"  {f['input']}: {f['reason']}" for f in job["failed"]]
    lines += ["", f"outputs: {job['output']} ({naming.OUTPUTS_TEXT}); summary: {job['summary']}"]
    return "\n".join(lines)


# Outline colours (RGB) of comparison pictures: reference in green / red, prediction in cyan / yellow.
REFERENCE_COLOURS = ((1, (0, 200, 0)), (2, (255, 40, 40)))
PREDICTION_COLOURS = ((1, (0, 220, 255)), (2, (255, 230, 0)))


def _outline(picture: np.ndarray, labels: np.ndarray, colours) -> None:
    """Draw, in place, the outline of each region labels >= label in its (R, G, B) colour."""
    for label, colour in colours:
        region = (labels >= label).astype(np.uint8)
        contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(picture, contours, -1, colour, 1)


def comparison_sheet(tiles: List[Tuple[str, np.ndarray, np.ndarray, np.ndarray]], tile: int = 320) -> bytes:
    """PNG bytes of slices side by side, each with reference and predicted outlines.

    Args:
        tiles: (caption, grey uint8 (H, W), reference labels (H, W), predicted labels (H, W)).
        tile: side of each tile in pixels (outlines are drawn after resizing, so stay 1 px).
    """
    legend = 16
    sheet = np.full((tile + 18 + legend, len(tiles) * tile, 3), 24, np.uint8)
    for n, (caption, grey, ref, pred) in enumerate(tiles):
        picture = cv2.cvtColor(cv2.resize(grey, (tile, tile), interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2RGB)
        _outline(picture, cv2.resize(ref, (tile, tile), interpolation=cv2.INTER_NEAREST), REFERENCE_COLOURS)
        _outline(picture, cv2.resize(pred, (tile, tile), interpolation=cv2.INTER_NEAREST), PREDICTION_COLOURS)
        x = n * tile
        sheet[18:18 + tile, x:x + tile] = picture
        cv2.putText(sheet, caption[:48], (x + 3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (230, 230, 230), 1, cv2.LINE_AA)
    y = tile + 18 + 12
    for i, (text, colour) in enumerate((("reference liver", REFERENCE_COLOURS[0][1]), ("tumour", REFERENCE_COLOURS[1][1]),
                                        ("predicted liver", PREDICTION_COLOURS[0][1]), ("tumour", PREDICTION_COLOURS[1][1]))):
        cv2.putText(sheet, text, (4 + i * 120, y), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1, cv2.LINE_AA)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    return buf.tobytes()


def evaluation_summary(summary: Dict) -> str:
    """The table that ends `evaluate`: challenge aggregates per class, lesions, failures, outputs."""
    agg = summary["aggregate"]

    def f(v):
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    rows = [[name, f(c["dice_per_case"]), f(c["dice_global"]), f(c["voe"]), f(c["rvd"]), f(c["assd"]), f(c["mssd"]),
             f(c["slice_dice"]), f(c["slice_iou"])] for name, c in ((n, agg[n]) for n in ("liver", "tumour"))]
    les = agg["lesions"]
    lines = [f"evaluated {summary['cases_evaluated']} case(s) in {summary['seconds']:.1f} s", "",
             table(["class", "Dice/case", "Dice global", "VOE", "RVD", "ASSD mm", "MSSD mm", "slice Dice", "slice IoU"], rows),
             "", f"lesions: recall {f(les['recall'])} of {les['reference']}, precision {f(les['precision'])} of "
                 f"{les['predicted']} predicted; tumour burden RMSE {f(agg['tumour_burden']['rmse'])}"]
    if summary["failed"]:
        lines += ["", f"cases not evaluated: {len(summary['failed'])}"]
        lines += [f"  {x['case']}: {x['reason']}" for x in summary["failed"]]
    unmatched = len(summary["unmatched_pred"]) + len(summary["unmatched_ref"])
    if unmatched:
        lines += ["", f"unmatched files: {len(summary['unmatched_pred'])} prediction(s), {len(summary['unmatched_ref'])} "
                      "reference(s) (listed in report.md)"]
    lines += ["", f"outputs: {summary['output']} (metrics.csv, summary.json, report.md"
                  + (", overlays.png, dice_boxplot.png)" if summary.get("pictures") else ")")]
    return "\n".join(lines)


def volume_report(labels: np.ndarray, voxel_ml: float, task: str) -> Dict:
    """Per-volume measurements of a predicted label volume (any axis order; any box of it that
    holds every labelled voxel gives the same figures).

    Liver volume counts tumour (LiTS: liver is label >= 1); tumour burden is tumour / liver
    volume in percent; lesions are 3-D connected components of tumour (26-connectivity).
    """
    liver = int(np.count_nonzero(labels >= LIVER))
    tumour = int(np.count_nonzero(labels == TUMOUR))
    lesions = postprocess.component_sizes(labels == TUMOUR)
    return {
        "liver_volume_ml": round(liver * voxel_ml, 3) if task == "liver-tumour" else None,
        "tumour_volume_ml": round(tumour * voxel_ml, 3),
        "lesion_count": int(lesions.size),
        "lesion_volumes_ml": [round(float(v) * voxel_ml, 3) for v in lesions[:50]],
        "tumour_burden_percent": round(100.0 * tumour / liver, 3) if liver and task == "liver-tumour" else None,
        "voxel_volume_ml": voxel_ml,
    }


def preview_png(hu: np.ndarray, labels: np.ndarray, title: str, box: Optional[Tuple[slice, ...]] = None) -> bytes:
    """PNG of the predicted outlines over the liver window: the axial slice with the most liver
    (or tumour) and the coronal plane through it, superior up, the patient's right on the left.

    Args:
        hu, labels: canonical (Z, H, W) HU and uint8 labels.
        box: a box of `labels` holding every labelled voxel (only it is searched), or None.
    """
    z0, y0 = (box[0].start, box[1].start) if box else (0, 0)
    inner = labels[box] if box else labels
    area = np.count_nonzero(inner, axis=(1, 2))
    z = z0 + int(np.argmax(area)) if area.any() else len(labels) // 2
    rows = np.count_nonzero(inner[z - z0], axis=1) if area.any() else np.zeros(1)
    y = y0 + int(np.argmax(rows)) if rows.any() else labels.shape[1] // 2
    axial = ct.window(hu[z], *WINDOW_LIVER)[..., None]
    coronal = ct.window(hu[::-1, y, :], *WINDOW_LIVER)[..., None]
    return contact_sheet([(f"{title} axial {z}", axial, labels[z]),
                          (f"coronal {y}", coronal, np.ascontiguousarray(labels[::-1, y, :]))], columns=2, tile=256)


def csv_bytes(rows: Sequence[Dict], float_format: Optional[str] = None) -> bytes:
    """UTF-8 CSV of dict rows: the union of their keys as columns in first-seen order (rows that
    lack a column, e.g. from an older version, leave it empty); floats as `float_format` if given."""
    import csv
    import io

    columns: List[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (format(v, float_format) if float_format and isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue().encode()
