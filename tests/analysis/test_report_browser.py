"""report.html in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

The page must load with no request leaving the machine (only file:// and data: URLs), every
<img> must have decoded (naturalWidth > 0), and the console must show no error. The test
saves a full-page screenshot for people to look at: into ``$RANKWISE_SCREENSHOTS`` when set,
else into pytest's temporary folder (its path is printed).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
LAYER = "model.layers.1.mlp.up_proj"

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is missing: apt-get install -y chromium"),
]


@pytest.fixture(scope="module")
def report_page(tmp_path_factory) -> Path:
    """A comparison report (tiny-llama vs a copy with a planted intruder) with gradient spectra
    and an intrinsic-dimension curve: all six plots."""
    from rankwise.analysis.report import analyze
    from rankwise.models import tiny_llama

    tuned, _ = tiny_llama()
    layer = tuned.get_submodule(LAYER)
    U, S, Vh = torch.linalg.svd(layer.weight.detach().double(), full_matrices=False)
    with torch.no_grad():
        layer.weight += (5 * S[0] * torch.outer(U[:, :16].sum(1) / 4, Vh[:16].sum(0) / 4)).float()
    out = tmp_path_factory.mktemp("browser") / "report"
    analyze("tiny-llama", out, against=tuned, texts=0, gradients=1, gradient_tokens=16, intrinsic=[2, 8], intrinsic_steps=2)
    return out / "report.html"


def _screenshot_path(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("RANKWISE_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "analysis-report.png"


def test_report_renders_offline_in_chromium(report_page, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    errors: list[str] = []
    requests: list[str] = []
    shot = _screenshot_path(tmp_path)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))

            def route(r):
                requests.append(r.request.url)
                if r.request.url.startswith(("file://", "data:")):
                    r.continue_()
                else:
                    r.abort()

            page.route("**/*", route)
            page.goto(report_page.as_uri(), wait_until="load")
            images = page.evaluate(
                "Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth}))"
            )
            title = page.title()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    print(f"screenshot: {shot}")
    assert title.startswith("rankwise analyze: tiny-llama vs")
    assert [i["alt"] for i in images] == [
        "spectra", "ranks", "tuned_spectra", "intruder dimensions", "gradient spectra", "intrinsic dimension",
    ]
    assert all(i["complete"] and i["width"] > 0 for i in images), images
    assert errors == []
    assert all(u.startswith(("file://", "data:")) for u in requests), requests
    assert shot.stat().st_size > 10_000 and shot.read_bytes().startswith(b"\x89PNG")
