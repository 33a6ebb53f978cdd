"""Inference without Ray: geometry undone exactly, post-processing, reports, model loading."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from lits.core import ct, postprocess, reports, synthetic, volumes
from lits.model import inference, streaming
from lits.core.errors import BadInputError, UserError
from lits.model.unet import UNet


def guided_postprocess(labels, coarse, out=None):
    """The full-resolution post-processing a volume task applies: the component chosen on `coarse`."""
    return postprocess.apply_keep(labels, postprocess.guided_keep(coarse), coarse.shape[1:], out)


def tiny_model(folder, image_size=32, task="liver-tumour", seed=0):
    """A random-weight width-4 U-Net exported like train.py's model/ (what serving loads)."""
    torch.manual_seed(seed)
    out = 3 if task == "liver-tumour" else 1
    model = UNet(3, out, base_width=4, depth=3)
    arch = {"name": "UNet", "in_channels": 3, "out_channels": out, "base_width": 4, "depth": 3}
    inference.save_model(str(folder), model.state_dict(), inference.model_config(arch, task, image_size, 0))
    return str(folder)


# Label-coded HU: liver and tumour at one value each (background keeps the phantom's body, below both
# windows), so that a model can read the labels back from the pixels of the images it is given.
CODED_LIVER_HU, CODED_TUMOUR_HU, CODED_BACKGROUND_MAX_HU = 30, 200, -50
# What those values become in the image's first two channels (lits.core.schema's windows):
# liver window W150/L30 and custom window W200/L60; background is 0 in both.
LIVER_C0, LIVER_C1 = (30 + 45) * 255 / 150, (30 + 40) * 255 / 200  # 127.5, 89.25; tumour saturates both


def coded_hu(hu, labels):
    """int16 HU of `labels` (any layout): liver 30, tumour 200, background min(hu, -50)."""
    return np.where(labels == 0, np.minimum(hu, CODED_BACKGROUND_MAX_HU),
                    np.where(labels == 1, CODED_LIVER_HU, CODED_TUMOUR_HU)).astype(np.int16)


class PixelModel:
    """A 'model' that answers from the pixels of the images it receives, nothing else: on
    `coded_hu` volumes it reads each pixel's liver and tumour fractions from the first two
    channels (a pixel area-averaged from f_liver, f_tumour has c0 = 127.5 f_liver + 255 f_tumour and
    c1 = 89.25 f_liver + 255 f_tumour) and answers them as probabilities * 255. A perfect model at
    full size, a good one below it; images of the wrong slices, or garbage, give wrong masks."""

    def __init__(self):
        self.received = []

    def __call__(self, images):
        self.received.append(np.array(images, copy=True))
        c0, c1 = images[..., 0].astype(np.float64), images[..., 1].astype(np.float64)
        liver = np.clip((c0 - c1) / (LIVER_C0 - LIVER_C1), 0.0, 1.0)
        tumour = np.clip((c1 - LIVER_C1 * liver) / 255.0, 0.0, 1.0 - liver)
        probs = np.stack([1.0 - liver - tumour, liver, tumour], axis=-1)
        return inference.Done(np.round(probs * 255.0).astype(np.uint8))


class SliceByImage:
    """Which canonical slice of a volume an image shows, found from its pixels: every slice's
    model input (`ct.model_inputs`, what prepare stores) keyed by its bytes. An image the volume's
    preprocessing does not produce (another slice's, a half-written buffer) fails the test."""

    def __init__(self, hu_canonical, size):
        images = ct.model_inputs(hu_canonical, range(len(hu_canonical)), ct.freqhist_breaks(hu_canonical), 0, size)
        self.z_of = {image.tobytes(): z for z, image in enumerate(images)}
        assert len(self.z_of) == len(images)  # every slice's image differs (phantom noise)

    def __call__(self, images):
        unknown = [i for i, image in enumerate(images) if image.tobytes() not in self.z_of]
        assert not unknown, f"images {unknown} of a chunk of {len(images)} are no slice's model input"
        return np.array([self.z_of[image.tobytes()] for image in images])


