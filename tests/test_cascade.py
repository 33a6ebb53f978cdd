"""A cascade: the liver's box (lits.core.roi), prepare --roi's crops, and inference through two
stages (the first finds the liver, the second segments its box at the volume's resolution)."""

import os

import numpy as np
import pytest
import torch

from lits.core import ct, roi, volumes
from lits.core.config import PrepareConfig
from lits.core.errors import UserError
from lits.model import inference
from lits.model.unet import UNet
from lits.prepare import slicing
from test_inference import PixelModel, coded_hu, spec_for


def test_square_box_is_centred_grown_and_kept_inside_the_slice():
    extent = (slice(5, 10), slice(20, 40), slice(30, 40))  # 20 rows x 10 columns of liver
    box = roi.square_box(extent, (30, 100, 100), margin=0.25)
    assert box == (slice(3, 12), slice(15, 45), slice(20, 50))  # side 20 * 1.5 = 30, centred on (30, 35)
    # at the slice's edge the square moves inside rather than shrinking
    edge = roi.square_box((slice(0, 30), slice(0, 20), slice(90, 100)), (30, 100, 100), margin=0.25)
    assert edge == (slice(0, 30), slice(0, 30), slice(70, 100))
    # never larger than the slice's smaller side (centred on the liver), never smaller than MIN_SIDE
    assert roi.square_box((slice(0, 1), slice(0, 90), slice(0, 10)), (1, 100, 60), margin=0.5)[1:] == (
        slice(15, 75), slice(0, 60))
    tiny = roi.square_box((slice(0, 1), slice(50, 51), slice(50, 51)), (1, 100, 100), margin=0.0)
    assert tiny[1].stop - tiny[1].start == roi.MIN_SIDE and tiny[1].start <= 50 < tiny[1].stop
    # the shift moves rows and columns each by its own share of the side
    assert roi.square_box((slice(0, 1), slice(40, 60), slice(40, 60)), (1, 100, 100), 0.0, shift=(0.25, -0.25)) == (
        slice(0, 1), slice(45, 65), slice(35, 55))
    assert roi.offset_box((slice(1, 3), slice(2, 5), slice(0, 4)), (slice(10, 20), slice(5, 50), slice(7, 30))) == (
        slice(11, 13), slice(7, 10), slice(7, 11))


def test_liver_extent_and_training_box():
    labels = np.zeros((12, 64, 64), np.uint8)
    labels[3:7, 10:30, 20:36] = 1
    labels[5, 12, 22] = 2
    assert roi.liver_extent(labels > 0) == (slice(3, 7), slice(10, 30), slice(20, 36))
    assert roi.liver_extent(np.zeros((2, 3, 3), bool)) is None
    assert roi.training_box(np.zeros((2, 8, 8), np.uint8), np.random.default_rng(0)) is None
    boxes = [roi.training_box(labels, np.random.default_rng(seed)) for seed in range(20)]
    assert boxes[0] == roi.training_box(labels, np.random.default_rng(0))  # seeded
    sides = {b[1].stop - b[1].start for b in boxes}
    assert min(sides) >= 20 * (1 + 2 * roi.TRAIN_MARGINS[0]) - 1 and max(sides) <= 20 * (1 + 2 * roi.TRAIN_MARGINS[1]) + 1
    assert len(sides) > 3  # the margin is drawn
    big = np.zeros((4, 256, 256), np.uint8)
    big[1:3, 60:160, 80:180] = 1
    centres = [roi.training_box(big, np.random.default_rng(seed)) for seed in range(20)]
    rows = {b[1].start + b[1].stop for b in centres}
    assert len(rows) > 2 and any(b[1].start + b[1].stop - 220 != b[2].start + b[2].stop - 260 for b in centres)
    for b in boxes:  # every box holds the whole liver
        assert b[1].start <= 10 and b[1].stop >= 30 and b[2].start <= 20 and b[2].stop >= 36
        assert b[0] == slice(1, 9)


