"""benchmarks/lesion_misses.py's per-lesion figures, by hand: voxels, contrast against the liver around
the lesion, the liver's HU spread and the share of the lesion labelled tumour. No Ray."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def misses():
    spec = importlib.util.spec_from_file_location("lesion_misses", os.path.join(ROOT, "benchmarks", "lesion_misses.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_lesion_is_measured_by_hand(misses):
    ref = np.zeros((6, 20, 20), np.uint8)
    ref[:, 2:18, 2:18] = 1
    ref[2:4, 4:7, 4:7] = 2  # lesion A: 18 voxels
    ref[3, 13:15, 13:15] = 2  # lesion B: 4 voxels
    hu = np.where(ref == 2, 60, 100).astype(np.int16)
    hu[ref == 0] = -100
    hu[3, 14, 14] = 120  # B: mean (3 * 60 + 120) / 4 = 75
    hu[3, 16, 16] = 0  # liver 4 steps from B, inside its box: outside its 2-voxel ring, so its contrast is unchanged
    labels = ref.copy()
    labels[2, 4:7, 4:7] = 1  # half of A missed
    found = {voxels: rest for voxels, *rest in misses.lesions(hu, ref, labels)}
    assert sorted(found) == [4, 18]
    contrast_a, noise, hit_a, z_a = found[18]
    assert contrast_a == pytest.approx(60 - 100) and hit_a == pytest.approx(0.5)
    assert z_a == 2  # slices 2 and 3 hold 9 voxels each: the first
    contrast_b, noise_b, hit_b, z_b = found[4]
    assert contrast_b == pytest.approx(75 - 100) and hit_b == pytest.approx(1.0) and z_b == 3
    liver = hu[ref == 1]
    assert noise == noise_b == pytest.approx(float(liver.std())) and noise > 0