def spec_for(size, task="liver-tumour"):
    return inference.ModelSpec(uri="oracle", model_id="0" * 16, task=task, out_channels=3, base_width=4,
                               depth=3, image_size=size, context=0)


@pytest.mark.parametrize("index", range(6))
def test_segment_array_undoes_orientation_exactly(nifti_dir, index):
    hu, geometry = volumes.read_nifti(os.path.join(nifti_dir, f"volume-{index}.nii.gz"))
    seg, _ = volumes.read_nifti(os.path.join(nifti_dir, f"segmentation-{index}.nii.gz"))
    ref = volumes.as_labels(seg, "ref")
    size = geometry.canonical_shape[1]  # the model at the slices' size: it reads the labels exactly
    labels, timings = inference.segment_array(coded_hu(hu, ref), geometry, spec_for(size), PixelModel(), chunk=5,
                                              postprocess=False)
    assert labels.shape == hu.shape and labels.dtype == np.uint8
    assert np.array_equal(labels, ref), geometry.axcodes
    assert (ref == 2).any() and timings["segment_s"] > 0


def test_downsampled_model_recovers_reference_closely(nifti_dir):
    hu, geometry = volumes.read_nifti(os.path.join(nifti_dir, "volume-2.nii.gz"))
    seg, _ = volumes.read_nifti(os.path.join(nifti_dir, "segmentation-2.nii.gz"))
    ref = volumes.as_labels(seg, "ref")
    labels, _ = inference.segment_array(coded_hu(hu, ref), geometry, spec_for(32), PixelModel(), chunk=7)

    def dice(c):
        p, r = labels >= c, ref >= c
        return 2 * np.sum(p & r) / (p.sum() + r.sum())

    # 64^2 slices through a 32^2 model: boundaries blur (about 0.99 liver, 0.7 tumour on this case)
    assert dice(1) > 0.98 and dice(2) > 0.6
    assert set(np.unique(labels)) <= {0, 1, 2}


# --- the model's images are prepare's, in any orientation and chunking (issue 26) ---------------------

# File axis directions -> (RAS axis, sign), as lits.core.synthetic draws them.
AXIS_OF = {"L": (0, -1), "R": (0, 1), "P": (1, -1), "A": (1, 1), "S": (2, 1), "I": (2, -1)}


def oriented_phantom(axcodes, seed, spacing=(0.7, 0.8, 2.5), size=48, slices=22):
    """A seeded phantom with slices that are not square (canonical (22, 48, 38)) and unequal
    in-plane spacing (x, y, z mm), stored with file axes `axcodes`: (geometry, file-order HU, labels)."""
    rng = np.random.default_rng(seed)
    drawn = synthetic.make_phantom(rng, size=size, slices=slices)
    phantom = synthetic.Phantom(hu=drawn.hu[:, :, 4:-6], labels=drawn.labels[:, :, 4:-6], spacing=spacing)
    z, h, w = phantom.hu.shape
    extent = {0: w, 1: h, 2: z}  # RAS axis -> canonical extent
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for i, code in enumerate(axcodes):
        axis, sign = AXIS_OF[code]
        affine[axis, i] = sign * spacing[axis]
    affine[:3, 3] = rng.uniform(-100.0, 100.0, 3)
    shape = tuple(extent[AXIS_OF[code][0]] for code in axcodes)
    hu, labels = synthetic.phantom_to_file(phantom, affine, shape)
    return volumes.Geometry.from_affine(affine, shape), hu, labels


