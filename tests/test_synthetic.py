import glob
import os

import cv2
import numpy as np
import pytest

from lits.core import masks, synthetic, volumes
from lits.core.config import SynthConfig
from tests.conftest import synthesize


def test_phantom_is_seeded_and_lits_like():
    a = synthetic.make_phantom(np.random.default_rng([0, 3]), size=128, slices=40)
    b = synthetic.make_phantom(np.random.default_rng([0, 3]), size=128, slices=40)
    c = synthetic.make_phantom(np.random.default_rng([1, 3]), size=128, slices=40)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.hu, c.hu)
    hu, labels = a.hu.astype(float), a.labels
    assert a.hu.dtype == np.int16 and labels.dtype == np.uint8
    assert abs(np.median(hu[:, :3, :3]) + 1000) < 30  # air in the corners
    assert 60 <= np.median(hu[labels == 1]) <= 120  # enhanced liver
    tumour = hu[labels == 2]
    assert tumour.size and abs(np.median(tumour) - np.median(hu[labels == 1])) >= 20  # hypo- or hyper-dense
    assert hu.max() > 300  # bone
    categories = masks.categorise(labels)
    assert {0, 1, 2} <= set(categories.tolist())  # empty, liver-only and tumour slices all occur
    assert set(np.unique(labels).tolist()) == {0, 1, 2}
    sx, sy, sz = a.spacing
    assert sx == sy and 0.6 * 4 <= sx <= 0.9 * 4 and 0.7 <= sz <= 5.0  # 512/128 = 4x in-plane


def test_synthesize_writes_flipped_affines_and_is_reproducible(tmp_path):
    synthesize(tmp_path / "a", volumes=6, size=48, slices=16)
    synthesize(tmp_path / "b", volumes=6, size=48, slices=16)
    files = sorted(os.listdir(tmp_path / "a"))
    assert files == sorted([f"volume-{i}.nii.gz" for i in range(6)] + [f"segmentation-{i}.nii.gz" for i in range(6)])
    codes = set()
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        arr, g = volumes.read_nifti(str(tmp_path / "a" / name))
        codes.add(g.axcodes)
        assert not np.allclose(g.affine_array, np.eye(4))
    assert len(codes) >= 2  # several orientations among six volumes
    assert any(c != "RAS" for c in codes)


def test_synthetic_file_round_trips_to_the_phantom(tmp_path):
    rng = np.random.default_rng([0, 2])
    phantom = synthetic.make_phantom(rng, 48, 16)
    affine, shape = synthetic.phantom_affine(rng, phantom)
    synthetic.write_nifti_pair(str(tmp_path), 2, phantom, affine, shape)
    hu, g = volumes.read_nifti(str(tmp_path / "volume-2.nii.gz"))
    assert np.array_equal(g.to_canonical(hu), phantom.hu)
    assert np.allclose(g.canonical_spacing, phantom.spacing, rtol=1e-6)


@pytest.mark.parametrize("colormap", ["Blues", "viridis"])
def test_image_format_masks_decode_back(tmp_path, colormap):
    synthesize(tmp_path, volumes=1, size=96, slices=12, fmt="images", colormap=colormap, first_id=5)
    images = sorted(glob.glob(str(tmp_path / "images" / "volume-5" / "volume-5_slice_*.jpg")))
    mask_files = sorted(glob.glob(str(tmp_path / "masks" / "volume-5" / "volume-5_slice_*_mask.jpg")))
    assert len(images) == len(mask_files) == 12
    rng = np.random.default_rng([0, 5])
    phantom = synthetic.make_phantom(rng, 96, 12)
    affine, shape = synthetic.phantom_affine(rng, phantom)
    g = volumes.Geometry.from_affine(affine, shape)
    agree = []
    for z in range(12):
        m = int(g.file_slice_index(z))
        bgr = cv2.imread(str(tmp_path / "masks" / "volume-5" / f"volume-5_slice_{m}_mask.jpg"))
        decoded = masks.decode_colour_mask(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        agree.append(np.mean(decoded == phantom.labels[z]))
    assert min(agree) > 0.999


def test_synth_config_rejects_bad_values():
    with pytest.raises(ValueError, match="volumes"):
        SynthConfig(output="x", volumes=0)
    with pytest.raises(ValueError, match="colormap"):
        SynthConfig(output="x", colormap="jet")