def test_prepare_roi_crops_slices_to_the_liver_box(nifti_dir):
    task = slicing.VolumeTask("volume-1", "nifti", os.path.join(nifti_dir, "volume-1.nii.gz"),
                              os.path.join(nifti_dir, "segmentation-1.nii.gz"))
    whole = slicing.slice_volume(task, PrepareConfig(input="-", output="-", image_size=32, keep_liver=1.0))
    cropped = slicing.slice_volume(task, PrepareConfig(input="-", output="-", image_size=32, keep_liver=1.0, roi=True))
    (z0, z1), (y0, y1), (x0, x1) = cropped.entry["roi"]
    assert y1 - y0 == x1 - x0 < 64 and "roi" not in whole.entry
    seg, geometry = volumes.read_nifti(task.segmentation_uri)
    labels = geometry.to_canonical(volumes.as_labels(seg, "ref"))
    # every liver slice is kept, and nothing of the liver lies outside the box
    assert set(np.flatnonzero((labels > 0).any(axis=(1, 2)))) <= set(range(z0, z1))
    assert labels.sum() == labels[z0:z1, y0:y1, x0:x1].sum()
    table = cropped.table
    canonical_z = [geometry.file_slice_index(np.arange(labels.shape[0])).tolist().index(i) for i in table.slice_index]
    assert set(canonical_z) <= set(range(z0, z1))
    hu_file, _ = volumes.read_nifti(task.volume_uri)
    hu = geometry.to_canonical(hu_file)
    breaks = ct.freqhist_breaks(hu_file)  # the crop's third channel is equalised over the whole volume
    for i, z in enumerate(canonical_z):
        assert np.array_equal(table.mask[i], ct.resize_mask(np.ascontiguousarray(labels[z, y0:y1, x0:x1]), 32))
        assert np.array_equal(table.image[i], ct.model_inputs(hu[:, y0:y1, x0:x1], [z], breaks, 0, 32)[0])
    # the crop shows the liver larger than the whole slice does
    assert (table.mask > 0).mean() > 2 * (whole.table.mask > 0).mean()


def test_prepare_roi_refuses_a_converted_image_dataset_in_one_line(tmp_path):
    from conftest import synthesize
    from lits.prepare import discovery

    data = synthesize(tmp_path / "images", volumes=1, size=32, slices=8, fmt="images")
    for fmt in ("auto", "images"):  # found or asked for, the same refusal, before any volume is read
        with pytest.raises(UserError, match="--roi crops a box around the liver .* needs volume-N/segmentation-N"):
            discovery.discover(PrepareConfig(input=data, output=str(tmp_path / "out"), format=fmt, roi=True))
    assert discovery.discover(PrepareConfig(input=data, output=str(tmp_path / "out")))[0]  # without --roi it prepares


class Stages:
    """A cascade's submit of two PixelModels, recording which stage got which images."""

    def __init__(self):
        self.first, self.second = PixelModel(), PixelModel()

    def __call__(self, images, stage=""):
        return (self.first if stage == roi.FIRST_STAGE else self.second)(images)


def cascade_spec(first_size, second_size, margin=roi.ROI_MARGIN):
    return inference.ModelSpec(uri="oracle-2", model_id="1" * 16, task="liver-tumour", out_channels=3, base_width=4,
                               depth=3, image_size=second_size, context=0, roi_margin=margin,
                               first_stage=spec_for(first_size))


def dice(labels, ref, c):
    p, r = labels >= c, ref >= c
    return 2 * np.sum(p & r) / (p.sum() + r.sum())


def test_cascade_segments_the_liver_box_at_its_own_resolution(nifti_dir):
    hu, geometry = volumes.read_nifti(os.path.join(nifti_dir, "volume-3.nii.gz"))
    seg, _ = volumes.read_nifti(os.path.join(nifti_dir, "segmentation-3.nii.gz"))
    ref = volumes.as_labels(seg, "ref")
    coded = coded_hu(hu, ref)
    single, _ = inference.segment_array(coded, geometry, spec_for(16), PixelModel(), chunk=5)
    stages = Stages()
    labels, timings = inference.segment_array(coded, geometry, cascade_spec(16, 48), stages, chunk=5)
    # the first stage saw whole slices at 16, the second the liver's box at 48, of the slices in its box only
    n = geometry.canonical_shape[0]
    assert sum(len(r) for r in stages.first.received) == n
    assert {r.shape[1:] for r in stages.first.received} == {(16, 16, 3)}
    assert {r.shape[1:] for r in stages.second.received} == {(48, 48, 3)}
    canonical_ref = geometry.to_canonical(ref)
    liver_slices = np.flatnonzero((canonical_ref > 0).any(axis=(1, 2)))
    assert len(liver_slices) <= sum(len(r) for r in stages.second.received) < n
    # at 16 pixels the tumour blurs away; in the box at 48 it comes back
    assert dice(single, ref, 2) < 0.5 and dice(labels, ref, 2) > 0.8 and dice(labels, ref, 1) > 0.97
    assert dice(labels, ref, 2) > dice(single, ref, 2) + 0.3
    assert timings["segment_s"] > 0 and labels.dtype == np.uint8 and labels.shape == hu.shape