@pytest.mark.parametrize("axcodes, seed", [("LPS", 0), ("RAI", 1), ("SPL", 2), ("IAR", 3), ("PSL", 4)])
def test_the_model_receives_prepares_images_in_every_orientation_and_chunking(axcodes, seed, tmp_path):
    """Axial axis last, first and in the middle, flipped or not; chunks of 5, 7, 8 and 16 slices
    (more than streaming.PREPROCESS_BLOCK, and not multiples of it): the images the model receives,
    in order, are `ct.model_inputs` of every canonical slice, and prepare's shard images of them."""
    from lits.core.config import PrepareConfig
    from lits.prepare import slicing

    size = 32
    geometry, hu_file, labels_file = oriented_phantom(axcodes, seed)
    assert geometry.axcodes == axcodes and geometry.canonical_shape == (22, 48, 38)
    hu = geometry.to_canonical(hu_file)
    n = hu.shape[0]
    expected = ct.model_inputs(hu, range(n), ct.freqhist_breaks(hu), 0, size)

    # prepare's images of the same volume (every slice kept), by canonical slice
    paths = [str(tmp_path / "volume-0.nii.gz"), str(tmp_path / "segmentation-0.nii.gz")]
    volumes.write_nifti(paths[0], hu_file, geometry.affine_array)
    volumes.write_nifti(paths[1], labels_file, geometry.affine_array)
    task = slicing.VolumeTask(volume_id="volume-0", format="nifti", volume_uri=paths[0], segmentation_uri=paths[1])
    cfg = PrepareConfig(input=str(tmp_path), output=str(tmp_path / "out"), image_size=size, keep_liver=1.0, keep_empty=1.0)
    table = slicing.slice_nifti_pair(task, cfg).table
    z_of_file_slice = {int(f): z for z, f in enumerate(geometry.file_slice_index(np.arange(n)))}
    assert sorted(z_of_file_slice[int(f)] for f in table.slice_index) == list(range(n))
    shard = np.empty_like(expected)
    for row, f in enumerate(table.slice_index):
        shard[z_of_file_slice[int(f)]] = table.image[row]
    assert np.array_equal(shard, expected)

    for chunk in (5, 7, 8, 16):
        model = PixelModel()
        inference.segment_array(hu_file, geometry, spec_for(size), model, chunk=chunk, postprocess=False, threads=2)
        assert [len(images) for images in model.received] == [min(chunk, n - s) for s in range(0, n, chunk)]
        received = np.concatenate(model.received)
        wrong = [z for z in range(n) if not np.array_equal(received[z], expected[z])]
        assert not wrong, f"chunk {chunk}: the model got wrong images of slices {wrong}"


def test_postprocess_keeps_largest_liver_component_and_tumour_inside_it():
    labels = np.zeros((6, 10, 10), np.uint8)
    labels[1:5, 1:6, 1:6] = 1       # the liver: 100 voxels
    labels[2:4, 2:4, 2:4] = 2       # a tumour inside it
    labels[0, 8:10, 8:10] = 1       # an island of "liver"
    labels[5, 8, 0:2] = 2           # an island of "tumour" elsewhere
    out = postprocess.postprocess(labels)
    expected = labels.copy()
    expected[0, 8:10, 8:10] = 0
    expected[5, 8, 0:2] = 0
    assert np.array_equal(out, expected)
    assert labels[0, 8, 8] == 1  # input untouched
    assert not postprocess.postprocess(np.zeros((3, 4, 4), np.uint8)).any()


