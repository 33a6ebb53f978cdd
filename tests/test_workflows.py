"""Command-line behaviour that needs no Ray: flags, bad input and output, synthesize."""

import json
import os

import pytest

from tests.conftest import run_workflow


def one_line_error(res, program="prepare"):
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = [l for l in res.stderr.splitlines() if l.startswith(f"{program}: error:")]
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--keep-liver", "1.5"], "keep_liver must be between 0 and 1, got 1.5"),
        (["--image-size", "8"], "image_size must be between 16 and 2048"),
        (["--val-fraction", "0.5", "--test-fraction", "0.5"], "must leave volumes for training"),
    ],
)
def test_bad_flag_values_are_one_line(nifti_dir, tmp_path, flags, expected):
    res = run_workflow("prepare", "--input", nifti_dir, "--output", str(tmp_path / "o"), *flags)
    assert expected in one_line_error(res)
    assert not os.path.exists(tmp_path / "o")


def test_unknown_flag_and_bad_choice_are_rejected_by_argparse(nifti_dir, tmp_path):
    res = run_workflow("prepare", "--input", nifti_dir, "--output", str(tmp_path), "--no-such-flag")
    assert res.returncode == 2 and "unrecognized arguments: --no-such-flag" in res.stderr
    res = run_workflow("prepare", "--input", nifti_dir, "--output", str(tmp_path), "--format", "dicom")
    assert res.returncode == 2 and "invalid choice: 'dicom'" in res.stderr


def test_missing_input_names_it(tmp_path):
    res = run_workflow("prepare", "--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o"))
    line = one_line_error(res)
    assert str(tmp_path / "nowhere") in line and "does not exist" in line


