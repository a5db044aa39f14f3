"""Open a report.html in headless Chromium, save a screenshot, and check the charts were drawn.

    python tools/screenshot_report.py onnxsnpe_demo/report.html tools/report_screenshot.png

Needs Chromium (Debian: apt-get install chromium). Exits 1 if the page rendered blank or without
the charts' colours (the crimson range lines and bars, the blue histogram bars).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

CHART_COLOURS = {"crimson": (220, 20, 60), "steelblue": (70, 130, 180)}


def screenshot(page: Path, png: Path, width: int = 1200, height: int = 2400) -> None:
    """Render ``page`` with headless Chromium into ``png``."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        sys.exit("screenshot_report: no Chromium found (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--window-size={width},{height}", f"--screenshot={png}",
             page.resolve().as_uri()],
            check=True, capture_output=True, timeout=120,
        )


def chart_pixels(png: Path) -> dict[str, int]:
    """How many pixels of each chart colour the screenshot holds (within a small tolerance)."""
    image = Image.open(png).convert("RGB")
    counts = dict.fromkeys(CHART_COLOURS, 0)
    for count, (r, g, b) in image.getcolors(maxcolors=1 << 24):
        for name, (cr, cg, cb) in CHART_COLOURS.items():
            if abs(r - cr) + abs(g - cg) + abs(b - cb) < 30:
                counts[name] += count
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("page", type=Path)
    parser.add_argument("png", type=Path)
    args = parser.parse_args()
    screenshot(args.page, args.png)
    counts = chart_pixels(args.png)
    print(f"{args.png}: chart pixels {counts}")
    if min(counts.values()) < 500:
        print("screenshot_report: the charts are missing from the rendered page", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
