"""The distribution: one importable namespace, advtrain, whatever the repository's folders."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from cli_utils import ROOT

PACKAGES = ("advtrain", "attacks", "networks", "defenses", "datamodules", "callbacks", "evaluation")


def test_the_wheel_holds_the_advtrain_namespace_alone(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in PACKAGES:  # a copy: building in the checkout would leave its build/ folder behind
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert wheel.name.startswith("advtrain_lightning-")
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted({n.split("/")[0] for n in names}) == ["advtrain", wheel.name.split("-py3")[0] + ".dist-info"]
    for package in PACKAGES[1:]:
        assert f"advtrain/{package}/__init__.py" in names
    assert "advtrain/datamodules/imagenet100_classes.txt" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "advtrain = advtrain.console:main" in entry_points
