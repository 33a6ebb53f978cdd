"""One frozen dataclass per stage; defaults equal the command-line defaults.

Validation happens in ``__post_init__`` and raises ValueError with a message naming the field,
so a bad flag is one clear line, never an assert or a traceback from deep inside a worker.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

INPUT_FORMATS = ("auto", "nifti", "images")
SYNTH_FORMATS = ("nifti", "images")
COLORMAPS = ("Blues", "gray", "viridis", "bone", "Greens", "magma")


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1, got {value}")


@dataclass(frozen=True)
class PrepareConfig:
    """Everything `workflows/prepare.py` does, as data.

    Attributes:
        input: URI of the dataset root (local path, file://, s3://).
        output: URI of the output root; `train/`, `val/`, `test/` and `manifest.json` go under it.
        format: 'nifti' (volume-N / segmentation-N pairs), 'images' (converted JPG/PNG dataset) or
            'auto' (whichever is found).
        image_size: side of the square output images and masks, pixels.
        keep_liver: fraction of liver-only slices kept (seeded); tumour slices are always kept.
        keep_empty: fraction of slices without liver kept (seeded).
        context: 0 for the three-window image; 1 for 2.5-D (liver window of z-1, z, z+1).
        roi: crop every slice to a square box around the volume's reference liver before resizing
            (lits.core.roi.training_box): training data for a cascade's second stage (NIfTI pairs only).
        val_fraction, test_fraction: fractions of *volumes* in the val and test splits.
        seed: seeds the split and the slice filter.
        strict: exit non-zero when any input failed.
        max_voxels: a NIfTI whose header declares more voxels is refused before it is inflated
            (the default is lits.core.volumes.MAX_VOXELS, 4x the largest LiTS volume).
    """

    input: str
    output: str
    format: str = "auto"
    image_size: int = 256
    keep_liver: float = 0.2
    keep_empty: float = 0.05
    context: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    strict: bool = False
    max_voxels: int = 2 ** 30
    roi: bool = False

    def __post_init__(self) -> None:
        if not self.input:
            raise ValueError("input must name a folder or bucket prefix")
        if not self.output:
            raise ValueError("output must name a folder or bucket prefix")
        if self.format not in INPUT_FORMATS:
            raise ValueError(f"format must be one of {', '.join(INPUT_FORMATS)}, got {self.format!r}")
        if not 16 <= self.image_size <= 2048:
            raise ValueError(f"image_size must be between 16 and 2048 pixels, got {self.image_size}")
        _check_fraction("keep_liver", self.keep_liver)
        _check_fraction("keep_empty", self.keep_empty)
        _check_fraction("val_fraction", self.val_fraction)
        _check_fraction("test_fraction", self.test_fraction)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must leave volumes for training, got "
                f"{self.val_fraction} + {self.test_fraction}"
            )
        if self.context not in (0, 1):
            raise ValueError(f"context must be 0 (three windows) or 1 (2.5-D: z-1, z, z+1), got {self.context}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.max_voxels < 8:
            raise ValueError(f"max_voxels must be at least 8 (2x2x2), got {self.max_voxels}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SynthConfig:
    """Seeded LiTS-like phantoms (`workflows/synthesize.py`).

    Attributes:
        output: local folder to write into.
        volumes: number of volumes (ids 0..volumes-1 unless first_id is set).
        size: in-plane matrix size; spacing grows as size shrinks so the field of view stays
            that of a 512-matrix abdominal CT.
        slices: number of axial slices.
        format: 'nifti' (volume-N.nii.gz + segmentation-N.nii.gz) or 'images' (the converted
            JPG dataset with colour-mapped masks).
        colormap: the sequential colormap masks are rendered with (images format).
        seed: base seed; volume N uses (seed, N).
        compress: write .nii.gz (True) or .nii.
        anatomy: 'simple' (an ellipse of liver in an ellipse of body: synthetic.make_phantom) or
            'abdomen' (domain-randomised organs, vessels and tumours: lits.core.anatomy).
    """

    output: str
    volumes: int = 4
    size: int = 512
    slices: int = 120
    format: str = "nifti"
    colormap: str = "Blues"
    seed: int = 0
    compress: bool = True
    first_id: int = 0
    anatomy: str = "simple"
    ANATOMIES = ("simple", "abdomen")  # the choices of `anatomy`; no annotation, so not a field

    def __post_init__(self) -> None:
        if self.volumes < 1:
            raise ValueError(f"volumes must be >= 1, got {self.volumes}")
        if not 32 <= self.size <= 1024:
            raise ValueError(f"size must be between 32 and 1024, got {self.size}")
        if not 8 <= self.slices <= 1000:
            raise ValueError(f"slices must be between 8 and 1000, got {self.slices}")
        if self.format not in SYNTH_FORMATS:
            raise ValueError(f"format must be one of {', '.join(SYNTH_FORMATS)}, got {self.format!r}")
        if self.colormap not in COLORMAPS:
            raise ValueError(f"colormap must be one of {', '.join(COLORMAPS)}, got {self.colormap!r}")
        if self.anatomy not in self.ANATOMIES:
            raise ValueError(f"anatomy must be one of {', '.join(self.ANATOMIES)}, got {self.anatomy!r}")
        if self.seed < 0 or self.first_id < 0:
            raise ValueError("seed and first_id must be >= 0")


TASKS = ("liver-tumour", "tumour")
AMP_MODES = ("auto", "off")
INGEST_MODES = ("auto", "materialize", "stream")
SCHEDULES = ("poly", "plateau")
NORMS = ("batch", "instance")  # the U-Net's normalisation (lits.model.unet)


@dataclass(frozen=True)
class TrainConfig:
    """Everything `workflows/train.py` does, as data.

    Attributes:
        data: URI of a prepared dataset (holds manifest.json, train/, val/).
        output: URI for checkpoints (under output/<name>/), metrics.csv, curves.png and model/.
        num_gpus: data-parallel GPU workers (one GPU each); 0 trains on CPU workers.
        num_workers: workers; None means num_gpus on GPU and 1 on CPU.
        epochs, batch_size (the global batch: each of N workers takes batch_size / N), lr: the original's 55, 32, 1e-4.
        task: 'liver-tumour' (3-class softmax) or 'tumour' (the original's binary sigmoid).
        base_width, depth: U-Net size (64 and 5: the original's 31 M parameters).
        norm: 'batch' (the original's BatchNorm; see precise_bn) or 'instance' (nnU-Net's
            InstanceNorm: no stored statistics, but each patch loses its absolute HU level; it scored
            lower on CT phantoms, docs/benchmarks.md).
        amp: 'auto' (bf16 autocast on GPUs that support it, fp16 otherwise; off on CPU) or 'off'.
        max_failures: worker-group restarts from the last checkpoint before giving up.
        name: run name; the same name in the same output resumes.
        schedule: 'poly' (nnU-Net: a one-epoch linear warm-up, then lr * (1 - t)^0.9 over the run,
            no early stopping) or 'plateau' (the original's: lr / 10 at lr_drop_epoch and after
            plateau_patience epochs without val-loss improvement, early stop after patience).
        lr_drop_epoch: the original's fixed drop to lr/10 ('plateau' only).
        patience: early stopping on val loss ('plateau' only; best weights kept in both).
        plateau_patience: epochs without improvement before lr /= 10 ('plateau' only).
        crop: side of the square training patches in pixels; None: half the prepared image size.
            Each streamed batch of slices gives (S // crop)^2 patch batches, so an epoch covers the
            pixels of one pass over the split in that many more (cheaper) steps; crop = S trains on
            whole slices, as the original did.
        tumour_fraction: least share of patches centred on tumour in every training batch (nnU-Net
            forces a third to hold foreground). 0 (default) crops at random: prepare's filter already
            keeps every tumour slice and few others, and forcing a third more cost 0.08 tumour Dice
            on unseen scans (benchmarks/levers.py); set it when prepare keeps most slices.
        augment: the original's random affine and flips.
        scale_aug: the affine's zoom range: scale in [1 - scale_aug, 1 + scale_aug] (the original's
            0.05; nnU-Net's 0.7-1.4 is about 0.3).
        intensity_aug: probability with which each of nnU-Net's intensity augmentations (brightness,
            shift, contrast, gamma, noise, blur; lits.train.augment) is applied to a sample; 0: none.
        lesion_loss: weight of a per-lesion Dice term added to the loss (blob loss, Kofler et al.
            2023; lits.train.losses): each tumour component of a patch scored on its own, so small
            lesions weigh as much as large ones. 0 (default): the batch Dice and cross-entropy only.
        precise_bn: whole training slices per worker (a uniform sample of each epoch's) on which
            BatchNorm's statistics are recomputed with the epoch's final weights; validation keeps
            them or the moving average, whichever validates better (lits.train.precise_bn). 0: the
            moving average of the last batches, whose swing made validation untrustworthy.
        steps_per_epoch: cap on optimizer steps per epoch (None: the whole train split).
        cpus_per_worker: CPUs (and torch threads) per worker.
        checkpoint_interval_s: a checkpoint (and curves.png) after the first epoch that ends this
            long after the last one, and after the last epoch; uploaded in the background.
            metrics.csv is rewritten every epoch. 0 checkpoints every epoch.
        ingest: 'auto' (materialise the decoded splits when they fit in materialize_gb, else stream),
            'materialize' or 'stream' (lits.train.ingest); fixed at launch from the data, never from
            which nodes are up.
        materialize_gb: the largest decoded train + val size 'auto' materialises (it lives in the
            object stores of the cluster; Ray gives each node ~30% of its memory).
        prefetch_batches: batches each worker's ingest decodes ahead of the training step.
        first_stage: URI of an exported whole-slice model (train.py's OUT/model): `data` is then
            prepare --roi crops, and the exported model is a cascade holding a copy of it
            (OUT/model/first_stage): it finds the liver, this model segments the liver's box.
    """

    data: str
    output: str
    num_gpus: int = 0
    num_workers: Optional[int] = None
    epochs: int = 55
    batch_size: int = 32
    lr: float = 1e-4
    task: str = "liver-tumour"
    base_width: int = 64
    depth: int = 5
    norm: str = "batch"
    amp: str = "auto"
    max_failures: int = 2
    name: str = "lits-unet"
    seed: int = 0
    schedule: str = "poly"
    lr_drop_epoch: int = 30
    patience: int = 5
    plateau_patience: int = 3
    crop: Optional[int] = None
    tumour_fraction: float = 0.0
    augment: bool = True
    scale_aug: float = 0.05
    intensity_aug: float = 0.0
    lesion_loss: float = 0.0
    precise_bn: int = 64
    steps_per_epoch: Optional[int] = None
    cpus_per_worker: int = 1
    checkpoint_interval_s: float = 120.0
    ingest: str = "auto"
    materialize_gb: float = 4.0
    prefetch_batches: int = 2
    first_stage: Optional[str] = None

    def __post_init__(self) -> None:
        if self.cpus_per_worker < 1:
            raise ValueError(f"cpus_per_worker must be >= 1, got {self.cpus_per_worker}")
        if self.num_gpus < 0:
            raise ValueError(f"num_gpus must be >= 0, got {self.num_gpus}")
        if self.num_workers is not None and self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.num_gpus and self.num_workers not in (None, self.num_gpus):
            raise ValueError(f"with --num-gpus {self.num_gpus} each worker takes one GPU: leave --num-workers out or set it to {self.num_gpus}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.base_width < 1 or not 2 <= self.depth <= 7:
            raise ValueError("base_width must be >= 1 and depth between 2 and 7")
        if self.precise_bn < 0:
            raise ValueError(f"precise_bn must be >= 0 slices, got {self.precise_bn}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        _check_fraction("tumour_fraction", self.tumour_fraction)
        _check_fraction("intensity_aug", self.intensity_aug)
        if not 0 <= self.lesion_loss <= 10:
            raise ValueError(f"lesion_loss must be in [0, 10], got {self.lesion_loss}")
        if not 0 <= self.scale_aug <= 0.5:
            raise ValueError(f"scale_aug must be in [0, 0.5], got {self.scale_aug}")
        if self.crop is not None and self.crop < 8:
            raise ValueError(f"crop must be >= 8 pixels, got {self.crop}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if self.max_failures < 0:
            raise ValueError("max_failures must be >= 0")
        if self.checkpoint_interval_s < 0:
            raise ValueError(f"checkpoint_interval_s must be >= 0, got {self.checkpoint_interval_s}")
        if self.ingest not in INGEST_MODES:
            raise ValueError(f"ingest must be one of {', '.join(INGEST_MODES)}, got {self.ingest!r}")
        if self.materialize_gb < 0 or self.prefetch_batches < 1:
            raise ValueError("materialize_gb must be >= 0 and prefetch_batches >= 1")
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty word without '/', got {self.name!r}")

    @property
    def workers(self) -> int:
        return self.num_gpus if self.num_gpus else (self.num_workers or 1)

    @property
    def classes(self) -> int:
        return 3 if self.task == "liver-tumour" else 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ServeConfig:
    """The Ray Serve app (`workflows/serve.py`) and the bulk jobs it runs.

    Attributes:
        model: URI of an exported model folder (weights.pt + config.json).
        replicas: fixed number of model replicas, or None to autoscale between min and max.
        min_replicas, max_replicas: autoscaling bounds (used when replicas is None).
        num_gpus_per_replica: 0 (CPU) or 1.
        cpus_per_replica: CPUs reserved (and torch threads) per model replica.
        max_batch_size: slices per forward pass, gathered across requests by @serve.batch.
        batch_wait_s: how long a replica waits to fill a batch.
        chunk: slices a volume sends per request (a volume pipelines its chunks).
        host, port: where the HTTP proxy listens.
        allow_prefixes: URI prefixes jobs may read and write; empty: any s3:// URI, no local path.
        max_body_mb: largest accepted request body (a /v1/segment upload).
        job_concurrency: volumes in flight per job; None: the volume pool's CPUs / cpus_per_volume.
        cpus_per_volume: CPUs each volume task reserves (it waits on the model part of the time).
        token_sha256: sha256 hex of the API token (from LITS_API_TOKEN); None: no auth.
        volume_cpus: CPUs reserved for volume tasks (a placement group); None: what is free once the
            replicas are placed, less what autoscaling to max_replicas would take.
        jobs_state: folder or s3:// prefix of the job records; None: $LITS_JOBS_STATE or ~/.cache/lits/jobs.
        model_wait_s: longest a chunk goes unanswered while the model makes no progress before it is
            sent again (time it queues behind other work while the model is busy does not count).
        volumes_per_replica: volumes a job keeps in flight per running model replica (its queue);
            CPU work runs ahead of the model only this far.
        max_uploads: /v1/segment uploads segmented at once (their bodies already read); more wait their turn.
        max_jobs: bulk jobs running at once; more wait queued (state 'queued') and start as others end.
        body_grace_s, min_body_kbps: a request body must keep arriving at min_body_kbps KB/s after
            body_grace_s seconds, else 408 (a stalled client holds no upload slot).
        single_server_watches: this server is the only one that runs watches on its buckets, so a store
            that ignores conditional writes (a watch's lease needs them) is accepted, with a warning.
    """

    model: str
    replicas: Optional[int] = 1
    min_replicas: int = 1
    max_replicas: int = 1
    num_gpus_per_replica: float = 0
    cpus_per_replica: int = 1
    max_batch_size: int = 32
    batch_wait_s: float = 0.01
    chunk: int = 16
    host: str = "127.0.0.1"
    port: int = 8000
    allow_prefixes: Tuple[str, ...] = ()
    max_body_mb: int = 1024
    job_concurrency: Optional[int] = None
    cpus_per_volume: float = 1.0
    token_sha256: Optional[str] = None
    volume_cpus: Optional[float] = None
    jobs_state: Optional[str] = None
    model_wait_s: float = 60.0
    max_uploads: int = 8
    max_jobs: int = 4
    volumes_per_replica: int = 3
    body_grace_s: float = 10.0
    min_body_kbps: float = 64.0
    single_server_watches: bool = False

    def __post_init__(self) -> None:
        if self.replicas is not None and self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.replicas is None and not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                             f"{self.min_replicas}..{self.max_replicas}")
        if self.num_gpus_per_replica not in (0, 1):
            raise ValueError(f"num_gpus_per_replica must be 0 or 1, got {self.num_gpus_per_replica}")
        if self.cpus_per_replica < 1 and not self.num_gpus_per_replica:
            raise ValueError("cpus_per_replica must be >= 1 for CPU replicas")
        if not 1 <= self.max_batch_size <= 1024:
            raise ValueError(f"max_batch_size must be between 1 and 1024, got {self.max_batch_size}")
        if not 1 <= self.chunk <= self.max_batch_size:
            raise ValueError(f"chunk must be between 1 and max_batch_size ({self.max_batch_size}), got {self.chunk}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be between 1 and 65535, got {self.port}")
        if self.max_body_mb < 1:
            raise ValueError(f"max_body_mb must be >= 1, got {self.max_body_mb}")
        if not 0 < self.cpus_per_volume <= 64:
            raise ValueError(f"cpus_per_volume must be in (0, 64], got {self.cpus_per_volume}")
        if self.job_concurrency is not None and self.job_concurrency < 1:
            raise ValueError(f"job_concurrency must be >= 1, got {self.job_concurrency}")
        if self.volume_cpus is not None and self.volume_cpus < max(1.0, self.cpus_per_volume):
            raise ValueError(f"volume_cpus must be >= max(1, cpus_per_volume), got {self.volume_cpus}")
        if not self.model_wait_s > 0:
            raise ValueError(f"model_wait_s must be > 0, got {self.model_wait_s}")
        if self.max_uploads < 1:
            raise ValueError(f"max_uploads must be >= 1, got {self.max_uploads}")
        if self.max_jobs < 1:
            raise ValueError(f"max_jobs must be >= 1, got {self.max_jobs}")
        if not 1 <= self.volumes_per_replica <= 64:
            raise ValueError(f"volumes_per_replica must be between 1 and 64, got {self.volumes_per_replica}")
        if not self.body_grace_s > 0 or not self.min_body_kbps > 0:
            raise ValueError(f"body_grace_s and min_body_kbps must be > 0, got {self.body_grace_s}, {self.min_body_kbps}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class EvaluateConfig:
    """What `workflows/evaluate.py` scores, as data.

    Attributes:
        pred: folder or s3:// prefix of predicted segmentations ('<name>_seg.nii.gz' or
            'segmentation-N.nii[.gz]').
        ref: folder or s3:// prefix of reference segmentations ('segmentation-N.nii[.gz]').
        output: where metrics.csv, summary.json, report.md and the pictures go; None: PRED/_evaluation.
        images: folder or s3:// prefix of the CT volumes drawn under the overlays; None: no pictures
            of the CT.
        local: evaluate in this process, without Ray.
    """

    pred: str
    ref: str
    output: Optional[str] = None
    images: Optional[str] = None
    local: bool = False

    def __post_init__(self) -> None:
        for name in ("pred", "ref"):
            if not getattr(self, name):
                raise ValueError(f"{name} must be a folder or an s3:// prefix")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