def test_input_without_data_says_what_it_looked_for(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("hello")
    res = run_workflow("prepare", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"))
    line = one_line_error(res)
    assert "volume-N.nii[.gz]" in line and "1 files looked at" in line


def test_unwritable_output_is_reported_before_ray_starts(nifti_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = run_workflow("prepare", "--input", nifti_dir, "--output", str(blocker / "out"))
    line = one_line_error(res)
    assert "cannot write" in line and str(blocker) in line
    assert "starting a local Ray" not in res.stderr


def test_synthesize_cli(tmp_path):
    res = run_workflow("synthesize", "--output", str(tmp_path), "--volumes", "2", "--size", "32", "--slices", "8", "--no-compress")
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(tmp_path)) == ["segmentation-0.nii", "segmentation-1.nii", "volume-0.nii", "volume-1.nii"]
    res = run_workflow("synthesize", "--output", str(tmp_path), "--volumes", "0")
    assert "volumes must be >= 1" in one_line_error(res, "synthesize")


def test_progress_lines_keep_failures_and_a_beat():
    """A loop's progress lines (prepare's volumes, evaluate's cases, synthesize's volumes): every
    failure and one every few seconds at INFO; the rest at DEBUG, for --verbose."""
    import logging

    from workflows._common import Beat

    beat = Beat(every_s=3600)
    assert [beat.level() for _ in range(5)] == [logging.DEBUG] * 5
    assert beat.level(failed=True) == logging.INFO
    beat = Beat(every_s=0)
    assert {beat.level() for _ in range(5)} == {logging.INFO}


def test_ray_train_report_logger_is_the_one_quieted():
    """Ray Train logs "Reporting training result ..." (a metrics dict per worker per epoch) under a
    logger named by its file path, out of its LoggingConfig's reach; worker_logs quiets that name.
    If Ray names it by module one day, LoggingConfig covers it and this test says so."""
    from ray.train.v2._internal.execution import context

    from lits.runtime import worker_logs

    assert context.logger.name == worker_logs.train_reports_logger()


@pytest.mark.slow
def test_demo_runs_the_whole_product(tmp_path):
    """make demo's script end to end (3 epochs): every stage, the server over HTTP, the summary;
    masks good enough that a model sent the wrong images fails; a console a newcomer can read."""
    proc = run_workflow("demo", "--output", str(tmp_path / "demo"), "--epochs", "3", timeout=900)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "volumes segmented: 5 of 5 (0 failed)" in proc.stdout  # 4 phantoms and the real DICOM series
    summary = json.loads((tmp_path / "demo" / "evaluation" / "summary.json").read_text())
    real = json.loads((tmp_path / "demo" / "evaluation" / "real-series.json").read_text())
    assert 0.0 <= real["liver_dice"] <= 1.0 and real["ref_liver_ml"] > 500, real  # agreement, not accuracy
    assert "the real CT series (DICOM in, DICOM-SEG out): liver agreement" in proc.stdout
    assert (tmp_path / "demo" / "segmentations" / "real-ct-dicom_seg.dcm").stat().st_size > 1000
    assert summary["cases_evaluated"] == 4
    # Whole unseen volumes through the server, scored at their own resolution: three epochs gave liver
    # Dice per case 0.946; a model sent the wrong images (a chunk's slices written to the wrong rows of
    # its batch in lits.model.streaming) 0.0. One epoch was too noisy to hold a floor (0.25-0.65).
    assert summary["aggregate"]["liver"]["dice_per_case"] > 0.5, summary["aggregate"]["liver"]
    for rel in ("prepared/preview.png", "run/curves.png", "segmentations/volume-100_preview.png",
                "segmentations/real-ct-dicom_preview.png", "evaluation/overlays.png", "evaluation/dice_boxplot.png"):
        assert (tmp_path / "demo" / rel).stat().st_size > 1000, rel
    # Our own lines (stage, progress, a line per epoch, summary tables) and Ray's warnings; Ray's
    # chatter, ~240 lines of this demo before, needs --verbose (lits.runtime.worker_logs)
    assert len(console.splitlines()) < 120, console
    assert "INFO epoch 3/3: loss " in console
    for chatter in ("State API may be temporarily unavailable", "Execution plan of Dataset", "Reporting training result",
                    "Progress bars disabled", "Started a local Ray instance", "Token authentication is enabled",
                    "Deploying new version of Deployment", "Got updated endpoints", "Started Serve in namespace",
                    "Grad strides do not match", "Found multiple active Ray instances"):
        assert chatter not in console, chatter


def test_num_gpus_is_a_flag_of_its_own_and_no_flag_is_abbreviated():
    """Issue 20: serve.py had no --num-gpus, so argparse took it for --num-gpus-per-replica (and
    `--num-gpus 2` failed its choices): an abbreviation must never mean another flag. Now it means
    N replicas of one GPU each, with a GPU's batch, in serve.py and segment.py alike."""
    from lits.core.config import ServeConfig
    from lits.core.errors import UserError
    from workflows import prepare, segment, serve, train
    from workflows._common import GPU_MAX_BATCH, apply_model_args

    d = ServeConfig(model="-")
    for args in (serve.parse_args(["--num-gpus", "2"]), segment.parse_args(["--input", "a", "--output", "b", "--num-gpus", "2"])):
        apply_model_args(args, d)
        assert (args.replicas, args.num_gpus_per_replica, args.max_batch_size) == (2, 1, GPU_MAX_BATCH)
    cpu = serve.parse_args([])
    apply_model_args(cpu, d)
    assert (cpu.replicas, cpu.num_gpus_per_replica, cpu.max_batch_size) == (None, 0, d.max_batch_size)
    for bad, match in ((["--num-gpus", "0"], "at least 1"), (["--num-gpus", "2", "--replicas", "3"], "leave out --replicas")):
        with pytest.raises(UserError, match=match):
            apply_model_args(serve.parse_args(bad), d)
    for parse, argv in ((serve.parse_args, ["--num-gpu", "1"]), (serve.parse_args, ["--max-rep", "3"]),
                        (train.parse_args, ["--data", "d", "--output", "o", "--epoch", "3"]),
                        (prepare.parse_args, ["--input", "i", "--output", "o", "--image", "64"])):
        with pytest.raises(SystemExit):
            parse(argv)


@pytest.mark.parametrize("flags, expected", [(["--intensity-aug", "1.5"], "intensity_aug must be between 0 and 1, got 1.5"),
                                             (["--scale-aug", "0.9"], "scale_aug must be in [0, 0.5], got 0.9")])
def test_bad_augmentation_flags_are_one_line_before_ray(tmp_path, flags, expected):
    res = run_workflow("train", "--data", str(tmp_path / "none"), "--output", str(tmp_path / "o"), *flags)
    assert expected in one_line_error(res, "train")