def test_the_second_stage_box_follows_the_models_margin_and_holds_every_label(nifti_dir, monkeypatch):
    """The box a volume's second stage sees is the model's margin around the first stage's liver, and
    the box returned (what reports and post-processing use) holds every labelled voxel."""
    from lits.model import streaming

    hu, geometry = volumes.read_nifti(os.path.join(nifti_dir, "volume-3.nii.gz"))
    seg, _ = volumes.read_nifti(os.path.join(nifti_dir, "segmentation-3.nii.gz"))
    coded = coded_hu(hu, volumes.as_labels(seg, "ref"))
    square_box, boxes = roi.square_box, []

    def spy(extent, shape, margin=roi.ROI_MARGIN, *args, **kwargs):
        boxes.append((margin, square_box(extent, shape, margin, *args, **kwargs)))
        return boxes[-1][1]

    monkeypatch.setattr(roi, "square_box", spy)
    for margin in (0.05, 0.5):
        _, labels, box, _ = streaming.segment_volume(coded, geometry, cascade_spec(16, 48, margin), Stages(), 5, True,
                                                     None, 1)
        assert labels[box].sum() == labels.sum() > 0
    assert [m for m, _ in boxes] == [0.05, 0.5]
    (_, narrow), (_, wide) = boxes
    assert wide[1].stop - wide[1].start > narrow[1].stop - narrow[1].start


def test_a_non_square_slice_keeps_nothing_of_the_first_stage_outside_the_box():
    """A liver taller than the slice is wide: the square box is capped by the width and cannot hold all
    of the first stage's liver; what lies outside it is not left labelled."""
    from lits.core.volumes import Geometry

    ref = np.zeros((48, 96, 6), np.uint8)  # file order (x, y, z): canonical slices of 96 rows x 48 columns
    ref[8:40, 4:92, 1:5] = 1
    ref[20:30, 40:50, 2:4] = 2
    hu = coded_hu(np.full(ref.shape, -1000, np.int16), ref)
    geometry = Geometry.from_affine(np.eye(4), ref.shape)
    labels, _ = inference.segment_array(hu, geometry, cascade_spec(16, 32), Stages(), chunk=4)
    canonical = geometry.to_canonical(labels)
    box = roi.square_box(roi.liver_extent(geometry.to_canonical(ref) > 0), canonical.shape)
    outside = canonical.copy()
    outside[box] = 0
    assert canonical.any() and not outside.any()


def test_cascade_without_liver_never_runs_its_second_stage(nifti_dir):
    hu, geometry = volumes.read_nifti(os.path.join(nifti_dir, "volume-0.nii.gz"))
    stages = Stages()
    labels, _ = inference.segment_array(np.full_like(hu, -1000), geometry, cascade_spec(16, 32), stages, chunk=8)
    assert not labels.any() and stages.first.received and not stages.second.received


def export(folder, image_size, roi_model=False, first_stage=None, seed=0):
    torch.manual_seed(seed)
    model = UNet(3, 3, base_width=4, depth=3)
    arch = {"name": "UNet", "in_channels": 3, "out_channels": 3, "base_width": 4, "depth": 3}
    extra = {"first_stage": first_stage} if first_stage else None
    inference.save_model(str(folder), model.state_dict(),
                         inference.model_config(arch, "liver-tumour", image_size, 0, extra, roi=roi_model))
    return str(folder)


def test_a_cascade_model_folder_loads_both_stages(tmp_path):
    lone = export(tmp_path / "lone", 32, roi_model=True)
    with pytest.raises(UserError, match="--first-stage"):
        inference.load_spec(lone)
    model = tmp_path / "cascade"
    export(model / "first_stage", 16)
    export(model, 32, roi_model=True, first_stage="first_stage")
    spec, _ = inference.load_spec(str(model))
    assert spec.roi_margin == roi.ROI_MARGIN and spec.first_stage.image_size == 16 and spec.image_size == 32
    assert inference.ModelSpec.from_dict(spec.to_dict()) == spec  # as a replica's describe() carries it
    second, first = inference.load_predictors(str(model), device="cpu")
    assert first.spec == spec.first_stage and second.spec == spec
    local = inference.LocalModel(second, first)
    images = np.zeros((2, 16, 16, 3), np.uint8)
    labels, coarse = local(images, (40, 40), stage=roi.FIRST_STAGE).result()
    assert labels.shape == (2, 40, 40) and coarse.shape == (2, 16, 16)
    with pytest.raises(ValueError, match="not a cascade"):
        inference.LocalModel(second)(images, (40, 40), stage=roi.FIRST_STAGE)
    with pytest.raises(ValueError, match="unknown stage"):
        inference.stage_predictor(second, first, "third")
    # a first stage that is itself a liver-box model is refused
    nested = tmp_path / "nested"
    export(nested / "first_stage", 16, roi_model=True, first_stage="first_stage")
    export(nested / "first_stage" / "first_stage", 16)
    export(nested, 32, roi_model=True, first_stage="first_stage")
    with pytest.raises(UserError, match="whole-slice liver-tumour"):
        inference.load_spec(str(nested))
    # other first-stage weights are another model: a job recomputes its outputs
    export(model / "first_stage", 16, seed=1)
    assert inference.load_spec(str(model))[0].model_id != spec.model_id


