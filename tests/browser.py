"""Open an HTML file in headless Chromium (Debian's ``chromium`` through playwright) and report
what a reader would see: console errors, requests, images, SVG sizes and a screenshot."""

from __future__ import annotations

import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


def chromium() -> str:
    for name in (os.environ.get("UVSAM_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise AssertionError("no Chromium found: install it (Debian: apt-get install chromium) or set UVSAM_CHROMIUM; "
                         "the README's test command does this")


@dataclass
class Rendered:
    errors: list[str]  # console errors and page errors
    requests: list[str]  # every URL the page asked for
    images: list[tuple[bool, int]]  # (complete, natural width) of every <img>
    svg_widths: list[float]  # rendered width of every <svg>
    screenshot: np.ndarray  # full page, grey levels
    svg_texts: list[list[tuple[str, list[list[float]]]]]  # per <svg>: each <text>'s string and its on-screen corners
    headings: list[str]  # the <h2> texts, in page order

    @property
    def network(self) -> list[str]:
        return [u for u in self.requests if not u.startswith(("file:", "data:"))]


def render(path: Path) -> Rendered:
    from playwright.sync_api import sync_playwright

    errors, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(Path(path).resolve().as_uri())
        page.wait_for_load_state("load")
        images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
        svgs = page.eval_on_selector_all("svg", "els => els.map(e => e.getBoundingClientRect().width)")
        # every text's box as drawn: its own box through its screen transform (rotation included)
        texts = page.eval_on_selector_all("svg", """svgs => svgs.map(s => Array.from(s.querySelectorAll('text'))
            .map(t => { const b = t.getBBox(), m = t.getScreenCTM(), pt = s.createSVGPoint();
                        const corners = [[b.x, b.y], [b.x + b.width, b.y], [b.x + b.width, b.y + b.height],
                                         [b.x, b.y + b.height]].map(([x, y]) => { pt.x = x; pt.y = y;
                                         const q = pt.matrixTransform(m); return [q.x, q.y]; });
                        return [t.textContent, corners]; }))""")
        headings = page.eval_on_selector_all("h2", "els => els.map(e => e.textContent)")
        shot = page.screenshot(full_page=True)
        browser.close()
    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("L"))
    return Rendered(errors, requests, [tuple(i) for i in images], svgs, pixels, texts, headings)
