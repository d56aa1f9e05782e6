"""The page travels inside the package: a wheel built from this checkout (what the
Dockerfile installs) holds the view's HTML, JS and CSS."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_the_wheel_ships_the_page(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("streamproc-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    static = ROOT / "streamproc" / "view" / "static"
    for f in static.iterdir():
        assert f"streamproc/view/static/{f.name}" in names, f.name
    assert {f.name for f in static.iterdir()} == {"index.html", "view.js", "view.css"}
