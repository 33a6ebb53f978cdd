"""The trained model on the test split: prepared slices (per-volume Dice at model resolution) and
whole volumes at their original resolution (segmented as serving does, scored by lits.evaluate.evaluation).

Called by lits.train.training after export; the whole-volume part fans out one Ray task per volume.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional

import numpy as np

from lits.runtime import fanout
from lits.core import shards, storage
from lits.core.config import TrainConfig
from lits.train.train_data import DataInfo
from lits.core.schema import CLASS_NAMES, volume_number

log = logging.getLogger(__name__)


def evaluate_split(cfg: TrainConfig, uris: List[str], weights: Dict, batch_size: int = 32) -> Optional[Dict]:
    """Per-volume and per-slice Dice/IoU of `weights` on the prepared slices of `uris` (in this
    process, on its GPU when it has one: training runs it as a one-GPU task after a GPU run).

    Per-volume scores sum intersections and sizes over a volume's prepared slices (all tumour
    slices, the kept fraction of the others), at the prepared resolution.
    """
    import ray.data.extensions  # noqa: F401  (registers the tensor type of format-1 shards)
    import torch

    from lits.core import metrics
    from lits.model.unet import UNet
    from lits.train.train_steps import METRIC_CLASSES, predict_labels

    if not uris:
        return None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # a GPU task's GPU
    model = UNet(3, cfg.classes, cfg.base_width, cfg.depth, cfg.norm)
    model.load_state_dict(weights)
    model.to(device).eval()
    classes = METRIC_CLASSES[cfg.task]
    per_volume: Dict[str, np.ndarray] = {}
    slice_scores = []
    with torch.no_grad():
        for uri in uris:
            shard = shards.read_columns(storage.read_bytes(uri))
            images, masks, vids = shard["image"], shard["mask"], shard["volume_id"].tolist()
            for start in range(0, len(vids), batch_size):
                x = torch.from_numpy(images[start:start + batch_size]).to(device).permute(0, 3, 1, 2).float().div_(255.0)
                pred = predict_labels(model(x), cfg.task).cpu().numpy()
                counts = metrics.overlap_counts(pred, masks[start:start + batch_size], classes)
                slice_scores.append(np.stack(metrics.dice_iou(counts), axis=-1))
                for vid, c in zip(vids[start:start + batch_size], counts):
                    per_volume[vid] = per_volume.get(vid, 0) + c
    slice_scores = np.concatenate(slice_scores)  # (slices, classes, [dice, iou])
    names = sorted(per_volume, key=volume_number)
    volume_dice, volume_iou = metrics.dice_iou(np.stack([per_volume[v] for v in names]))
    result = {"volumes": len(names), "slices": int(slice_scores.shape[0]), "per_volume": {}}
    for k, c in enumerate(classes):
        name = CLASS_NAMES[c]
        result[f"dice_{name}_volume"] = float(volume_dice[:, k].mean())
        result[f"iou_{name}_volume"] = float(volume_iou[:, k].mean())
        result[f"dice_{name}_slice"] = float(slice_scores[:, k, 0].mean())
        result[f"iou_{name}_slice"] = float(slice_scores[:, k, 1].mean())
    for i, v in enumerate(names):
        result["per_volume"][v] = {f"dice_{CLASS_NAMES[c]}": float(volume_dice[i, k]) for k, c in enumerate(classes)}
    return result


def _segment_test_volume(volume_id: str, volume_uri: str, model_uri: str, out: str) -> Optional[str]:
    """Segment one test volume with the exported model, as serving does (a Ray task); its mask URI,
    or None when the volume cannot be read any more."""
    from lits.model import inference
    from lits.core import naming
    from lits.core.errors import BadInputError

    predictor, first_stage = inference.load_predictors(model_uri)
    outputs = naming.output_uris(out, volume_id)
    try:
        inference.segment_uri(volume_uri, outputs, predictor.spec, inference.LocalModel(predictor, first_stage))
    except BadInputError as exc:
        log.warning("test volume %s: %s", volume_id, exc)
        return None
    return outputs["mask"]


def evaluate_test_volumes(cfg: TrainConfig, info: DataInfo) -> Optional[Dict]:
    """The exported model on the test split's whole volumes at their original resolution: segment
    each (one Ray task, on a GPU when training used GPUs) into OUT/test_evaluation/predictions/,
    then the LiTS evaluation (lits.evaluate.evaluation, the code evaluate.py runs) into OUT/test_evaluation/."""
    import ray

    from lits.evaluate import evaluation

    if not info.test_volumes:
        return None
    out = storage.join(storage.normalise(cfg.output), "test_evaluation")
    predictions = storage.join(out, "predictions")
    model_uri = storage.join(storage.normalise(cfg.output), "model")
    resources = {"num_gpus": 1} if cfg.num_gpus else {"num_cpus": cfg.cpus_per_worker}
    task = ray.remote(max_retries=1, **resources)(_segment_test_volume)
    masks = {}
    for outcome in fanout.fan_out(task, [(vid, vol, model_uri, predictions)
                                         for vid, vol, _ in info.test_volumes], {},
                                  lambda: fanout.window("GPU" if cfg.num_gpus else "CPU")):
        if outcome.error is not None:
            raise outcome.error
        masks[outcome.args[0]] = outcome.value
    pairs = [(vid, masks[vid], seg, vol) for vid, vol, seg in info.test_volumes if masks[vid]]
    if not pairs:
        return None
    log.info("evaluating %d test volume(s) at their original resolution", len(pairs))
    return evaluation.evaluate_pairs({"pairs": pairs}, out, {"pred": predictions, "ref": "the prepare input's test split",
                                                            "images": None}, evaluation.run_ray)
