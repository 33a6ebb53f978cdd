"""Human-readable summaries of stage results (plain text tables)."""

from __future__ import annotations

from typing import Dict, List, Sequence

from lits.schema import CATEGORY_NAMES, SPLITS


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
    else:
        text.append(f"no volume succeeded; {output} was left as it was")
    return "\n".join(text)
