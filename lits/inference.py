"""Predict a volume with an exported model (no Ray): load, preprocess, predict, undo, report.

One volume's path, the same in a bulk job, in `/v1/segment` and in a plain loop:

    file-order voxels --Geometry.to_canonical--> (Z, H, W) HU
      --ct.slice_image + ct.resize_image (prepare's functions, config.json's parameters)--> (Z, S, S, 3) uint8
      --predict (batched, anywhere: in-process or a Serve replica)--> (Z, S, S, K) uint8 probabilities
      --bilinear resize of probabilities to (H, W), then argmax--> (Z, H, W) labels
      --masks.postprocess (largest liver component, tumour inside it)--> Geometry.from_canonical
      --> file-order uint8 labels with the input's affine.

Probabilities, not labels, are resized back: nearest-neighbour upsampling of a 128-pixel label
map leaves 4-pixel stairs on every boundary at 512 pixels.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional, Tuple

import cv2
import numpy as np

from lits import ct, masks, storage, volumes
from lits.errors import BadInputError, UserError
from lits.schema import CLASS_NAMES, LIVER, TUMOUR, WINDOW_CUSTOM, WINDOW_LIVER

log = logging.getLogger(__name__)

MODEL_FORMAT = 1
# What inference does by default with a newly exported model (config.json's "inference"), measured
# by benchmarks/levers.py on 8 unseen scans: mirroring +0.018 tumour Dice per case (+0.034 for a model
# trained with forced tumour patches) for 3 forward passes; dropping tumour components under 0.1 mL
# removed 1 of 16 predicted lesions (12 of 46 for that model), Dice unchanged.
DEFAULT_INFERENCE = {"mirror": True, "min_tumour_ml": 0.1}
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "weights.pt"
NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class ModelSpec:
    """What a predictor and its callers need to know of an exported model (from config.json).

    Attributes:
        uri: the model folder.
        model_id: first 16 hex digits of the sha256 of weights.pt: outputs made by other weights
            are recomputed by a bulk job, outputs of these weights are skipped.
        task: 'liver-tumour' (softmax over 3 classes) or 'tumour' (sigmoid, tumour probability).
        out_channels, base_width, depth: the U-Net.
        image_size: the square slice size the model was trained at (prepare's --image-size).
        context: prepare's --context (0: three windows of one slice; 1: 2.5-D).
        mirror: test-time mirroring (config.json's inference.mirror; off for models exported
            before it existed).
        min_tumour_ml: tumour components smaller than this become liver (inference.min_tumour_ml).
    """

    uri: str
    model_id: str
    task: str
    out_channels: int
    base_width: int
    depth: int
    image_size: int
    context: int
    mirror: bool = False
    min_tumour_ml: float = 0.0

    @property
    def probability_channels(self) -> int:
        return 3 if self.task == "liver-tumour" else 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        """From `to_dict`'s output, or any dict holding those keys (e.g. a replica's describe())."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def model_id_of(weights: bytes) -> str:
    return hashlib.sha256(weights).hexdigest()[:16]


def model_config(architecture: Dict, task: str, image_size: int, context: int, extra: Optional[Dict] = None) -> Dict:
    """config.json of an exported model: what inference reads, plus `extra` (training facts).

    Args:
        architecture: {'name': 'UNet', 'in_channels': 3, 'out_channels', 'base_width', 'depth'}.
        task: 'liver-tumour' or 'tumour'.
        image_size, context: the preprocessing the model was trained on (prepare's flags).
    """
    config = {
        "format_version": MODEL_FORMAT,
        "architecture": dict(architecture),
        "task": task,
        "class_names": list(CLASS_NAMES) if task == "liver-tumour" else ["background", "tumour"],
        "output": "softmax over 3 classes" if task == "liver-tumour" else "sigmoid, tumour probability",
        "input": {"height": image_size, "width": image_size, "channels": 3,
                  "layout": "NCHW float32 = uint8 image (H, W, C) / 255"},
        "preprocessing": {
            "canonical_layout": "(Z, H, W): rows anterior->posterior, columns patient right->left",
            "image_size": image_size,
            "context": context,
            "windows": [list(WINDOW_LIVER), list(WINDOW_CUSTOM)],
            "third_channel": "fastai freqhist over the volume, 100 bins" if not context else None,
            "resize": {"image": "INTER_AREA", "mask": "INTER_NEAREST"},
        },
        "inference": dict(DEFAULT_INFERENCE),
        "weights": WEIGHTS_NAME,
    }
    config.update(extra or {})
    return config


