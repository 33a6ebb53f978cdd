"""An exported model's folder: config.json (what inference needs to know) and weights.pt (a plain
state_dict), written by training's export and read, checked, by everything that predicts.

A cascade's folder holds its first stage in a sub-folder named by config.json's "first_stage"
(lits.core.roi; train.py --first-stage).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

from lits.core.config import NORMS
from lits.core.errors import UserError
from lits.core.roi import ROI_MARGIN
from lits.core.schema import CLASS_NAMES, WINDOW_CUSTOM, WINDOW_LIVER

MODEL_FORMAT = 1
# What inference does by default with a newly exported model (config.json's "inference"), measured
# by benchmarks/levers.py on 8 unseen scans: mirroring +0.018 tumour Dice per case (+0.034 for a model
# trained with forced tumour patches) for 3 forward passes; dropping tumour components under 0.1 mL
# removed 1 of 16 predicted lesions (12 of 46 for that model), Dice unchanged.
DEFAULT_INFERENCE = {"mirror": True, "min_tumour_ml": 0.1}
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "weights.pt"


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
        norm: the U-Net's normalisation (architecture.norm; 'batch' for models exported before it).
        roi_margin: > 0 for a cascade's second stage (preprocessing.roi.margin): it segments slices
            cropped to a square box this much wider than its first stage's liver (lits.core.roi).
        first_stage: that first stage (config.json's "first_stage" folder), or None.
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
    norm: str = "batch"
    roi_margin: float = 0.0
    first_stage: Optional["ModelSpec"] = None

    @property
    def probability_channels(self) -> int:
        return 3 if self.task == "liver-tumour" else 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        """From `to_dict`'s output, or any dict holding those keys (e.g. a replica's describe())."""
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        if isinstance(fields.get("first_stage"), dict):
            fields["first_stage"] = cls.from_dict(fields["first_stage"])
        return cls(**fields)


def model_id_of(weights: bytes) -> str:
    return hashlib.sha256(weights).hexdigest()[:16]


def model_config(architecture: Dict, task: str, image_size: int, context: int, extra: Optional[Dict] = None,
                 roi: bool = False) -> Dict:
    """config.json of an exported model: what inference reads, plus `extra` (training facts).

    Args:
        architecture: {'name': 'UNet', 'in_channels': 3, 'out_channels', 'base_width', 'depth', 'norm'}.
        task: 'liver-tumour' or 'tumour'.
        image_size, context, roi: the preprocessing the model was trained on (prepare's flags).
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
            "roi": {"margin": ROI_MARGIN, "of": "the first stage's liver"} if roi else None,
        },
        "inference": dict(DEFAULT_INFERENCE),
        "weights": WEIGHTS_NAME,
    }
    config.update(extra or {})
    return config


def save_model(uri: str, state_dict: Dict, config: Dict) -> None:
    """Write URI/weights.pt (a plain state_dict), then URI/config.json (written last: the marker)."""
    from lits.core import storage

    import torch

    buf = io.BytesIO()
    torch.save(state_dict, buf)
    storage.write_bytes(storage.join(uri, WEIGHTS_NAME), buf.getvalue())
    storage.write_bytes(storage.join(uri, CONFIG_NAME), json.dumps(config, indent=1).encode())


def load_spec(uri: str) -> Tuple[ModelSpec, bytes]:
    """Read and check an exported model folder; return its spec and the raw weights.

    Raises:
        UserError: missing folder or files, or a config.json this version cannot use.
    """
    spec, weights, _ = load_files(uri)
    return spec, weights


def load_files(uri: str) -> Tuple[ModelSpec, bytes, Optional[bytes]]:
    """`load_spec`, plus a cascade's first-stage weights (None for a single model): each file read once."""
    from lits.core import storage

    uri = storage.normalise(uri)
    config_uri = storage.join(uri, CONFIG_NAME)
    if not storage.exists(config_uri):
        raise UserError(f"{uri} is not an exported model: {CONFIG_NAME} is missing; pass the model/ folder "
                        "that train.py wrote (OUTPUT/model)")
    try:
        config = json.loads(storage.read_bytes(config_uri))
        arch = config["architecture"]
        pre = config["preprocessing"]
        task = config["task"]
        if arch.get("name") != "UNet" or arch.get("in_channels") != 3 or task not in ("liver-tumour", "tumour"):
            raise ValueError(f"architecture {arch.get('name')!r} / task {task!r}")
        if arch.get("norm", "batch") not in NORMS:
            raise ValueError(f"norm {arch.get('norm')!r}")
        weights_uri = storage.join(uri, config.get("weights", WEIGHTS_NAME))
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{config_uri}: not a model config this version understands ({exc}); re-export the model") from exc
    weights = storage.read_bytes(weights_uri)
    roi_margin = float((pre.get("roi") or {}).get("margin", 0.0))
    first_stage, first_weights = None, None
    if roi_margin > 0:
        if not config.get("first_stage"):
            raise UserError(f"{config_uri}: a liver-box (prepare --roi) model needs the first stage that finds the liver; "
                            "export it with train.py --first-stage FIRST/model")
        first_stage, first_weights, _ = load_files(storage.join(uri, config["first_stage"]))
        if first_stage.roi_margin or first_stage.task != "liver-tumour":
            raise UserError(f"{first_stage.uri}: a cascade's first stage must be a whole-slice liver-tumour model")
        weights_id = model_id_of(weights + first_weights)
    else:
        weights_id = model_id_of(weights)
    spec = ModelSpec(uri=uri, model_id=weights_id, task=task, out_channels=int(arch["out_channels"]),
                     base_width=int(arch["base_width"]), depth=int(arch["depth"]),
                     image_size=int(pre["image_size"]), context=int(pre.get("context") or 0),
                     mirror=bool(config.get("inference", {}).get("mirror", False)),
                     min_tumour_ml=float(config.get("inference", {}).get("min_tumour_ml", 0.0)),
                     norm=str(arch.get("norm", "batch")), roi_margin=roi_margin, first_stage=first_stage)
    return spec, weights, first_weights