def test_components_use_26_connectivity():
    mask = np.zeros((4, 4, 4), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True   # corner-touching: one lesion
    mask[3, 3, 3] = True                   # apart: another
    assert postprocess.component_sizes(mask).tolist() == [2, 1]
    assert postprocess.component_sizes(np.zeros((2, 2, 2), bool)).size == 0


def test_volume_report_measures_in_millilitres():
    affine = np.diag([0.5, -0.5, 2.0, 1.0])  # 0.5 mm^3 per voxel
    geometry = volumes.Geometry.from_affine(affine, (10, 10, 10))
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[:8, :8, :5] = 1                   # 320 voxels of liver
    labels[0:2, 0:2, 0:2] = 2                # lesion of 8 voxels
    labels[5:7, 5:7, 3] = 2                  # lesion of 4 voxels
    report = reports.volume_report(labels, streaming.voxel_ml(geometry), "liver-tumour")
    assert report["liver_volume_ml"] == pytest.approx(320 * 0.5 / 1000)
    assert report["tumour_volume_ml"] == pytest.approx(12 * 0.5 / 1000)
    assert report["lesion_count"] == 2
    assert report["lesion_volumes_ml"] == [pytest.approx(0.004), pytest.approx(0.002)]
    assert report["tumour_burden_percent"] == pytest.approx(100 * 12 / 320, abs=1e-3)


def test_predictor_loads_weights_only_and_outputs_probabilities(tmp_path):
    spec, weights = inference.load_spec(tiny_model(tmp_path / "model"))
    assert spec.image_size == 32 and spec.model_id == inference.model_id_of((tmp_path / "model" / "weights.pt").read_bytes())
    predictor = inference.Predictor(spec, weights, device="cpu", max_batch=3)
    images = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    probs = predictor(images)
    assert probs.shape == (7, 32, 32, 3) and probs.dtype == np.uint8
    # softmax probabilities * 255, rounded per class: each pixel sums to 255 +- 2
    assert np.abs(probs.astype(int).sum(-1) - 255).max() <= 2
    # batching does not change the answer
    assert np.array_equal(probs[3:5], predictor(images[3:5]))


def test_the_exported_normalisation_is_the_one_rebuilt(tmp_path):
    """config.json's architecture.norm rebuilds the network it was saved from; a model exported before
    norm existed is BatchNorm; an unknown norm is one clear error."""
    assert inference.load_spec(tiny_model(tmp_path / "old"))[0].norm == "batch"  # no 'norm' key
    torch.manual_seed(0)
    model = UNet(3, 3, base_width=4, depth=3, norm="instance").eval()
    arch = {"name": "UNet", "in_channels": 3, "out_channels": 3, "base_width": 4, "depth": 3, "norm": "instance"}
    inference.save_model(str(tmp_path / "inst"), model.state_dict(), inference.model_config(arch, "liver-tumour", 32, 0))
    spec, weights = inference.load_spec(str(tmp_path / "inst"))
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255), 1)
    probs = inference.Predictor(spec, weights, device="cpu", tta=False)(images)
    assert spec.norm == "instance"
    assert np.abs(probs.astype(float) - expected.permute(0, 2, 3, 1).numpy() * 255).max() <= 1.0
    arch["norm"] = "group"
    inference.save_model(str(tmp_path / "bad"), model.state_dict(), inference.model_config(arch, "liver-tumour", 32, 0))
    with pytest.raises(UserError, match="norm 'group'.*re-export"):
        inference.load_spec(str(tmp_path / "bad"))


def test_segment_bytes_keeps_input_geometry(nifti_dir, tmp_path):
    spec, weights = inference.load_spec(tiny_model(tmp_path / "model"))
    predictor = inference.Predictor(spec, weights, device="cpu")
    path = os.path.join(nifti_dir, "volume-3.nii.gz")
    with open(path, "rb") as f:
        mask_bytes, report = inference.segment_bytes(f.read(), "volume-3", spec, lambda x: inference.Done(predictor(x)))
    out = tmp_path / "mask.nii.gz"
    out.write_bytes(mask_bytes)
    src, got = nib.load(path), nib.load(str(out))
    assert got.shape == src.shape
    assert np.allclose(got.affine, src.affine)
    assert nib.aff2axcodes(got.affine) == nib.aff2axcodes(src.affine)
    assert got.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(got.dataobj))) <= {0, 1, 2}
    assert report["model_id"] == spec.model_id and report["shape"] == list(src.shape)
    json.dumps(report)  # serialisable


def test_bad_inputs_and_models_give_clear_errors(tmp_path):
    spec, weights = inference.load_spec(tiny_model(tmp_path / "model"))
    with pytest.raises(BadInputError, match="not a NIfTI"):
        inference.segment_bytes(b"x" * 1000, "junk.nii", spec, lambda x: None)
    with pytest.raises(UserError, match="config.json is missing"):
        inference.load_spec(str(tmp_path / "nowhere"))
    other, _ = inference.load_spec(tiny_model(tmp_path / "other", task="tumour"))
    assert other.out_channels == 1 and spec.out_channels == 3  # the two models really differ in shape
    (tmp_path / "model" / "weights.pt").write_bytes((tmp_path / "other" / "weights.pt").read_bytes())
    spec, weights = inference.load_spec(str(tmp_path / "model"))
    assert spec.model_id == other.model_id  # the tumour model's weights under the liver-tumour config
    with pytest.raises(UserError, match="does not fit"):
        inference.Predictor(spec, weights, device="cpu")


