"""Agreement of a predicted mask with another model's liver, in world coordinates.

For a scan whose only reference is another model's output (the real series in tests/data carries
TotalSegmentator's liver), the figures are agreement, not accuracy: the liver Dice between the two
(labels 1 and 2 are liver in ours) on one voxel lattice, wherever each volume lies, and the tumour
our mask holds (there is no tumour reference: on a scan without tumours it is what the model invents).
"""

from __future__ import annotations

from typing import Dict

import numpy as np

from lits.core import dicom_seg, volumes


def _read(uri: str):
    if uri.endswith(".dcm"):
        return dicom_seg.read_seg(uri)
    return volumes.read_nifti(uri)


def liver_agreement(pred_uri: str, ref_uri: str) -> Dict[str, float]:
    """{'liver_dice', 'pred_liver_ml', 'ref_liver_ml', 'pred_tumour_ml', 'pred_lesions'} of a predicted
    mask (NIfTI or DICOM-SEG) against a reference liver mask (nonzero = liver), compared in world
    coordinates (`dicom_seg.common_grid`).

    Raises:
        ValueError: the two do not share a voxel lattice (other spacing or orientation).
    """
    from scipy import ndimage

    pred, pred_geometry = _read(pred_uri)
    ref, ref_geometry = _read(ref_uri)
    pred, ref, geometry = dicom_seg.common_grid(np.asarray(pred), pred_geometry, np.asarray(ref), ref_geometry)
    voxel_ml = float(np.prod(geometry.spacing)) / 1000.0
    pred_liver, ref_liver = pred >= 1, ref >= 1
    both = int(np.count_nonzero(pred_liver & ref_liver))
    total = int(np.count_nonzero(pred_liver)) + int(np.count_nonzero(ref_liver))
    tumour = pred == 2
    return {"liver_dice": round(2.0 * both / total, 4) if total else 1.0,
            "pred_liver_ml": round(np.count_nonzero(pred_liver) * voxel_ml, 1),
            "ref_liver_ml": round(np.count_nonzero(ref_liver) * voxel_ml, 1),
            "pred_tumour_ml": round(np.count_nonzero(tumour) * voxel_ml, 2),
            "pred_lesions": int(ndimage.label(tumour)[1])}
