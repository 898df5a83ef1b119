"""The distribution installs one import name: a wheel built from this tree holds `stride_diffusion`
(with the package data the API serves) and nothing at the top level that could collide with another
project's `service` or `solvers`."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_wheel_installs_one_namespace(tmp_path):
    tomllib = pytest.importorskip("tomllib")
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"stride_diffusion", wheel.name.split("-")[0] + "-" +
                                                 wheel.name.split("-")[1] + ".dist-info"}
    assert "stride_diffusion/service/web/index.html" in names
    assert any(n.startswith("stride_diffusion/service/static/swagger-ui/") for n in names)
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["name"] == "stride-diffusion" and meta["license"] == "Apache-2.0"  # SPDX, not a table
    assert meta["scripts"]["stride"] == "stride_diffusion.cli:main"