def cascade_model(folder, first_size=16, second_size=32):
    """A cascade model folder: a first stage that calls every pixel liver (its head's bias), so the
    second stage always runs, on boxes of the whole slice; the second stage's random head is scaled
    to unit logits, so its labels (all three classes) follow its input."""
    liver_everywhere_model(folder / "first_stage", first_size)
    arch = {"name": "UNet", "in_channels": 3, "out_channels": 3, "base_width": 4, "depth": 3}
    torch.manual_seed(0)
    second = UNet(3, 3, base_width=4, depth=3).eval()
    with torch.no_grad():
        x = torch.rand((8, 3, second_size, second_size), generator=torch.Generator().manual_seed(0))
        logits = second(x)
        mean, std = logits.mean((0, 2, 3)), logits.std((0, 2, 3))
        second.head.weight.div_(std[:, None, None, None])
        second.head.bias.sub_(mean).div_(std)
    inference.save_model(str(folder), second.state_dict(),
                         inference.model_config(arch, "liver-tumour", second_size, 0, {"first_stage": "first_stage"},
                                                roi=True))
    return str(folder)


def liver_everywhere_model(folder, image_size):
    """An exported whole-slice model that calls every pixel liver (its head's bias): a first stage
    whose box is the whole slice."""
    model = UNet(3, 3, base_width=4, depth=3)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([0.0, 8.0, 0.0]))
    arch = {"name": "UNet", "in_channels": 3, "out_channels": 3, "base_width": 4, "depth": 3}
    inference.save_model(str(folder), model.state_dict(), inference.model_config(arch, "liver-tumour", image_size, 0))
    return str(folder)


def test_a_batch_of_both_stages_gets_each_chunk_answered_by_its_own_stage(tmp_path):
    """A replica's batch mixes volumes' first-stage and second-stage chunks: each answer comes from
    the chunk's own stage, in the batch's order."""
    model = cascade_model(tmp_path / "m", first_size=16, second_size=32)
    second, first = inference.load_predictors(model, device="cpu")
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 255, (n, s, s, 3), dtype=np.uint8) for n, s in ((2, 16), (3, 32), (1, 16), (2, 32))]
    stages = [roi.FIRST_STAGE, "", roi.FIRST_STAGE, ""]
    shapes = [(40, 40), (24, 24), (40, 40), (24, 24)]
    answers = inference.labels_by_stage(second, first, chunks, shapes, stages)
    for chunk, shape, stage, (labels, coarse) in zip(chunks, shapes, stages, answers):
        own = (first if stage else second).labels([chunk], [shape])[0]
        assert labels.shape == (len(chunk),) + shape and np.array_equal(labels, own[0]) and np.array_equal(coarse, own[1])
    assert (answers[0][0] == 1).all()  # the first stage calls everything liver; the second does not
    assert len(np.unique(answers[1][0])) > 1


def test_a_cascade_runs_end_to_end_with_real_predictors(tmp_path, nifti_dir):
    """Loaded from its folder, answered in labels (as a Serve replica answers): both stages run."""
    model = cascade_model(tmp_path / "m", first_size=16, second_size=32)
    spec, _ = inference.load_spec(model)
    hu, geometry = volumes.read_nifti(os.path.join(nifti_dir, "volume-2.nii.gz"))
    labels, _ = inference.segment_array(hu, geometry, spec, inference.LocalModel(*inference.load_predictors(model)),
                                        chunk=4)
    assert labels.shape == hu.shape and labels.dtype == np.uint8 and len(np.unique(labels)) >= 2
