import cv2
import numpy as np
import pytest

from lits.core import masks
from lits.core.errors import BadInputError


def liver_phantom(size=256, tumours=((70, 120, 18), (110, 130, 3))):
    """A liver ellipse with tumours (x, y, radius) inside it, labels 0/1/2."""
    m = np.zeros((size, size), np.uint8)
    cv2.ellipse(m, (size * 2 // 5, size // 2), (size // 4, size // 6), 15, 0, 360, 1, -1)
    for x, y, r in tumours:
        cv2.circle(m, (x, y), r, 2, -1)
    return m


def jpeg_roundtrip(rgb, quality=75):
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def test_categorise_is_largest_label_per_slice():
    labels = np.zeros((4, 5, 5), np.uint8)
    labels[1, 2, 2] = 1
    labels[2, 0, 0] = 1
    labels[2, 1, 1] = 2
    labels[3, 4, 4] = 2
    assert masks.categorise(labels).tolist() == [0, 1, 2, 2]
    assert masks.categorise(labels).dtype == np.int8


def test_select_slices_keeps_all_tumour_and_seeded_fractions():
    categories = np.array([0] * 4000 + [1] * 4000 + [2] * 50, np.int8)
    keep = masks.select_slices(categories, 0.2, 0.05, np.random.default_rng(7))
    assert keep[categories == 2].all()
    assert abs(keep[categories == 1].mean() - 0.2) < 0.03
    assert abs(keep[categories == 0].mean() - 0.05) < 0.015
    again = masks.select_slices(categories, 0.2, 0.05, np.random.default_rng(7))
    assert np.array_equal(keep, again)
    none = masks.select_slices(categories, 0.0, 0.0, np.random.default_rng(7))
    assert np.array_equal(none, categories == 2)
    assert masks.select_slices(categories, 1.0, 1.0, np.random.default_rng(7)).all()


@pytest.mark.parametrize("colormap", ["Blues", "gray", "viridis", "magma"])
@pytest.mark.parametrize("with_tumour", [True, False])
def test_decode_jpeg_colour_masks(colormap, with_tumour):
    truth = liver_phantom() if with_tumour else liver_phantom(tumours=())
    decoded = masks.decode_colour_mask(jpeg_roundtrip(masks.render_colour_mask(truth, colormap)))
    assert decoded.dtype == np.uint8 and decoded.shape == truth.shape
    assert np.mean(decoded == truth) > 0.999
    assert dice(decoded >= 1, truth >= 1) > 0.995
    if with_tumour:
        assert dice(decoded == 2, truth == 2) > 0.97
        assert (decoded == 2).any()
    else:
        assert not (decoded == 2).any()


def test_liver_only_and_tumour_masks_use_the_same_colour_differently():
    # The colour problem of the original dataset: the extreme colour means liver in one mask
    # and tumour in another; decoding must follow the mask, not a fixed palette.
    only = masks.render_colour_mask(liver_phantom(tumours=()), "Blues")
    both = masks.render_colour_mask(liver_phantom(), "Blues")
    extreme = only[128, 102]
    assert np.array_equal(both[120, 70], extreme)
    assert masks.decode_colour_mask(only)[128, 102] == 1
    assert masks.decode_colour_mask(both)[120, 70] == 2


def test_png_masks_decode_exactly_and_grey_input_works():
    truth = liver_phantom()
    rgb = masks.render_colour_mask(truth, "gray")
    assert np.array_equal(masks.decode_colour_mask(rgb), truth)
    assert np.array_equal(masks.decode_colour_mask(rgb[..., 0]), truth)
    rgba = np.concatenate([rgb, np.full(truth.shape + (1,), 255, np.uint8)], axis=2)
    assert np.array_equal(masks.decode_colour_mask(rgba), truth)


def test_flat_mask_is_empty():
    flat = jpeg_roundtrip(np.full((64, 64, 3), (247, 251, 255), np.uint8))
    assert not masks.decode_colour_mask(flat).any()


def test_photo_like_image_is_rejected(rng):
    noise = rng.integers(0, 256, size=(128, 128, 3)).astype(np.uint8)
    with pytest.raises(BadInputError, match="mask-17"):
        masks.decode_colour_mask(noise, "mask-17")


def test_four_colours_are_rejected():
    rgb = np.zeros((128, 128, 3), np.uint8)
    rgb[:, :32] = (255, 0, 0)
    rgb[:, 32:64] = (0, 255, 0)
    rgb[:, 64:96] = (0, 0, 255)
    with pytest.raises(BadInputError, match="4 solid colours"):
        masks.decode_colour_mask(rgb)


def test_three_colours_off_a_sequential_colormap_are_rejected():
    truth = liver_phantom()
    # Background lightness between the other two: no sequential colormap starts in its middle.
    middle_background = np.array([[120, 120, 120], [40, 40, 40], [250, 250, 250]], np.uint8)
    with pytest.raises(BadInputError, match="sequential"):
        masks.decode_colour_mask(middle_background[truth])
    # Lightness monotonic, but the region nearer the background in lightness sits inside the
    # farther one: decoding it as liver would put liver inside tumour.
    inverted = np.array([[40, 40, 40], [250, 250, 250], [120, 120, 120]], np.uint8)
    with pytest.raises(BadInputError, match="inside"):
        masks.decode_colour_mask(inverted[truth])
