"""Names, label ids, window presets and the slice-table schema shared by every stage.

Axis order, stated once:
- A NIfTI file's array is in *file* order (i, j, k) with its own affine.
- Every volume is brought to the *canonical* layout ``(Z, H, W)``: Z runs inferior -> superior,
  H (image rows) anterior -> posterior, W (image columns) patient right -> left, so ``hu[z]``
  is an axial slice in the radiological view (the patient's right on the image's left). In
  NIfTI axis codes this is an LPS array transposed to (S, P, L).
- A slice image is uint8 ``(H, W, C)``; a slice mask is uint8 ``(H, W)`` with values in LABELS.
"""

from __future__ import annotations

# Label ids of LiTS segmentations.
BACKGROUND = 0
LIVER = 1
TUMOUR = 2
LABELS = (BACKGROUND, LIVER, TUMOUR)
CLASS_NAMES = ("background", "liver", "tumour")

# Slice categories: what a slice's mask contains (0: empty).
CATEGORY_LIVER = 1
CATEGORY_TUMOUR = 2
CATEGORY_NAMES = ("empty", "liver", "tumour")

# HU windows as (width, level). LIVER is fastai's dicom_windows.liver; CUSTOM is the original
# project's second channel, a little wider and brighter so enhanced liver and tumour separate.
WINDOW_LIVER = (150.0, 30.0)
WINDOW_CUSTOM = (200.0, 60.0)
# Number of frequency-histogram bins of the third channel (fastai's freqhist_bins default).
FREQHIST_BINS = 100

SPLITS = ("train", "val", "test")


def volume_number(volume_id: str) -> int:
    """N of 'volume-N': the key volumes are listed and reported by (numerically: volume-9 before
    volume-10)."""
    return int(volume_id.split("-")[1])

# Parquet slice table: column -> (arrow/numpy type, shape per row). `image` and `mask` are
# fixed_size_binary columns with the row shape in their field metadata; lits.core.shards reads them
# (and the tensor-extension columns of format-1 shards) back into arrays of these shapes.
#   volume_id    string, e.g. 'volume-17'
#   slice_index  int32, index along the axial axis of the original file
#   category     int8, 0 empty / 1 liver only / 2 liver and tumour
#   image        uint8 (H, W, C), C-ordered bytes in a fixed_size_binary column
#   mask         uint8 (H, W), labels 0/1/2, C-ordered bytes in a fixed_size_binary column
#   spacing      float32 list of 3: (x, y, z) = (column, row, slice) spacing in mm of the original
#                voxels (SimpleITK's order); NaN when unknown (image-dataset input)
COLUMNS = ("volume_id", "slice_index", "category", "image", "mask", "spacing")

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 2  # 2: fixed_size_binary image/mask columns (1: Ray tensor columns, still read)
