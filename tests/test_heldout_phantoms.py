"""benchmarks/heldout_phantoms.py, the held-out phantom generator: its CLI writes LiTS-format pairs (int16 HU,
uint8 labels, one affine), tumours lie in the liver, and the seed alone decides the arrays. No Ray."""

from __future__ import annotations

import importlib.util
import os
import sys

import nibabel as nib
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def heldout():
    spec = importlib.util.spec_from_file_location("heldout_phantoms",
                                                  os.path.join(ROOT, "benchmarks", "heldout_phantoms.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def generate(heldout, folder, seed, volumes=2):
    """The CLI's main over a small run; returns [(hu, labels, volume image, segmentation image)] by id."""
    assert heldout.main(["--output", str(folder), "--volumes", str(volumes), "--size", "64", "--slices", "16",
                         "--seed", str(seed), "--first-id", "3"]) == 0
    pairs = []
    for number in range(3, 3 + volumes):
        volume = nib.load(os.path.join(folder, f"volume-{number}.nii.gz"))
        segmentation = nib.load(os.path.join(folder, f"segmentation-{number}.nii.gz"))
        pairs.append((np.asarray(volume.dataobj), np.asarray(segmentation.dataobj), volume, segmentation))
    return pairs


def test_pairs_are_lits_shaped_with_tumour_inside_liver(heldout, tmp_path):
    pairs = generate(heldout, tmp_path, seed=11)
    assert sorted(os.listdir(tmp_path)) == ["segmentation-3.nii.gz", "segmentation-4.nii.gz",
                                            "volume-3.nii.gz", "volume-4.nii.gz"]
    for hu, labels, volume, segmentation in pairs:
        assert hu.shape == labels.shape == (64, 64, 16)
        assert hu.dtype == np.int16 and labels.dtype == np.uint8
        assert volume.get_data_dtype() == np.int16 and segmentation.get_data_dtype() == np.uint8
        np.testing.assert_allclose(volume.affine, segmentation.affine)
        assert volume.affine[0, 0] < 0 and volume.affine[1, 1] < 0 and volume.affine[2, 2] > 0
        assert set(np.unique(labels)) <= {0, 1, 2}
        liver_slices = np.flatnonzero((labels > 0).any(axis=(0, 1)))
        assert 0 < liver_slices.size < 16, "the liver spans part of the stack"
        for k in np.flatnonzero((labels == 2).any(axis=(0, 1))):
            assert (labels[:, :, k] == 1).any(), f"slice {k} has tumour but no liver"
        assert hu.min() >= -1024 and hu.max() > 100  # air outside, bone or contrast inside
        assert -200 < np.median(hu[labels == 1]) < 200
    assert any((labels == 2).any() for _, labels, *_ in pairs), "seed 11 draws tumours: the check above ran"


def test_same_seed_same_arrays_other_seed_other_arrays(heldout, tmp_path):
    first = generate(heldout, tmp_path / "a", seed=5)
    again = generate(heldout, tmp_path / "b", seed=5)
    other = generate(heldout, tmp_path / "c", seed=6)
    for (hu, labels, *_), (hu2, labels2, *_), (hu3, labels3, *_) in zip(first, again, other):
        np.testing.assert_array_equal(hu, hu2)
        np.testing.assert_array_equal(labels, labels2)
        assert not np.array_equal(hu, hu3) and not np.array_equal(labels, labels3)


def test_bad_arguments_are_one_line_errors(heldout, tmp_path, capsys):
    with pytest.raises(SystemExit):
        heldout.main(["--output", str(tmp_path), "--size", "8"])
    assert "--size 8" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
