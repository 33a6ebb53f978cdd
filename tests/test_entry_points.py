"""Every command is installed as a `lits-<name>` entry point and runs the same main() as
`python workflows/<name>.py`, with no sys.path edit (the package is installed)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["scripts"]


def test_every_workflow_script_has_an_entry_point():
    scripts = {n[:-3] for n in os.listdir(os.path.join(ROOT, "workflows")) if n.endswith(".py") and not n.startswith("_")}
    assert {f"lits-{s}" for s in scripts} == set(SCRIPTS)
    assert all(target == f"workflows.{name[len('lits-'):]}:main" for name, target in SCRIPTS.items())
    assert "sys.path" not in open(os.path.join(ROOT, "workflows", "_common.py")).read()


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_entry_point_runs_from_anywhere(name, tmp_path):
    program = os.path.join(os.path.dirname(sys.executable), name)
    proc = subprocess.run([program, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: {name} ")
