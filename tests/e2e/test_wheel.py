"""The package works from a built wheel in a fresh virtual environment, run from another directory."""

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import REPO


@pytest.mark.slow
def test_wheel_install_lists_recipes_and_trains(tmp_path):
    dist = tmp_path / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(REPO)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    wheel = next(dist.glob("lit_open-*.whl"))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # The dependencies come from the test's own environment (a .pth line adds its site-packages after the new
    # venv's); lit_open itself only from the wheel, since the editable install's finder is not loaded that way.
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "outer-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)

    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    lit_open = venv / "bin" / "lit-open"
    where = subprocess.run(
        [str(python), "-c", "import lit_open, lit_open.conf; print(lit_open.__file__)"],
        capture_output=True,
        text=True,
        cwd=workdir,
        check=True,
    ).stdout
    assert str(venv) in where and str(REPO) not in where

    recipes = subprocess.run([str(lit_open), "list", "recipes"], capture_output=True, text=True, cwd=workdir)
    assert recipes.returncode == 0 and "quickstart" in recipes.stdout and "olmo2_1b" in recipes.stdout
    run = subprocess.run(
        [str(lit_open), "train", "trainer.max_steps=3", "trainer.val_check_interval=0"],
        capture_output=True,
        text=True,
        cwd=workdir,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Done: 3 steps" in run.stderr
    assert (workdir / "runs" / "quickstart" / "checkpoints" / "step-00000003.ckpt").exists()
