"""The "abdomen" anatomy (lits.core.anatomy): labels, organs that look like liver but are not, bone,
seeding; and the "simple" anatomy left as it was."""

import hashlib

import numpy as np
import pytest
from scipy import ndimage

from lits.core import synthetic
from lits.core.anatomy import make_abdomen
from lits.core.config import SynthConfig

# sha256 of make_phantom(default_rng(1234), 64, 16)'s hu, labels and spacing bytes, computed with the
# code as it was before the abdomen anatomy was added: the simple anatomy must stay byte-identical.
SIMPLE_SHA256 = "12b3c90e516b227e44c6b0d37d754c073bf961adac5baac67cf1866870aa5ead"


@pytest.fixture(scope="module")
def phantoms():
    return [make_abdomen(np.random.default_rng([0, i]), size=64, slices=16) for i in range(6)]


def test_labels_and_layout(phantoms):
    for p in phantoms:
        assert p.hu.dtype == np.int16 and p.labels.dtype == np.uint8
        assert p.hu.shape == p.labels.shape == (16, 64, 64)
        assert set(np.unique(p.labels).tolist()) <= {0, 1, 2}
        sx, sy, sz = p.spacing
        assert sx == sy and 0.55 * 8 <= sx <= 1.0 * 8 and 0.8 <= sz <= 5.0  # 512/64 = 8x in-plane
    assert sum((p.labels == 1).any() for p in phantoms) >= 4  # the slab mostly crosses the liver
    assert any((p.labels == 2).any() for p in phantoms)


def test_tumour_only_inside_the_liver(phantoms):
    """Every tumour voxel lies in the liver (labels 1 and 2, dilated by a voxel for the tumours at its
    edge) and every tumour touches liver parenchyma."""
    checked = 0
    for p in phantoms:
        organ = ndimage.binary_fill_holes(p.labels > 0)
        assert not ((p.labels == 2) & ~ndimage.binary_dilation(organ)).any()
        components, n = ndimage.label(p.labels == 2)
        near_liver = ndimage.binary_dilation(p.labels == 1, structure=np.ones((3, 3, 3)))
        for k in range(1, n + 1):
            assert (near_liver & (components == k)).any()
            checked += 1
    assert checked >= 2


def test_liver_like_tissue_and_bone_outside_the_liver(phantoms):
    """Spleen, muscle, kidneys and bowel wall share the liver's HU and are labelled 0: the point of
    the anatomy is that HU alone cannot find the liver."""
    shares = []
    for p in phantoms:
        liver = p.labels == 1
        if liver.sum() < 200:
            continue
        lo, hi = np.percentile(p.hu[liver], [5, 95])
        body = ndimage.binary_fill_holes(p.hu > -300, structure=np.ones((1, 3, 3)))
        outside = body & (p.labels == 0)
        shares.append(np.mean((p.hu >= lo) & (p.hu <= hi) & outside) / np.mean(body))
        assert ((p.hu > 250) & outside).sum() >= 5  # vertebra and ribs
    assert len(shares) >= 3 and min(shares) > 0.03


def test_same_seed_same_phantom():
    a = make_abdomen(np.random.default_rng([3, 1]), size=64, slices=16)
    b = make_abdomen(np.random.default_rng([3, 1]), size=64, slices=16)
    c = make_abdomen(np.random.default_rng([3, 2]), size=64, slices=16)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.labels, b.labels) and a.spacing == b.spacing
    assert not np.array_equal(a.hu, c.hu)


def test_simple_anatomy_unchanged():
    p = synthetic.make_phantom(np.random.default_rng(1234), 64, 16)
    digest = hashlib.sha256(p.hu.tobytes() + p.labels.tobytes() + np.asarray(p.spacing, np.float64).tobytes())
    assert digest.hexdigest() == SIMPLE_SHA256


def test_synth_config_anatomy():
    assert SynthConfig(output="x").anatomy == "simple"
    assert SynthConfig(output="x", anatomy="abdomen").anatomy == "abdomen"
    with pytest.raises(ValueError, match="anatomy"):
        SynthConfig(output="x", anatomy="thorax")


def test_synthesize_writes_abdomen_volumes(tmp_path):
    from lits.core import volumes

    ids = synthetic.synthesize(SynthConfig(output=str(tmp_path), volumes=1, size=48, slices=8, anatomy="abdomen"))
    assert ids == ["volume-0"]
    hu, g = volumes.read_nifti(str(tmp_path / "volume-0.nii.gz"))
    rng = np.random.default_rng([0, 0])
    assert np.array_equal(g.to_canonical(hu), make_abdomen(rng, 48, 8).hu)
