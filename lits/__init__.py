"""Liver-tumour segmentation of abdominal CT (LiTS17) as a distributed batch workflow on Ray.

Nothing runs at import, and importing `lits` imports no submodule. The core modules (ct, masks,
volumes, synthetic, slicing, postprocess, metrics, shards, ...) import no Ray; the Ray adapters
(pipeline, ingest, training, serving, jobs, job_tasks, ...) import it; see ARCHITECTURE.md.
"""

__version__ = "0.1.0"