def test_guided_postprocess_matches_full_resolution_on_upsampled_labels():
    rng = np.random.default_rng(5)
    coarse = np.zeros((8, 16, 16), np.uint8)
    coarse[1:7, 2:10, 2:10] = 1
    coarse[3:5, 4:6, 4:6] = 2
    coarse[0:2, 13:16, 13:16] = 1   # a separate island
    coarse[7, 14, 0:3] = 2          # tumour outside the liver
    full = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)
    guided = guided_postprocess(full, coarse)
    assert np.array_equal(guided, postprocess.postprocess(full))
    assert guided[0, 60, 60] == 0 and guided[3, 10, 10] == 1 and guided[3, 18, 18] == 2
    assert not guided_postprocess(full, np.zeros_like(coarse)).any()
    noisy = full.copy()
    noisy[rng.random(full.shape) < 0.001] = 1
    kept = guided_postprocess(noisy, coarse)
    far = np.ones(full.shape, bool)
    far[:, :48, :48] = False  # within reach of the kept liver
    assert not kept[far & (coarse.repeat(4, 1).repeat(4, 2) == 0)].any()


# --- labels from the model, streamed chunks, post-processing in the liver's box (issue 15.2) ------

def soft_probs(labels_canonical, size):
    """uint8 (Z, size, size, 3): a good model's soft answer (one-hot area-resized, blurred 1 px),
    so that class boundaries hold near-ties, as a real model's do."""
    import cv2

    out = np.empty((len(labels_canonical), size, size, 3), np.uint8)
    for z, ref in enumerate(labels_canonical):
        one_hot = np.stack([np.where(ref == c, 255, 0).astype(np.uint8) for c in range(3)], -1)
        out[z] = cv2.GaussianBlur(ct.resize_image(one_hot, size), (5, 5), 1.0)
    return out


