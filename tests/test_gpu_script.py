"""benchmarks/gpu_all.py --smoke: the GPU script's paths (train_one_epoch over PatchBatches with
augmentation, the gradient all-reduce over two processes, the Predictor's sweep) run at toy sizes on
the CPU, so the script a lent card runs once is known to work before it gets there."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _row(out: str, header: str) -> list:
    """The cells of the first data row of the table whose header row starts with `header`."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    return [c.strip() for c in lines[start + 2].strip("|").split("|")]


def test_the_gpu_script_runs_the_production_paths_on_the_cpu_in_smoke_mode():
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_all.py"), "--smoke"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "CPU (--smoke: toy sizes, not a GPU number)" in out  # never passed off as a card's number
    assert re.search(r"bf16 matmul peak measured [0-9.e+-]+ TFLOP/s", out)
    train = _row(out, "| training | img/s | model-FLOP utilisation | step ms | data ms | compute ms | all-reduce ms |")
    assert train[0] == "train_one_epoch, 8 steps"
    images_per_s, mfu = float(train[1]), float(train[2].rstrip("%"))
    step, data, allreduce = float(train[3]), float(train[4]), float(train[6])
    assert images_per_s > 0 and mfu > 0 and step > 0 and data > 0 and allreduce > 0
    assert "over 2 process(es)" in out
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| serving batch | volumes/s | slices/s |"))
    serve = [[c.strip() for c in line.strip("|").split("|")] for line in lines[head + 2:head + 4]]
    assert [row[0] for row in serve] == ["2", "4"] and all(float(row[1]) > 0 and float(row[2]) > 0 for row in serve)
    assert "s per 64x64x6 volume" in lines[head]
