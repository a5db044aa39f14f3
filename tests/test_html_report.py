"""report.html renders offline with its charts; a headless Chromium screenshot shows them."""

import re
import shutil
import subprocess
import sys

import pytest

from onnxsnpe import quantize

from .conftest import ROOT


@pytest.fixture(scope="module")
def report_page(tmp_path_factory):
    from .conftest import conv_model

    folder = tmp_path_factory.mktemp("calib")
    import numpy as np

    for i in range(4):
        np.save(folder / f"{i}.npy", np.random.default_rng(i).normal(size=(3, 8, 8)).astype(np.float32))
    model = conv_model(folder.parent / "tiny.onnx")
    result = quantize(model, folder, folder.parent / "out", progress=False)
    return result.out_dir / "report.html"


def test_page_is_self_contained_with_charts(report_page):
    page = report_page.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<svg") >= 3  # error along the graph, worst tensors, histograms
    external = [u for u in re.findall(r'(?:src|href)="([^"]+)"', page) if not u.startswith("#")]
    assert external == [], external
    assert "Where accuracy is lost" in page and "relu_out" in page


def test_page_is_deterministic(report_page, tmp_path):
    import json

    from onnxsnpe.report.html import render_report

    report = json.loads((report_page.parent / "report.json").read_text())
    assert render_report(report) == report_page.read_text()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium not installed (apt-get install chromium)")
def test_screenshot_shows_the_charts(report_page, tmp_path):
    png = tmp_path / "shot.png"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "screenshot_report.py"), str(report_page), str(png)],
                            capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr
    assert png.stat().st_size > 10_000
