"""Liver-tumour segmentation of abdominal CT (LiTS17) as a distributed batch workflow on Ray.

Nothing runs at import: the core modules (ct, masks, volumes, synthetic) import numpy, cv2 and
nibabel only; the Ray adapters (pipeline, ...) are imported explicitly by the workflows.
"""

__version__ = "0.1.0"