def save_model(uri: str, state_dict: Dict, config: Dict, s3_endpoint: Optional[str] = None) -> None:
    """Write URI/weights.pt (a plain state_dict), then URI/config.json (written last: the marker)."""
    import torch

    buf = io.BytesIO()
    torch.save(state_dict, buf)
    storage.write_bytes(storage.join(uri, WEIGHTS_NAME), buf.getvalue(), s3_endpoint)
    storage.write_bytes(storage.join(uri, CONFIG_NAME), json.dumps(config, indent=1).encode(), s3_endpoint)


def load_spec(uri: str, s3_endpoint: Optional[str] = None) -> Tuple[ModelSpec, bytes]:
    """Read and check an exported model folder; return its spec and the raw weights.

    Raises:
        UserError: missing folder or files, or a config.json this version cannot use.
    """
    uri = storage.normalise(uri)
    config_uri = storage.join(uri, CONFIG_NAME)
    if not storage.exists(config_uri, s3_endpoint):
        raise UserError(f"{uri} is not an exported model: {CONFIG_NAME} is missing; pass the model/ folder "
                        "that train.py wrote (OUTPUT/model)")
    try:
        config = json.loads(storage.read_bytes(config_uri, s3_endpoint))
        arch = config["architecture"]
        pre = config["preprocessing"]
        task = config["task"]
        if arch.get("name") != "UNet" or arch.get("in_channels") != 3 or task not in ("liver-tumour", "tumour"):
            raise ValueError(f"architecture {arch.get('name')!r} / task {task!r}")
        weights_uri = storage.join(uri, config.get("weights", WEIGHTS_NAME))
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{config_uri}: not a model config this version understands ({exc}); re-export the model") from exc
    weights = storage.read_bytes(weights_uri, s3_endpoint)
    spec = ModelSpec(uri=uri, model_id=model_id_of(weights), task=task, out_channels=int(arch["out_channels"]),
                     base_width=int(arch["base_width"]), depth=int(arch["depth"]),
                     image_size=int(pre["image_size"]), context=int(pre.get("context") or 0),
                     mirror=bool(config.get("inference", {}).get("mirror", False)),
                     min_tumour_ml=float(config.get("inference", {}).get("min_tumour_ml", 0.0)))
    return spec, weights


