"""Predict a volume with an exported model (no Ray): load, preprocess, predict, undo, report.

One volume's path, the same in a bulk job, in `/v1/segment` and in a plain loop:

    file-order voxels --Geometry.to_canonical--> (Z, H, W) HU
      --ct.slice_image + ct.resize_image (prepare's functions, config.json's parameters)--> (Z, S, S, 3) uint8
      --predict (batched, anywhere: in-process or a Serve replica; probabilities resized to (H, W)
        bilinearly and argmaxed where the model runs, on its GPU when it has one)--> (Z, H, W) labels
      --postprocess.guided_keep + apply_keep (largest liver component, tumour inside it; in its box)
      --> file-order uint8 labels with the input's affine (written in file order from the start).

Every stage overlaps the model: chunks of slices are preprocessed on the volume task's threads
ahead of the model, sent as soon as they are ready, and their labels stored as they come back.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

import numpy as np

from lits.core import postprocess as post
# storage, volumes, reports, naming and streaming (fsspec, nibabel, scipy) are imported where a volume
# or a file is handled: the Predictor alone needs torch, numpy and opencv (benchmarks/gpu_all.py)
from lits.core.errors import UserError
from lits.core.roi import FIRST_STAGE
from lits.core.schema import TUMOUR
# The model folder's format (config.json, weights.pt) lives in model_folder; callers reach it as inference.X too.
from lits.model.model_folder import (CONFIG_NAME, DEFAULT_INFERENCE, MODEL_FORMAT, WEIGHTS_NAME,  # noqa: F401
                                     ModelSpec, load_files, load_spec, model_config, model_id_of, save_model)

if TYPE_CHECKING:  # imported where used: the Predictor imports without nibabel or fsspec
    from lits.core import volumes

log = logging.getLogger(__name__)

class Predictor:
    """A loaded model: uint8 slice images in; uint8 class probabilities, or labels at any slice
    size, out (the stateful part).

    Args:
        spec, weights: from `load_spec`; weights are loaded with weights_only=True (never
            unpickling code).
        device: 'cuda', 'cpu' or None (CUDA when available).
        max_batch: slices per forward pass.
        tta: test-time mirroring: average the probabilities of the slice and of its left-right and
            up-down mirror images (3 forward passes; nnU-Net mirrors every axis); None: spec.mirror.
        upsample: how `labels` resizes probabilities: 'torch' (`labels_on_device`: float bilinear
            on the model's device; liver and tumour Dice >= 0.999 against 'cv2' in the tests) or
            'cv2' (uint8 bilinear on the host: the values inference computed before labels came
            from the model); None: torch on CUDA, else cv2.
    """

    def __init__(self, spec: ModelSpec, weights: bytes, device: Optional[str] = None, max_batch: int = 32,
                 tta: Optional[bool] = None, upsample: Optional[str] = None):
        import torch

        from lits.model.devices import half_dtype
        from lits.model.unet import UNet

        self.spec = spec
        self.max_batch = max_batch
        self.tta = spec.mirror if tta is None else tta
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.upsample = upsample or ("torch" if self.device.type == "cuda" else "cv2")
        model = UNet(3, spec.out_channels, spec.base_width, spec.depth, spec.norm)
        try:
            state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as exc:
            raise UserError(f"{spec.uri}: {WEIGHTS_NAME} does not fit its config.json ({exc}); re-export the model") from exc
        self.model = model.to(self.device).eval()
        cuda = self.device.type == "cuda"
        self.half = half_dtype(torch.cuda.get_device_capability(self.device) if cuda else None)
        if cuda:
            self.model = self.model.to(memory_format=torch.channels_last)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities of a batch of slices.

        Args:
            images: uint8 (N, S, S, 3).
        Returns:
            uint8 (N, S, S, K): probability * 255 per class (K = 3, softmax) or of tumour (K = 1).
        """
        return self._quantised(images).byte().permute(0, 2, 3, 1).cpu().numpy()

    def labels(self, chunks: List[np.ndarray], shapes: List[Tuple[int, int]]) -> List[Tuple[np.ndarray, Optional[np.ndarray]]]:
        """Labels of chunks of slices (one forward pass over all), each at its own slice size.

        Args:
            chunks: uint8 (n_i, S, S, 3) each.
            shapes: the (H, W) each chunk's labels are wanted at (its volume's slice size).
        Returns:
            per chunk (uint8 (n_i, H, W) labels, uint8 (n_i, S, S) labels at the model's size for
            the guided post-processing, or None for a 'tumour' model).
        """
        q = self._quantised(np.concatenate(chunks) if len(chunks) > 1 else chunks[0])
        out, start = [], 0
        liver_tumour = self.spec.task == "liver-tumour"
        for chunk, (h, w) in zip(chunks, shapes):
            part, start = q[start:start + len(chunk)], start + len(chunk)
            if self.upsample == "cv2":
                probs = part.byte().permute(0, 2, 3, 1).cpu().numpy()
                out.append((post.probs_to_labels(probs, (h, w), self.spec.task),
                            post.argmax3(probs) if liver_tumour else None))
                continue
            out.append(labels_on_device(part, (h, w), self.spec.task))
        return out

    def _quantised(self, images: np.ndarray):
        """(N, K, S, S) float tensor on the device: round(probability * 255), TTA included."""
        import torch

        cuda = self.device.type == "cuda"
        out = torch.empty((len(images), self.spec.probability_channels) + images.shape[1:3], dtype=torch.float32,
                          device=self.device)
        with torch.inference_mode(), torch.autocast("cuda", dtype=self.half or torch.float16, enabled=cuda):
            for start in range(0, len(images), self.max_batch):
                # Arrays from Ray's object store are read-only: torch wants a writable buffer.
                x = torch.from_numpy(np.require(images[start:start + self.max_batch], requirements=["C", "W"]))
                # page-locked, so the copy is asynchronous: the host prepares the next batch while the card computes
                x = x.pin_memory().to(self.device, non_blocking=True) if cuda else x
                x = x.permute(0, 3, 1, 2).float().div_(255.0)
                if cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                probs = self._probs(x)
                if self.tta:
                    for dims in ((3,), (2,)):
                        probs += self._probs(x.flip(dims)).flip(dims)
                    probs /= 3.0
                out[start:start + len(x)] = probs.mul_(255.0).round_()
        return out

    def _probs(self, x):
        import torch

        logits = self.model(x).float()
        return torch.softmax(logits, dim=1) if self.spec.task == "liver-tumour" else torch.sigmoid(logits)


def labels_on_device(q, shape: Tuple[int, int], task: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """`Predictor.labels`' torch path: (labels (n, H, W), model-size labels or None) of a float
    (n, K, S, S) tensor of round(probability * 255), resized and argmaxed where it lies (float
    bilinear: differs from cv2's fixed-point uint8 only where two classes nearly tie)."""
    import torch

    with torch.inference_mode():
        up = q if tuple(q.shape[2:]) == tuple(shape) else torch.nn.functional.interpolate(
            q, size=tuple(shape), mode="bilinear", align_corners=False)
        if task != "liver-tumour":
            return ((up[:, 0] > 127) * TUMOUR).byte().cpu().numpy(), None
        return up.argmax(1).byte().cpu().numpy(), q.argmax(1).byte().cpu().numpy()


class Done:
    """An already-computed result with the `.result()` of a future (in-process prediction)."""

    def __init__(self, value):
        self.value = value

    def result(self, timeout_s: Optional[float] = None):
        return self.value


class LocalModel:
    """A `Submit` for an in-process Predictor that answers labels at the slice size, as a Serve
    replica does (`answers_labels`: called as submit(images, (H, W)), or with stage=FIRST_STAGE for
    a cascade's first stage, `first_stage`)."""

    answers_labels = True

    def __init__(self, predictor: Predictor, first_stage: Optional[Predictor] = None):
        self.predictor = predictor
        self.first_stage = first_stage

    def __call__(self, images: np.ndarray, shape: Tuple[int, int], stage: str = "") -> Done:
        return Done(stage_predictor(self.predictor, self.first_stage, stage).labels([images], [shape])[0])


def stage_predictor(predictor: Predictor, first_stage: Optional[Predictor], stage: str) -> Predictor:
    """Which of a loaded model's predictors answers `stage` ('' the model, FIRST_STAGE its first stage)."""
    if stage == FIRST_STAGE:
        if first_stage is None:
            raise ValueError(f"{predictor.spec.uri} is not a cascade: it has no first stage")
        return first_stage
    if stage:
        raise ValueError(f"unknown stage {stage!r}")
    return predictor


def labels_by_stage(predictor: Predictor, first_stage: Optional[Predictor], chunks: List[np.ndarray],
                    shapes: List[Tuple[int, int]], stages: List[str]) -> List[Tuple[np.ndarray, Optional[np.ndarray]]]:
    """`Predictor.labels` of a batch whose chunks go to different stages: one forward pass per stage
    present, the answers in the chunks' order."""
    groups: Dict[str, List[int]] = {}
    for i, stage in enumerate(stages):
        groups.setdefault(stage or "", []).append(i)
    answers: List = [None] * len(chunks)
    for stage, indices in groups.items():
        stage_answers = stage_predictor(predictor, first_stage, stage).labels([chunks[i] for i in indices],
                                                                              [shapes[i] for i in indices])
        for i, answer in zip(indices, stage_answers):
            answers[i] = answer
    return answers


def load_predictors(uri: str, **kwargs) -> Tuple[Predictor, Optional[Predictor]]:
    """The exported model at `uri` loaded (`Predictor(**kwargs)`), and its first stage's when it is
    a cascade, else None."""
    spec, weights, first_weights = load_files(uri)
    first = Predictor(spec.first_stage, first_weights, **kwargs) if spec.first_stage is not None else None
    return Predictor(spec, weights, **kwargs), first


# submit(images) -> a future of probabilities (n, S, S, K), or, with `answers_labels`,
# submit(images, (H, W)) -> a future of (labels (n, H, W), coarse (n, S, S) or None); either takes
# stage=FIRST_STAGE for a cascade's first stage.
Submit = Callable[..., object]


def segment_array(hu_file: np.ndarray, geometry: volumes.Geometry, spec: ModelSpec, submit: Submit,
                  chunk: int = 16, postprocess: bool = True, min_tumour_ml: Optional[float] = None, threads: int = 1
                  ) -> Tuple[np.ndarray, Dict[str, float]]:
    """Segment one volume given in file order; returns (uint8 file-order labels, Fortran-ordered, and
    per-stage seconds, `streaming.STAGES`). See `streaming.segment_volume`."""
    from lits.model import streaming

    labels_file, _, _, timings = streaming.segment_volume(hu_file, geometry, spec, submit, chunk, postprocess,
                                                          min_tumour_ml, threads)
    return labels_file, timings


def segment_decoded(hu_file: np.ndarray, geometry: volumes.Geometry, name: str, spec: ModelSpec, submit: Submit,
                    chunk: int, read_s: float, threads: int):
    """(file-order labels, canonical labels, box, report) of a decoded volume."""
    from lits.core import reports, volumes
    from lits.model import streaming

    volumes.check_hu(hu_file, name)
    labels_file, labels, box, timings = streaming.segment_volume(hu_file, geometry, spec, submit, chunk, True, None,
                                                                 threads)
    t = time.perf_counter()
    figures = reports.volume_report(labels[box] if box else labels, streaming.voxel_ml(geometry), spec.task)
    report = {
        "input": name,
        "model_id": spec.model_id,
        "model": spec.uri,
        "shape": list(geometry.shape),
        "axcodes": geometry.axcodes,
        "spacing_mm": [round(s, 6) for s in geometry.spacing],
        "slices": int(geometry.canonical_shape[0]),
        **figures,
        "seconds": {"read": round(read_s, 3), **timings, "report": round(time.perf_counter() - t, 3)},
    }
    return labels_file, labels, box, report


def segment_bytes(data: bytes, name: str, spec: ModelSpec, submit: Submit, chunk: int = 16,
                  threads: int = 1) -> Tuple[bytes, Dict]:
    """Segment NIfTI bytes; return the .nii.gz mask bytes (the input's affine) and the report.

    Raises:
        BadInputError: not NIfTI, not 3-D, absurd dimensions, NaN HU.
    """
    from lits.core import volumes

    t0 = time.perf_counter()
    hu_file, geometry = volumes.parse_nifti(data, name)
    labels_file, _, _, report = segment_decoded(hu_file, geometry, name, spec, submit, chunk,
                                                time.perf_counter() - t0, threads)
    report = {"input": name, "input_identity": upload_identity(data, name), **report}
    t = time.perf_counter()
    mask_bytes = volumes.nifti_bytes(labels_file, geometry.affine_array, compress=True)
    report["seconds"]["encode"] = round(time.perf_counter() - t, 3)
    return mask_bytes, report


def upload_identity(data: bytes, name: str) -> Dict:
    """What an uploaded body was: its name, size and SHA-256 (what a report says it segmented)."""
    return {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _timed(fn, *args):
    t = time.perf_counter()
    return fn(*args), time.perf_counter() - t


def segment_uri(uri: str, outputs: Dict[str, str], spec: ModelSpec, submit: Submit, chunk: int = 16, threads: int = 1,
                source: Optional[Dict] = None) -> Dict:
    """Segment the NIfTI at `uri` and write its outputs (`write_segmentation`). 'input_identity'
    in the report is `source` (the caller's `storage.identity(uri)`), else taken here before the
    volume is read.

    Raises:
        BadInputError: unreadable or invalid volume (nothing is written).
    """
    from lits.core import storage, volumes

    t0 = time.perf_counter()
    source = source or storage.identity(uri)
    hu_file, geometry = volumes.read_nifti(uri)
    return write_segmentation(hu_file, geometry, uri, outputs, spec, submit, chunk, threads,
                              {"input": uri, "input_identity": source}, t0)


def write_segmentation(hu_file: np.ndarray, geometry: volumes.Geometry, name: str, outputs: Dict[str, str],
                       spec: ModelSpec, submit: Submit, chunk: int, threads: int, head: Dict, t0: float,
                       extra: Optional[Callable[[np.ndarray], Dict[str, bytes]]] = None) -> Dict:
    """Segment a decoded volume; write outputs['mask'], outputs['preview'], what `extra(labels_file)`
    returns under its keys' outputs (e.g. a DICOM-SEG), then outputs['report'] (last: its presence
    means done). Every write is atomic. Returns the report: `head` (the input and its identity)
    first; its 'seconds' hold every stage since `t0` (read: fetch and decode; then
    `streaming.STAGES`; report; encode; preview; write; total)."""
    from lits.core import naming, reports, storage, volumes

    labels_file, labels, box, report = segment_decoded(hu_file, geometry, name, spec, submit, chunk,
                                                       time.perf_counter() - t0, threads)
    report = {**head, **report, "input": head.get("input", name)}
    title = os.path.basename(naming.mask_stem(outputs["mask"]))
    mask_bytes, encode_s = _timed(volumes.nifti_bytes, labels_file, geometry.affine_array)
    more, more_s = _timed(extra, labels_file) if extra is not None else ({}, 0.0)
    png, preview_s = _timed(reports.preview_png, geometry.to_canonical(hu_file), labels, title, box)
    t = time.perf_counter()
    storage.write_bytes(outputs["mask"], mask_bytes)
    storage.write_bytes(outputs["preview"], png)
    for key, data in more.items():
        storage.write_bytes(outputs[key], data)
    report.update(mask=outputs["mask"], preview=outputs["preview"], **{key: outputs[key] for key in more})
    seconds = report["seconds"]
    seconds.update(encode=round(encode_s + more_s, 3), preview=round(preview_s, 3),
                   write=round(time.perf_counter() - t, 3))
    seconds["total"] = round(time.perf_counter() - t0, 3)
    storage.write_bytes(outputs["report"], json.dumps(report, indent=1).encode())
    return report
