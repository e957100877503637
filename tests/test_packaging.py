"""The wheel installs the three namespaces from itself, not from the source tree."""

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_the_three_namespaces(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(ROOT)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("guardspace_pl-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True)
    # Dependencies come from this environment's site-packages; guardspace_pl itself must come from the wheel.
    code = (
        "import guardspace_pl, guardspace_pl.callbacks as c, guardspace_pl.datamodules as d,"
        " guardspace_pl.evaluation as e;"
        "print(guardspace_pl.__file__); print(c.__file__); print(d.__file__);"
        "print(c.SafetySubspaceInit.__name__, c.NullSpaceProjection.__name__, d.GuardSpaceDataModule.__name__)"
    )
    out = subprocess.run(
        [str(python), "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path,
        env={"PYTHONPATH": sysconfig.get_paths()["purelib"], "PATH": "/usr/bin:/bin"},
    ).stdout.splitlines()
    site = str(env_dir)
    assert all(line.startswith(site) for line in out[:3]), out
    assert out[1].endswith("guardspace_pl/callbacks/__init__.py")
    assert out[3] == "SafetySubspaceInit NullSpaceProjection GuardSpaceDataModule"
    # No top-level `callbacks` or `datamodules` package leaks into users' environments.
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert not any(n.startswith(("callbacks/", "datamodules/")) for n in names)
    assert any(n.startswith("guardspace_pl/evaluation/tasks/") and n.endswith(".yaml") for n in names)
    assert "guardspace_pl/data/demo_prompts.json" in names  # the demo's offline prompt fixture