def previous_pipeline(probs, geometry, min_tumour_ml):
    """What inference wrote before this change (commit ec846f5), restated: each slice's
    probabilities resized by cv2 and np.argmax'ed, the liver component chosen on the model-size
    argmax and dilated over the whole volume, small tumours relabelled over the whole volume."""
    import cv2
    from scipy import ndimage

    n, h, w = geometry.canonical_shape
    labels = np.stack([np.argmax(cv2.resize(p, (w, h), interpolation=cv2.INTER_LINEAR), axis=-1) for p in probs]).astype(np.uint8)
    keep = ndimage.binary_dilation(postprocess.largest_component(np.argmax(probs, -1) >= 1), structure=np.ones((3, 3, 3), bool))
    out = np.zeros_like(labels)
    for z in range(n):
        if keep[z].any():
            out[z] = labels[z] * cv2.resize(keep[z].astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    ids, count = ndimage.label(out == 2, structure=np.ones((3, 3, 3), bool))
    small = np.bincount(ids.reshape(-1), minlength=count + 1) * streaming.voxel_ml(geometry) < min_tumour_ml
    small[0] = False
    out[small[ids]] = 1
    return np.asarray(geometry.from_canonical(out))


class Answers:
    """A replica's answers (labels at the slice size, model-size labels) made from given
    probabilities of the slices the images show (`SliceByImage`)."""

    answers_labels = True

    def __init__(self, probs, slice_of):
        self.probs, self.slice_of, self.shapes = probs, slice_of, set()

    def __call__(self, images, shape):
        part = self.probs[self.slice_of(images)]
        self.shapes.add(tuple(shape))
        return inference.Done((postprocess.probs_to_labels(part, shape, "liver-tumour"), postprocess.argmax3(part)))


def phantom_case(seed, size=128, slices=24):
    """(file-order HU, geometry, canonical reference labels) of a seeded phantom in a drawn file orientation."""
    rng = np.random.default_rng(seed)
    phantom = synthetic.make_phantom(rng, size=size, slices=slices)
    affine, shape = synthetic.phantom_affine(rng, phantom)
    hu, labels = synthetic.phantom_to_file(phantom, affine, shape)
    geometry = volumes.Geometry.from_affine(affine, shape)
    return hu, geometry, geometry.to_canonical(labels)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("threads", [1, 2])
def test_streamed_labels_equal_the_previous_code(seed, threads):
    from scipy import ndimage

    hu, geometry, ref = phantom_case(seed)
    probs = soft_probs(ref, 64)  # 128^2 slices, a 64^2 model: the guided post-processing
    probs[3, 60:63, 1:3] = (0, 0, 255)  # a tumour speck far from the liver: the component step drops it
    inside = ndimage.binary_erosion(np.argmax(probs, -1) == 1, structure=np.ones((1, 7, 7), bool))
    z, y, x = np.argwhere(inside)[inside.sum() // 2]
    probs[z, y, x] = (0, 0, 255)  # a tumour speck inside the liver, apart from lesions: relabelled liver
    min_ml = 20 * streaming.voxel_ml(geometry)
    spec = inference.ModelSpec(**{**spec_for(64).to_dict(), "min_tumour_ml": min_ml})
    expected = previous_pipeline(probs, geometry, min_ml)
    slice_of = SliceByImage(geometry.to_canonical(hu), 64)
    answers = Answers(probs, slice_of)
    labels, timings = inference.segment_array(hu, geometry, spec, answers, chunk=5, threads=threads)
    assert answers.shapes == {geometry.canonical_shape[1:]}
    assert np.array_equal(labels, expected) and labels.flags.f_contiguous
    probs_path, _ = inference.segment_array(hu, geometry, spec, lambda x: inference.Done(probs[slice_of(x)]), chunk=7)
    assert np.array_equal(probs_path, expected)  # a plain Predictor's probabilities give the same
    assert set(timings) == set(streaming.STAGES)
    # the case exercised every step: liver and lesions kept, both specks gone
    kept_tumour = (expected == 2).sum()
    assert (expected == 1).sum() > 5000 and kept_tumour > 40
    assert (previous_pipeline(probs, geometry, 0.0) == 2).sum() > kept_tumour


def test_argmax3_breaks_ties_like_argmax(rng):
    probs = rng.choice(np.array([0, 127, 128, 255], np.uint8), size=(50, 40, 3))
    assert np.array_equal(postprocess.argmax3(probs), np.argmax(probs, axis=-1))


def test_postprocess_in_the_box_equals_the_whole_volume(rng):
    from scipy import ndimage

    for trial in range(20):
        coarse = np.zeros((10, 12, 12), np.uint8)
        coarse[:7][rng.random((7, 12, 12)) < 0.25] = 1
        coarse[:7][rng.random((7, 12, 12)) < 0.05] = 2
        coarse[:7, 0, :] = coarse[:7, 0, :] | (trial % 2)  # components that reach the volume's edges too
        coarse[9, 2:5, 2:5] = 1  # an island two slices away: outside the kept component's slices
        full = np.repeat(np.repeat(coarse, 3, axis=1), 3, axis=2)
        keep = ndimage.binary_dilation(postprocess.largest_component(coarse >= 1), structure=np.ones((3, 3, 3), bool))
        expected = full * np.repeat(np.repeat(keep, 3, axis=1), 3, axis=2)
        assert np.array_equal(guided_postprocess(full, coarse), expected)
        in_place = full.copy()
        guided_postprocess(in_place, coarse, out=in_place)
        assert np.array_equal(in_place, expected)
        box = postprocess.full_box(postprocess.guided_keep(coarse)[0], coarse.shape, full.shape)
        assert expected[box].sum() == expected.sum()


def test_replica_labels_equal_local_ones_and_torch_upsampling_is_within_tolerance(tmp_path):
    spec, weights = inference.load_spec(tiny_model(tmp_path / "model"))
    predictor = inference.Predictor(spec, weights, device="cpu", max_batch=4)
    assert predictor.upsample == "cv2"
    images = np.random.default_rng(0).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    answers = predictor.labels([images[:4], images[4:]], [(48, 40), (20, 20)])
    probs = predictor(images)
    assert np.array_equal(answers[0][0], postprocess.probs_to_labels(probs[:4], (48, 40), "liver-tumour"))
    assert np.array_equal(answers[1][0], postprocess.probs_to_labels(probs[4:], (20, 20), "liver-tumour"))
    assert np.array_equal(np.concatenate([a[1] for a in answers]), np.argmax(probs, -1))
    # The GPU's path, run here on the CPU, on a realistic answer: soft boundaries, near-ties on them.
    _, _, ref = phantom_case(2, size=256, slices=16)
    soft = soft_probs(ref, 128)  # 256^2 slices from a 128^2 model
    on_host = postprocess.probs_to_labels(soft, (256, 256), "liver-tumour")
    on_device, coarse = inference.labels_on_device(torch.from_numpy(soft).permute(0, 3, 1, 2).float(), (256, 256), "liver-tumour")
    assert np.array_equal(coarse, postprocess.argmax3(soft))
    # The tolerance: liver Dice >= 0.999; tumour Dice >= 0.998 on these small lesions (~1,400 voxels;
    # 0.9997 on benchmarks/segment.py's 512x512x500 scan); voxels differ only at near-ties.
    for c, least in ((1, 0.999), (2, 0.998)):
        a, b = on_host >= c, on_device >= c
        assert 2 * np.sum(a & b) / (a.sum() + b.sum()) >= least
    assert np.mean(on_host != on_device) < 1e-3


def test_segment_uri_reports_every_stage(nifti_dir, tmp_path):
    spec, weights = inference.load_spec(tiny_model(tmp_path / "model"))
    outputs = {"mask": str(tmp_path / "v_seg.nii.gz"), "preview": str(tmp_path / "v_preview.png"), "report": str(tmp_path / "v.json")}
    model = inference.LocalModel(inference.Predictor(spec, weights, device="cpu"))
    report = inference.segment_uri(os.path.join(nifti_dir, "volume-0.nii.gz"), outputs, spec, model, threads=2)
    seconds = report["seconds"]
    assert set(seconds) == set(streaming.STAGES) | {"read", "report", "encode", "preview", "write", "total"}
    assert all(v >= 0 for v in seconds.values()) and seconds["segment_s"] <= seconds["total"]
    assert json.loads((tmp_path / "v.json").read_text())["seconds"] == seconds
    assert (tmp_path / "v_preview.png").read_bytes()[:4] == b"\x89PNG"


def test_preview_searches_only_the_box_and_draws_the_same_picture():
    hu, geometry, ref = phantom_case(1)
    labels = np.where(ref > 0, ref, 0).astype(np.uint8)
    labels[:, :, :3] = 0
    box = postprocess.bounding_box(labels > 0)
    padded = postprocess.pad_box(box, labels.shape, 3)
    canonical_hu = geometry.to_canonical(hu)
    whole = reports.preview_png(canonical_hu, labels, "v")
    assert reports.preview_png(canonical_hu, labels, "v", box) == whole
    assert reports.preview_png(canonical_hu, labels, "v", padded) == whole
    empty = np.zeros_like(labels)
    assert reports.preview_png(canonical_hu, empty, "v", (slice(0, 0),) * 3) == reports.preview_png(canonical_hu, empty, "v")


def test_half_precision_follows_the_card():
    """bf16 only where the card computes it natively (compute capability 8.0 on), fp16 on older
    cards, full precision on CPU: serving and training ask the same rule."""
    from lits.model.devices import half_dtype

    assert half_dtype((7, 5)) is torch.float16 and half_dtype((7, 0)) is torch.float16
    assert half_dtype((8, 0)) is torch.bfloat16 and half_dtype((9, 0)) is torch.bfloat16
    assert half_dtype(None) is None
