import numpy as np
import pytest

from lits.core import ct
from lits.core.schema import WINDOW_CUSTOM, WINDOW_LIVER


def fastai_freqhist_bins(x: np.ndarray, n_bins: int = 100) -> np.ndarray:
    """fastai's freqhist_bins, transcribed with a full sort (the reference)."""
    imsd = np.sort(x.reshape(-1))
    t = np.concatenate([[0.001], np.arange(n_bins) / n_bins + 1 / 2 / n_bins, [0.999]])
    return np.unique(imsd[(len(imsd) * t).astype(np.int64)])


def test_window_matches_fastai_by_hand():
    # W150/L30: [-45, 105] -> [0, 255], truncated.
    hu = np.array([-1000, -45, 30, 104, 105, 3000], dtype=np.int16)
    assert ct.window(hu, 150, 30).tolist() == [0, 0, 127, 253, 255, 255]
    # W200/L60: [-40, 160]; 60 -> 127.5 -> 127; 0 -> 40 * 1.275 = 51.
    assert ct.window(np.array([60.0, 0.0]), *WINDOW_CUSTOM).tolist() == [127, 51]
    assert ct.window(hu, *WINDOW_LIVER).dtype == np.uint8


def test_window_does_not_modify_input():
    hu = np.array([[-500, 50]], dtype=np.int16)
    before = hu.copy()
    ct.window(hu, 150, 30)
    assert np.array_equal(hu, before)


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_freqhist_breaks_equal_sort_reference(rng, dtype):
    hu = rng.normal(40, 300, size=(7, 33, 29)).clip(-1024, 3000)
    hu = np.floor(hu).astype(dtype)
    assert np.array_equal(ct.freqhist_breaks(hu), fastai_freqhist_bins(hu).astype(np.float32))


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_freqhist_breaks_ignore_voxel_order_and_layout(rng, dtype):
    hu = np.floor(rng.normal(40, 300, size=(9, 31, 27)).clip(-1024, 3000)).astype(dtype)
    reference = fastai_freqhist_bins(hu).astype(np.float32)
    file_order = np.asfortranarray(hu)
    views = [file_order, file_order[::-1, :, ::-1].transpose(2, 1, 0), hu[:, ::-1].swapaxes(0, 1)]
    for view in views:  # contiguous blocks seen through flips and transposes: read in place
        assert np.array_equal(ct.freqhist_breaks(view), reference)
    strided = hu[::2, :, 1::3]  # not one block: read a few rows at a time
    assert np.array_equal(ct.freqhist_breaks(strided), fastai_freqhist_bins(strided).astype(np.float32))


def test_int16_counts_stay_exact_beyond_float32_integers():
    # cv2.calcHist counts in float32, exact only up to 2^24: pieces keep each count below it.
    hu = np.zeros((1 << 24) + 6, np.int16)
    hu[:5] = [-1024, 7, 7, 3000, -1]
    counts = ct._int16_counts(hu)
    expected = np.bincount(hu.view(np.uint16) ^ np.uint16(0x8000), minlength=1 << 16)
    assert counts[0x8000] == (1 << 24) + 1 and np.array_equal(counts, expected)


def test_model_inputs_of_scattered_slices_equal_those_of_a_contiguous_copy(rng):
    # a file stored S-P-L: canonical slices are scattered, model_inputs gathers them in blocks
    file_order = np.asfortranarray(rng.integers(-1024, 1500, size=(70, 40, 36)).astype(np.int16))
    canonical = file_order[::-1]
    assert abs(canonical.strides[2]) != canonical.itemsize
    breaks = ct.freqhist_breaks(canonical)
    zs = [69, 0, 3] + list(range(4, 70, 2))  # more than one block of GATHER_SLICES, any order
    assert len(zs) > ct.GATHER_SLICES
    expected = ct.model_inputs(np.ascontiguousarray(canonical), zs, breaks, 0, 24)
    assert np.array_equal(ct.model_inputs(canonical, zs, breaks, 0, 24), expected)
    contiguous = ct.model_inputs(np.ascontiguousarray(canonical), range(3, 6), breaks, 0, 24)
    assert np.array_equal(ct.model_inputs(canonical, range(3, 6), breaks, 0, 24), contiguous)  # a range, as inference passes


def test_freqhist_breaks_small_hand_case():
    hu = np.arange(1000).reshape(10, 10, 10) - 500
    # ranks 1, 50, 150, ..., 950, 999 -> values rank - 500
    assert ct.freqhist_breaks(hu, 10).tolist() == [-499, -450, -350, -250, -150, -50, 50, 150, 250, 350, 450, 499]


def test_hist_scaled_maps_breaks_to_uniform_levels():
    breaks = np.array([0.0, 10.0, 100.0], dtype=np.float32)
    out = ct.hist_scaled(np.array([-5.0, 0.0, 5.0, 10.0, 55.0, 100.0, 500.0]), breaks)
    assert out.tolist() == [0, 0, 63, 127, 191, 255, 255]
    assert ct.hist_scaled(np.array([3.0, 4.0]), np.array([3.0], np.float32)).tolist() == [0, 0]


def test_slice_image_channels(rng):
    hu = rng.integers(-1000, 1000, size=(4, 16, 12)).astype(np.int16)
    breaks = ct.freqhist_breaks(hu)
    image = ct.slice_image(hu, 2, breaks, context=0)
    assert image.shape == (16, 12, 3) and image.dtype == np.uint8 and image.flags.c_contiguous
    assert np.array_equal(image[..., 0], ct.window(hu[2], *WINDOW_LIVER))
    assert np.array_equal(image[..., 1], ct.window(hu[2], *WINDOW_CUSTOM))
    assert np.array_equal(image[..., 2], ct.hist_scaled(hu[2], breaks))


def test_slice_image_context_stacks_neighbours_and_repeats_edges(rng):
    hu = rng.integers(-200, 300, size=(3, 8, 8)).astype(np.int16)
    liver = [ct.window(hu[z], *WINDOW_LIVER) for z in range(3)]
    mid = ct.slice_image(hu, 1, np.zeros(1, np.float32), context=1)
    assert all(np.array_equal(mid[..., c], liver[c]) for c in range(3))
    first = ct.slice_image(hu, 0, np.zeros(1, np.float32), context=1)
    assert np.array_equal(first[..., 0], liver[0]) and np.array_equal(first[..., 2], liver[1])
    last = ct.stack_context(np.stack(liver), 2)
    assert np.array_equal(last[..., 2], liver[2]) and np.array_equal(last[..., 0], liver[1])


def test_resize_area_for_images_nearest_for_masks():
    image = np.zeros((4, 4, 3), np.uint8)
    image[:2, :2] = 200
    small = ct.resize_image(image, 2)
    assert small.shape == (2, 2, 3) and small[0, 0, 0] == 200 and small[1, 1, 0] == 0
    mask = np.zeros((64, 64), np.uint8)
    mask[10:40, 10:40] = 1
    mask[20:30, 20:30] = 2
    resized = ct.resize_mask(mask, 32)
    assert set(np.unique(resized).tolist()) == {0, 1, 2}  # no interpolated labels
    # a non-contiguous (flipped) view resizes like its copy
    flipped = mask[::-1]
    assert np.array_equal(ct.resize_mask(flipped, 32), ct.resize_mask(flipped.copy(), 32))