class Predictor:
    """A loaded model: uint8 slice images in, uint8 class probabilities out (the stateful part).

    Args:
        spec, weights: from `load_spec`; weights are loaded with weights_only=True (never
            unpickling code).
        device: 'cuda', 'cpu' or None (CUDA when available).
        max_batch: slices per forward pass.
        tta: test-time mirroring: average the probabilities of the slice and of its left-right and
            up-down mirror images (3 forward passes; nnU-Net mirrors every axis); None: spec.mirror.
    """

    def __init__(self, spec: ModelSpec, weights: bytes, device: Optional[str] = None, max_batch: int = 32,
                 tta: Optional[bool] = None):
        import torch

        from lits.model import UNet

        self.spec = spec
        self.max_batch = max_batch
        self.tta = spec.mirror if tta is None else tta
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = UNet(3, spec.out_channels, spec.base_width, spec.depth)
        try:
            state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as exc:
            raise UserError(f"{spec.uri}: {WEIGHTS_NAME} does not fit its config.json ({exc}); re-export the model") from exc
        self.model = model.to(self.device).eval()
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities of a batch of slices.

        Args:
            images: uint8 (N, S, S, 3).
        Returns:
            uint8 (N, S, S, K): probability * 255 per class (K = 3, softmax) or of tumour (K = 1).
        """
        import torch

        out = np.empty(images.shape[:3] + (self.spec.probability_channels,), np.uint8)
        cuda = self.device.type == "cuda"
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            for start in range(0, len(images), self.max_batch):
                # Arrays from Ray's object store are read-only: torch wants a writable buffer.
                x = torch.from_numpy(np.require(images[start:start + self.max_batch], requirements=["C", "W"])).to(self.device)
                x = x.permute(0, 3, 1, 2).float().div_(255.0)
                if cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                probs = self._probs(x)
                if self.tta:
                    for dims in ((3,), (2,)):
                        probs += self._probs(x.flip(dims)).flip(dims)
                    probs /= 3.0
                out[start:start + len(x)] = probs.mul_(255.0).round_().byte().permute(0, 2, 3, 1).cpu().numpy()
        return out


    def _probs(self, x):
        import torch

        logits = self.model(x).float()
        return torch.softmax(logits, dim=1) if self.spec.task == "liver-tumour" else torch.sigmoid(logits)


class Done:
    """An already-computed result with the `.result()` of a future (in-process prediction)."""

    def __init__(self, value):
        self.value = value

    def result(self, timeout_s: Optional[float] = None):
        return self.value


def preprocess(hu: np.ndarray, spec: ModelSpec, z: slice, breaks: np.ndarray) -> np.ndarray:
    """Model input of canonical slices `z`: prepare's very images (windows, equalisation, resize).

    Args:
        hu: canonical (Z, H, W) HU.
        z: which slices.
        breaks: `ct.freqhist_breaks(hu)` of the whole volume (context 0).
    Returns:
        uint8 (n, S, S, 3).
    """
    return ct.model_inputs(hu, range(*z.indices(hu.shape[0])), breaks, spec.context, spec.image_size)


def probs_to_labels(probs: np.ndarray, shape: Tuple[int, int], task: str) -> np.ndarray:
    """Labels of slices at the original in-plane size from model-size probabilities.

    Args:
        probs: uint8 (n, S, S, K) from `Predictor`.
        shape: the original (H, W).
        task: 'liver-tumour' (argmax of 3) or 'tumour' (tumour where p > 0.5).
    Returns:
        uint8 (n, H, W) labels.
    """
    h, w = shape
    out = np.empty((len(probs), h, w), np.uint8)
    for i, p in enumerate(probs):
        up = p if p.shape[:2] == (h, w) else cv2.resize(np.ascontiguousarray(p), (w, h), interpolation=cv2.INTER_LINEAR)
        if task == "liver-tumour":
            out[i] = np.argmax(up.reshape(h, w, -1), axis=-1)
        else:
            out[i] = np.where(up.reshape(h, w) > 127, TUMOUR, 0)
    return out


Submit = Callable[[np.ndarray], object]  # images (n, S, S, 3) -> object with .result() -> probs


def segment_array(hu_file: np.ndarray, geometry: volumes.Geometry, spec: ModelSpec, submit: Submit,
                  chunk: int = 16, postprocess: bool = True, min_tumour_ml: Optional[float] = None
                  ) -> Tuple[np.ndarray, Dict[str, float]]:
    """Segment one volume given in file order; returns (uint8 file-order labels, timings).

    Chunks of `chunk` slices are submitted as soon as they are preprocessed, so a remote
    predictor works on chunk k while this process prepares chunk k + 1.
    """
    t0 = time.perf_counter()
    hu = geometry.to_canonical(hu_file)
    n, h, w = hu.shape
    breaks = ct.freqhist_breaks(hu) if spec.context == 0 else np.zeros(1, np.float32)
    pending = []
    prep_s = 0.0
    for start in range(0, n, chunk):
        t = time.perf_counter()
        images = preprocess(hu, spec, slice(start, start + chunk), breaks)
        prep_s += time.perf_counter() - t
        pending.append((start, submit(images)))
    labels = np.empty((n, h, w), np.uint8)
    size = spec.image_size
    guided = postprocess and spec.task == "liver-tumour" and (h, w) != (size, size)
    coarse = np.empty((n, size, size), np.uint8) if guided else None
    wait_s = resize_s = 0.0
    for start, future in pending:
        t = time.perf_counter()
        probs = future.result()
        t2 = time.perf_counter()
        labels[start:start + len(probs)] = probs_to_labels(probs, (h, w), spec.task)
        if guided:
            coarse[start:start + len(probs)] = probs_to_labels(probs, (size, size), spec.task)
        wait_s += t2 - t
        resize_s += time.perf_counter() - t2
    t = time.perf_counter()
    if postprocess and spec.task == "liver-tumour":
        # Components are found at the model's resolution (16x fewer voxels at 512 -> 128).
        labels = masks.postprocess_guided(labels, coarse) if guided else masks.postprocess(labels)
    min_tumour_ml = spec.min_tumour_ml if min_tumour_ml is None else min_tumour_ml
    if postprocess and min_tumour_ml:
        labels = masks.drop_small_tumours(labels, abs(float(np.linalg.det(geometry.affine_array[:3, :3]))) / 1000.0, min_tumour_ml)
    post_s = time.perf_counter() - t
    # Fortran order is NIfTI's on-disk order: the file writes without a transposing copy (10x).
    labels_file = np.asfortranarray(geometry.from_canonical(labels))
    timings = {"preprocess_s": prep_s, "predict_wait_s": wait_s, "resize_back_s": resize_s,
               "postprocess_s": post_s, "segment_s": time.perf_counter() - t0}
    return labels_file, {k: round(v, 3) for k, v in timings.items()}


def volume_report(labels: np.ndarray, geometry: volumes.Geometry, spec: ModelSpec) -> Dict:
    """Per-volume measurements of a predicted label volume (any axis order).

    Liver volume counts tumour (LiTS: liver is label >= 1); tumour burden is tumour / liver
    volume in percent; lesions are 3-D connected components of tumour (26-connectivity).
    """
    voxel_ml = float(abs(np.linalg.det(geometry.affine_array[:3, :3]))) / 1000.0
    liver = int(np.count_nonzero(labels >= LIVER))
    tumour = int(np.count_nonzero(labels == TUMOUR))
    lesions = masks.component_sizes(labels == TUMOUR)
    return {
        "liver_volume_ml": round(liver * voxel_ml, 3) if spec.task == "liver-tumour" else None,
        "tumour_volume_ml": round(tumour * voxel_ml, 3),
        "lesion_count": int(lesions.size),
        "lesion_volumes_ml": [round(float(v) * voxel_ml, 3) for v in lesions[:50]],
        "tumour_burden_percent": round(100.0 * tumour / liver, 3) if liver and spec.task == "liver-tumour" else None,
        "voxel_volume_ml": voxel_ml,
    }


def output_name(relative: str) -> str:
    """'sub/volume-3.nii.gz' -> 'sub/volume-3' (the stem outputs are named after)."""
    for suffix in NIFTI_SUFFIXES:
        if relative.endswith(suffix):
            return relative[: -len(suffix)]
    raise ValueError(f"{relative} is not .nii or .nii.gz")


def _segment_parsed(hu_file: np.ndarray, geometry: volumes.Geometry, name: str, spec: ModelSpec, submit: Submit,
                    chunk: int, read_s: float) -> Tuple[np.ndarray, Dict]:
    volumes.check_hu(hu_file, name)
    labels, timings = segment_array(hu_file, geometry, spec, submit, chunk)
    report = {
        "input": name,
        "model_id": spec.model_id,
        "model": spec.uri,
        "shape": list(geometry.shape),
        "axcodes": geometry.axcodes,
        "spacing_mm": [round(s, 6) for s in geometry.spacing],
        "slices": int(geometry.canonical_shape[0]),
        **volume_report(labels, geometry, spec),
        "seconds": {"read": round(read_s, 3), **timings},
    }
    return labels, report


def segment_bytes(data: bytes, name: str, spec: ModelSpec, submit: Submit, chunk: int = 16) -> Tuple[bytes, Dict]:
    """Segment NIfTI bytes; return the .nii.gz mask bytes (the input's affine) and the report.

    Raises:
        BadInputError: not NIfTI, not 3-D, absurd dimensions, NaN HU.
    """
    t0 = time.perf_counter()
    hu_file, geometry = volumes.parse_nifti(data, name)
    labels, report = _segment_parsed(hu_file, geometry, name, spec, submit, chunk, time.perf_counter() - t0)
    t = time.perf_counter()
    mask_bytes = volumes.nifti_bytes(labels, geometry.affine_array, compress=True)
    report["seconds"]["encode"] = round(time.perf_counter() - t, 3)
    return mask_bytes, report


def preview_png(hu_file: np.ndarray, labels_file: np.ndarray, geometry: volumes.Geometry, title: str) -> bytes:
    """PNG of the predicted outlines over the liver window: the axial slice with the most liver
    (or tumour) and the coronal plane through it, superior up, the patient's right on the left."""
    from lits import reports

    hu = geometry.to_canonical(hu_file)
    labels = geometry.to_canonical(labels_file)
    area = np.count_nonzero(labels, axis=(1, 2))
    z = int(np.argmax(area)) if area.any() else len(labels) // 2
    rows = np.count_nonzero(labels[z], axis=1)
    y = int(np.argmax(rows)) if rows.any() else labels.shape[1] // 2
    axial = ct.window(hu[z], *WINDOW_LIVER)[..., None]
    coronal = ct.window(hu[::-1, y, :], *WINDOW_LIVER)[..., None]
    return reports.contact_sheet([(f"{title} axial {z}", axial, labels[z]),
                                  (f"coronal {y}", coronal, np.ascontiguousarray(labels[::-1, y, :]))],
                                 columns=2, tile=256)


def segment_uri(uri: str, outputs: Dict[str, str], spec: ModelSpec, submit: Submit,
                s3_endpoint: Optional[str] = None, chunk: int = 16) -> Dict:
    """Segment the NIfTI at `uri`; write outputs['mask'], outputs['preview'], then outputs['report']
    (last: its presence means done). Every write is atomic. Returns the report.

    Raises:
        BadInputError: unreadable or invalid volume (nothing is written).
    """
    t0 = time.perf_counter()
    try:
        data = storage.read_bytes(uri, s3_endpoint)
    except UserError as exc:
        raise BadInputError(str(exc)) from exc
    fetch_s = time.perf_counter() - t0
    t = time.perf_counter()
    hu_file, geometry = volumes.parse_nifti(data, uri)
    del data
    labels, report = _segment_parsed(hu_file, geometry, uri, spec, submit, chunk, time.perf_counter() - t)
    t = time.perf_counter()
    storage.write_bytes(outputs["mask"], volumes.nifti_bytes(labels, geometry.affine_array, compress=True), s3_endpoint)
    storage.write_bytes(outputs["preview"], preview_png(hu_file, labels, geometry, os.path.basename(outputs["mask"])[:-len("_seg.nii.gz")]), s3_endpoint)
    report.update(mask=outputs["mask"], preview=outputs["preview"])
    report["seconds"]["fetch"] = round(fetch_s, 3)
    report["seconds"]["write"] = round(time.perf_counter() - t, 3)
    report["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    storage.write_bytes(outputs["report"], json.dumps(report, indent=1).encode(), s3_endpoint)
    return report
