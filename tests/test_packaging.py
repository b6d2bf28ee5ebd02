"""What a framework that depends on moe_ep gets: a licence, one version, type information, and the
tuned tables inside the wheel."""

import email.parser
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile

import moe_ep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_version_has_one_source():
    project = _pyproject()
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "moe_ep._version.__version__"}
    assert moe_ep.__version__ == moe_ep._version.__version__
    assert all(part.isdigit() for part in moe_ep.__version__.split("."))


def test_wheel_holds_license_types_and_tuned_tables(tmp_path):
    # A copy of the sources (setuptools leaves build/ and *.egg-info beside what it builds), built
    # by the installed setuptools (no download): pyproject asks for >= 77 (SPDX licences).
    source = tmp_path / "source"
    shutil.copytree(os.path.join(ROOT, "moe_ep"), source / "moe_ep", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("moe_ep-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        dist_info = f"moe_ep-{moe_ep.__version__}.dist-info"
        metadata = email.parser.Parser().parsestr(zf.read(f"{dist_info}/METADATA").decode())
        license_text = zf.read(f"{dist_info}/licenses/LICENSE").decode()
    assert metadata["Version"] == moe_ep.__version__
    assert metadata["License-Expression"] == "Apache-2.0"
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    with open(os.path.join(ROOT, "LICENSE")) as f:
        assert license_text == f.read()
    assert "moe_ep/py.typed" in names
    shipped = sorted(f for f in os.listdir(os.path.join(ROOT, "moe_ep", "tuned")) if f.endswith(".json"))
    assert shipped and all(f"moe_ep/tuned/{f}" in names for f in shipped)
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
