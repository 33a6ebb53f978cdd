"""Issue 11 without a server: every file a job reads or writes is checked after resolving symlinks,
and a job's input listing skips what the product writes itself. (The server-side checks of the
issue, on a running app, are in test_serving.py.)"""

import json
import os
import shutil

import pytest

from lits.model import inference
from lits.serve import job_inputs, job_tasks
from lits.serve.access import check_resolved
from lits.core.errors import BadInputError
from test_inference import tiny_model


@pytest.fixture
def allowed_tree(nifti_dir, tmp_path):
    """allowed/in/{volume-0, linked -> outside/secret}.nii.gz; allowed/out/sub -> outside/."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "in").mkdir(parents=True)
    (allowed / "out").mkdir()
    outside.mkdir()
    shutil.copy(os.path.join(nifti_dir, "volume-0.nii.gz"), allowed / "in" / "volume-0.nii.gz")
    shutil.copy(os.path.join(nifti_dir, "volume-1.nii.gz"), outside / "secret.nii.gz")
    (allowed / "in" / "linked.nii.gz").symlink_to(outside / "secret.nii.gz")
    (allowed / "out" / "sub").symlink_to(outside)
    return allowed, outside


def test_symlinks_out_of_the_allowed_folder_fail_their_volume(allowed_tree, tmp_path):
    """Issue 11: a file symlink inside an allowed input folder was read, and an output sub-folder
    that is a symlink received files outside the prefix. Both now fail their volume with one line;
    nothing is read from or written to the outside; the volume that stays inside is segmented."""
    allowed, outside = allowed_tree
    spec, weights = inference.load_spec(tiny_model(tmp_path / "model"))
    predictor = inference.Predictor(spec, weights, device="cpu")
    calls = []

    def submit(images):
        calls.append(len(images))
        return inference.Done(predictor(images))

    def segment(name, rel):
        return job_tasks.segment_volume(str(allowed / "in" / name), rel, str(allowed / "out"), spec, submit,
                                        overwrite=False, chunk=8, allow=[str(allowed)])

    read_out = segment("linked.nii.gz", "linked")
    write_out = segment("volume-0.nii.gz", "sub/volume-0")
    assert read_out["status"] == write_out["status"] == "failed"
    assert read_out["reason"].startswith("refused to read ") and str(outside / "secret.nii.gz") in read_out["reason"]
    assert write_out["reason"].startswith("refused to write ") and "outside the allowed prefixes" in write_out["reason"]
    assert "\n" not in read_out["reason"] + write_out["reason"]
    assert calls == [] and sorted(os.listdir(outside)) == ["secret.nii.gz"]
    inside = segment("volume-0.nii.gz", "volume-0")
    assert inside["status"] == "done" and inside["slices"] == 24
    assert sorted(os.listdir(allowed / "out")) == ["sub", "volume-0.json", "volume-0_preview.png", "volume-0_seg.nii.gz"]
    assert sorted(os.listdir(outside)) == ["secret.nii.gz"]


def test_check_resolved_rules(allowed_tree):
    allowed, outside = allowed_tree
    check_resolved(str(allowed / "in" / "volume-0.nii.gz"), [str(allowed)], "read")
    check_resolved(str(allowed / "out" / "new" / "x.json"), [str(allowed)], "write")  # not there yet: fine
    check_resolved("s3://bucket/a/b.nii.gz", ["s3://bucket"], "read")  # no symlinks on S3
    check_resolved(str(outside / "x"), [], "write")  # no allow-list: local paths never got this far
    for uri in (allowed / "in" / "linked.nii.gz", allowed / "out" / "sub" / "x_seg.nii.gz"):
        with pytest.raises(BadInputError, match="outside the allowed prefixes"):
            check_resolved(str(uri), [str(allowed)], "write")


def test_job_inputs_skip_what_the_product_writes(nifti_dir, tmp_path):
    """Issue 11 (low): a job over a folder that holds earlier outputs lists only the volumes."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("volume-0.nii.gz", "segmentation-0.nii.gz"):
        shutil.copy(os.path.join(nifti_dir, name), folder / name)
    for name in ("volume-0_seg.nii.gz", "old_seg.nii", "volume-0_preview.png"):
        (folder / name).write_bytes(b"x")
    (folder / "volume-0.json").write_text(json.dumps({"model_id": "0" * 16}))
    listing = job_inputs.list_inputs(str(folder), str(tmp_path / "out"))
    assert listing["volumes"] == [(str(folder / "volume-0.nii.gz"), "volume-0")]
    assert sorted(os.path.basename(u) for u in listing["ignored"]) == ["old_seg.nii", "segmentation-0.nii.gz",
                                                                       "volume-0_seg.nii.gz"]
