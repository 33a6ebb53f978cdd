"""One volume through the model as a stream of chunks (no Ray, no torch): preprocess on the
volume task's threads ahead of the model, send each chunk as soon as it is ready, store each
answer as it comes back, then post-process the labels in place, in the liver's box.

Used by lits.model.inference (which owns the model side and the files); stage seconds are named in STAGES.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Optional

import numpy as np

from lits.core import ct, roi, volumes
from lits.core.roi import FIRST_STAGE
from lits.core import postprocess as post

PREPROCESS_BLOCK = 4  # slices per array operation in `preprocess` (16 MB of float32 at 512^2: cache-sized)
IN_FLIGHT = 4  # chunks a volume has at the model before it waits for the oldest answer
# preprocess_s sums the preprocessing threads' time; the *_wait_s are the volume's own thread waiting
# for preprocessing and for the model's answers; send_s is the time spent sending chunks to it.
STAGES = ("histogram_s", "preprocess_s", "preprocess_wait_s", "send_s", "predict_wait_s", "labels_s", "postprocess_s",
          "segment_s")


def preprocess(hu: np.ndarray, spec, z: slice, breaks: np.ndarray) -> np.ndarray:
    """Model input of canonical slices `z`: prepare's very images (windows, equalisation, resize).

    For context 0 the three channels of PREPROCESS_BLOCK slices come from one `ct.slice_image`
    call (its maths are per voxel, so a block of slices is one "slice" of a 4-D array): the same
    values as `ct.model_inputs`, in fewer, larger array operations (threads then overlap).

    Args:
        hu: canonical (Z, H, W) HU.
        z: which slices (step 1).
        breaks: `ct.freqhist_breaks(hu)` of the whole volume (context 0).
    Returns:
        uint8 (n, S, S, 3).
    """
    zs = range(*z.indices(hu.shape[0]))
    if spec.context or zs.step != 1:
        return ct.model_inputs(hu, zs, breaks, spec.context, spec.image_size)
    out = np.empty((len(zs), spec.image_size, spec.image_size, 3), np.uint8)
    for i in range(0, len(zs), PREPROCESS_BLOCK):
        block = ct.slice_image(hu[None, zs.start + i:min(zs.stop, zs.start + i + PREPROCESS_BLOCK)], 0, breaks, 0)
        for j, image in enumerate(block):
            out[i + j] = ct.resize_image(image, spec.image_size)
    return out


def segment_volume(hu_file: np.ndarray, geometry: volumes.Geometry, spec, submit, chunk: int, postprocess: bool,
                   min_tumour_ml: Optional[float], threads: int):
    """Segment a file-order HU volume with `submit` (see lits.model.inference.Submit) and `spec` (an
    inference.ModelSpec); returns (file-order labels, their canonical view, a canonical box holding
    every labelled voxel or None, per-stage seconds).

    The labels are written into one buffer in NIfTI's file order (Fortran) through its canonical
    view, and post-processed there: no volume-sized copy, and the mask encodes without transposing.

    A cascade (`spec.first_stage`) streams the volume through its first stage (`submit` called with
    stage=FIRST_STAGE), post-processes that, crops every slice to the square box around the kept
    liver (lits.core.roi, spec.roi_margin) and streams the crops through the second stage, whose
    labels, post-processed, are the answer; nothing outside the box is labelled.
    """
    t0 = time.perf_counter()
    timings = dict.fromkeys(STAGES, 0.0)
    hu = geometry.to_canonical(hu_file)
    first = spec.first_stage
    needs_histogram = spec.context == 0 or (first is not None and first.context == 0)
    breaks = ct.freqhist_breaks(hu) if needs_histogram else np.zeros(1, np.float32)
    timings["histogram_s"] = time.perf_counter() - t0
    labels_file = np.zeros(geometry.shape, np.uint8, order="F")
    labels = geometry.to_canonical(labels_file)
    threads = max(1, threads)
    if first is None:
        box = _segment(hu, breaks, spec, submit, chunk, postprocess, threads, labels, timings)
    else:
        box = _segment(hu, breaks, first, StageSubmit(submit, FIRST_STAGE), chunk, True, threads, labels, timings)
        extent = roi.liver_extent(labels[box] > 0) if box else roi.liver_extent(labels > 0)
        if extent is not None:
            region = roi.square_box(roi.offset_box(extent, box) if box else extent, labels.shape, spec.roi_margin)
            labels[box if box else (slice(None),) * 3] = 0
            inner = _segment(hu[region], breaks, spec, submit, chunk, postprocess, threads, labels[region], timings)
            box = roi.offset_box(inner, region) if inner else region
    t = time.perf_counter()
    min_tumour_ml = spec.min_tumour_ml if min_tumour_ml is None else min_tumour_ml
    if postprocess and min_tumour_ml:
        inner = labels[box] if box else labels
        post.drop_small_tumours(inner, voxel_ml(geometry), min_tumour_ml, out=inner)
    timings["postprocess_s"] += time.perf_counter() - t
    timings["segment_s"] = time.perf_counter() - t0
    return labels_file, labels, box, {k: round(v, 3) for k, v in timings.items()}


class StageSubmit:
    """`submit` bound to one stage of a cascade (called with stage=`stage`)."""

    def __init__(self, submit, stage: str):
        self.submit = submit
        self.stage = stage
        self.answers_labels = getattr(submit, "answers_labels", False)

    def __call__(self, images: np.ndarray, *shape):
        return self.submit(images, *shape, stage=self.stage)


def _segment(hu: np.ndarray, breaks: np.ndarray, spec, submit, chunk: int, postprocess: bool, threads: int,
             labels: np.ndarray, timings: Dict[str, float]):
    """One model's labels of canonical `hu` (a volume or its liver box) written into `labels` (of
    hu's shape, a view allowed) and post-processed there; returns the box holding every labelled
    voxel (the kept liver's box; empty when none is kept), or None for all of `labels`."""
    n, h, w = hu.shape
    liver_tumour = spec.task == "liver-tumour"
    # Components are found at the model's resolution (4-16x fewer voxels than 512^2 slices).
    guided = postprocess and liver_tumour and (h, w) != (spec.image_size,) * 2
    coarse = np.empty((n, spec.image_size, spec.image_size), np.uint8) if guided else None
    _stream(hu, breaks, spec, submit, chunk, threads, labels, coarse, timings)
    t = time.perf_counter()
    box = None
    if guided:
        kept = post.guided_keep(coarse)
        post.apply_keep(labels, kept, coarse.shape[1:], out=labels)
        box = post.full_box(kept[0], coarse.shape, labels.shape) if kept else (slice(0, 0),) * 3
    elif postprocess and liver_tumour:
        labels[...] = post.postprocess(labels)
    timings["postprocess_s"] += time.perf_counter() - t
    return box


def _stream(hu: np.ndarray, breaks: np.ndarray, spec, submit, chunk: int, threads: int,
            labels: np.ndarray, coarse: Optional[np.ndarray], timings: Dict[str, float]) -> None:
    """Chunks of `chunk` slices through the model, every stage overlapping the others: `threads`
    threads preprocess up to threads + 1 chunks ahead, each chunk is sent as soon as it is ready,
    and each answer is written into `labels` (and `coarse`) while later chunks are preprocessed
    and predicted; at most IN_FLIGHT chunks wait on the model."""
    n, h, w = hu.shape
    starts = iter(range(0, n, chunk))
    answers_labels = getattr(submit, "answers_labels", False)

    def prepare(start: int):
        t = time.perf_counter()
        return preprocess(hu, spec, slice(start, start + chunk), breaks), time.perf_counter() - t

    ready: deque = deque()
    sent: deque = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="preprocess") as pool:
        def feed():
            for start in itertools.islice(starts, max(0, threads + 1 - len(ready))):
                ready.append((start, pool.submit(prepare, start)))

        feed()
        while ready or sent:
            if ready:
                start, future = ready.popleft()
                t = time.perf_counter()
                images, spent = future.result()
                timings["preprocess_wait_s"] += time.perf_counter() - t
                timings["preprocess_s"] += spent
                feed()
                t = time.perf_counter()
                sent.append((start, submit(images, (h, w)) if answers_labels else submit(images)))
                timings["send_s"] += time.perf_counter() - t
            while sent and (len(sent) > IN_FLIGHT or not ready):
                start, future = sent.popleft()
                t = time.perf_counter()
                answer = future.result()
                t2 = time.perf_counter()
                _put(answer, start, labels, coarse, spec.task)
                timings["predict_wait_s"] += t2 - t
                timings["labels_s"] += time.perf_counter() - t2


def _put(answer, start: int, labels: np.ndarray, coarse: Optional[np.ndarray], task: str) -> None:
    """Write one chunk's answer: labels (and coarse labels) from a replica or `LocalModel`, or
    probabilities from a plain in-process Predictor (turned into labels here, as before)."""
    if isinstance(answer, np.ndarray):
        got = post.probs_to_labels(answer, labels.shape[1:], task)
        got_coarse = post.argmax3(answer) if coarse is not None else None
    else:
        got, got_coarse = answer
    labels[start:start + len(got)] = got
    if coarse is not None:
        coarse[start:start + len(got)] = got_coarse


def voxel_ml(geometry: volumes.Geometry) -> float:
    return float(abs(np.linalg.det(geometry.affine_array[:3, :3]))) / 1000.0
