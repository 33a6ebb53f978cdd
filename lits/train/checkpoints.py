"""Training checkpoints: what a worker saves and restores, and the best weights beside them.

- A checkpoint (rank 0, every `checkpoint_interval_s` and after the last epoch, uploaded in the
  background by Ray Train) holds the model, Adam's state, the schedule's TrainState and the metrics
  history; Ray keeps the newest two.
- The best weights (by validation loss) are written only when they improved since the previous
  checkpoint, as OUT/<name>/best/epoch-NNNN.pt, and the TrainState names the file; the two newest
  files are kept (enough for both kept checkpoints). They do not ride in every checkpoint: that
  would be a third copy of the model per save (124 MB at width 64). Rank 0 writes them on a background
  thread (`BestWeights.wait` joins it), so the others never wait at the next collective for an
  upload; the checkpoint itself is saved to local disk and uploaded by Ray in the background.
- Restoring places the model on its device first, so Adam's state follows the parameters there.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import tempfile
import threading
from typing import Callable, Dict, Optional

from lits.core import storage
from lits.core.config import TrainConfig

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
BEST_FOLDER = "best"
KEEP_BEST = 2


def load_state(checkpoint) -> Dict:
    """The saved dict of a Ray Train checkpoint (tensors on the CPU)."""
    import torch

    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)


def resume(model, optimizer, checkpoint) -> Dict:
    """Load a checkpoint into the model and optimizer (both already on the training device, so
    Adam's state lands where the parameters live); return the rest of the saved state."""
    saved = load_state(checkpoint)
    model.load_state_dict(saved.pop("model"))
    optimizer.load_state_dict(saved.pop("optimizer"))
    return saved


def setup_model(cfg: TrainConfig, device, place: Callable, checkpoint=None):
    """(model as placed, its core module, Adam, the checkpoint's other state or None).

    The model is placed (moved to `device`, wrapped for DDP: `ray.train.torch.prepare_model`)
    before the optimizer is built and before a checkpoint is loaded, so Adam's state follows the
    parameters onto the device (loaded first, it would stay on the CPU beside CUDA gradients).
    """
    import torch

    from lits.model.unet import UNet

    torch.manual_seed(cfg.seed)
    model = UNet(3, cfg.classes, cfg.base_width, cfg.depth, cfg.norm)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = place(model)
    core = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    saved = resume(core, optimizer, checkpoint) if checkpoint else None
    return model, core, optimizer, saved


class BestWeights:
    """The best weights so far: copied to host memory when they improve, written at the next
    checkpoint only if they changed since the last one (rank 0), on a background thread."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.weights: Optional[Dict] = None
        self._writer: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def improved(self, core) -> None:
        self.weights = {k: v.detach().cpu().clone() for k, v in core.state_dict().items()}

    def write(self, state):
        """Start writing pending best weights; returns `state` naming the file (unchanged when none).
        The previous write is finished first (its error, if any, raised here)."""
        if self.weights is None:
            return state
        self.wait()
        folder = storage.join(storage.normalise(self.cfg.output), self.cfg.name, BEST_FOLDER)
        uri = storage.join(folder, f"epoch-{state.best_epoch:04d}.pt")
        weights, self.weights = self.weights, None
        self._writer = threading.Thread(target=self._write, args=(folder, uri, weights), name="lits-best-weights")
        self._writer.start()
        return dataclasses.replace(state, best_file=uri)

    def wait(self) -> None:
        """Block until the write in flight (if any) is done; re-raise its error."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _write(self, folder: str, uri: str, weights: Dict) -> None:
        import torch

        try:
            buf = io.BytesIO()
            torch.save(weights, buf)
            storage.write_bytes(uri, buf.getvalue())
            for old in [u for u in storage.list_files(folder) if u.endswith(".pt")][:-KEEP_BEST]:
                storage.delete(old)
        except BaseException as exc:  # raised in the training loop by the next wait()
            self._error = exc


def restored_state(saved: Dict):
    """The TrainState a checkpoint holds, with its best weights forgotten when their file is not
    there: the checkpoint names the file as its background write starts, so a worker lost during
    that write leaves a checkpoint naming a file that never landed. The best is then taken again
    at the next validation (its loss compared with infinity), never read from a missing file."""
    import math

    from lits.train.train_steps import TrainState

    state = TrainState.from_dict(saved)
    if state.best_file and not storage.exists(state.best_file):
        log.warning("the best weights %s of the checkpoint were never written (a worker was lost while writing "
                    "them): the best is taken again from the next validation", state.best_file)
        state = dataclasses.replace(state, best_file="", best_val_loss=math.inf, best_epoch=-1)
    return state


def best_weights(state: Dict) -> Dict:
    """The best weights a checkpoint's state names (the last weights when none improved)."""
    import torch

    if state.get("best_file"):
        return torch.load(io.BytesIO(storage.read_bytes(state["best_file"])), map_location="cpu",
                          weights_only=True)
    return state.get("best_model") or state["model"]  # older checkpoints held the best weights inline


def report_epoch(row: Dict, rank: int, save: bool, saved_state: Callable[[], Dict]) -> None:
    """Report the epoch's metrics to Ray Train; with `save`, rank 0 attaches a checkpoint of
    `saved_state()`, uploaded in the background (Ray deletes the local copy after the upload)."""
    import ray.train
    import torch

    ckpt = None
    if save and rank == 0:
        tmp = tempfile.mkdtemp(prefix="lits-ckpt-")
        torch.save(saved_state(), os.path.join(tmp, STATE_FILE))
        ckpt = ray.train.Checkpoint.from_directory(tmp)
    mode = ray.train.CheckpointUploadMode
    ray.train.report({k: v for k, v in row.items() if isinstance(v, (int, float))}, checkpoint=ckpt,
                     checkpoint_upload_mode=mode.ASYNC if ckpt else mode.SYNC,
                     delete_local_checkpoint_after_upload=True if ckpt else None)
