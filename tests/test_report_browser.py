"""The report and the gallery of a real run in a real headless browser: no clipped text,
every image loads, no console errors.

Playwright (the test extra) drives the Chromium that the system package manager installed,
found on PATH; browsers are never downloaded. Without either the test is skipped with the
reason."""

import shutil
from pathlib import Path

import pytest

from jobs.cli import main
from pipeline.tools.gallery import SIDE
from pipeline.tools.report import THUMB, write_report
from tests.test_report import LONG, small_output

pytestmark = pytest.mark.slow

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]

# per <svg> <text>: its box against the svg's viewport, and tick labels on one line (same y)
# that overlap their neighbour
SVG_CHECK = """() => {
  const problems = [];
  for (const svg of document.querySelectorAll('svg')) {
    const w = svg.width.baseVal.value, h = svg.height.baseVal.value;
    const rows = {};
    for (const t of svg.querySelectorAll('text')) {
      const b = t.getBBox();
      const what = JSON.stringify(t.textContent) + ' ' + [b.x, b.y, b.width, b.height];
      if (b.width === 0) problems.push('not rendered: ' + what);
      if (b.x < -0.5 || b.y < -0.5 || b.x + b.width > w + 0.5 || b.y + b.height > h + 0.5)
        problems.push('outside its ' + w + 'x' + h + ' svg: ' + what);
      (rows[t.getAttribute('y')] = rows[t.getAttribute('y')] || []).push(b);
    }
    for (const boxes of Object.values(rows)) {
      boxes.sort((a, b) => a.x - b.x);
      for (let i = 1; i < boxes.length; i++)
        if (boxes[i].x < boxes[i - 1].x + boxes[i - 1].width - 0.5)
          problems.push('overlapping labels at x=' + boxes[i].x);
    }
  }
  return problems;
}"""
# HTML elements whose text is cut (overflow other than visible, content wider than the box),
# and a page wider than the window
HTML_CHECK = """() => {
  const problems = [];
  for (const el of document.body.querySelectorAll('*')) {
    const style = getComputedStyle(el);
    if (style.overflowX !== 'visible' && el.scrollWidth > el.clientWidth + 1)
      problems.push('clipped ' + el.tagName + ': ' + el.textContent.slice(0, 60));
  }
  if (document.documentElement.scrollWidth > window.innerWidth)
    problems.push('page wider than the window: ' + document.documentElement.scrollWidth);
  return problems;
}"""
IMAGES = "() => [...document.images].map(i => [i.complete, i.naturalWidth, i.alt])"


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')"
    )
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (apt-get install chromium); browsers are not downloaded")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def demo(ray_local, tmp_path_factory):
    """The demo's run (toy model, one sample shard), its report with overlays and its
    gallery."""
    root = tmp_path_factory.mktemp("browser")
    out, shard = root / "out", str(SAMPLE / "shard-000000.tar")
    args = ["run", shard, "--vocab", str(SAMPLE / "vocab.txt"), "--out", str(out)]
    args += ["--model", "gemlabel-toy", "--image-size", "64", "--top-k", "4"]
    args += ["--score-threshold", "0.1", "--mask-mode", "background"]
    assert main(args) == 0
    report = root / "report.html"
    assert main(["report", str(out), "--html", str(report), "--source", shard]) == 0
    gallery = root / "gallery"
    assert main(["view", str(out), "--dest", str(gallery), "--per-page", "12"]) == 0
    return {"report": report, "gallery": sorted(gallery.glob("*.html"))}


def check_page(browser, path: Path) -> dict:
    """Open `path`; return its console errors, broken images and clipped text."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
    page.goto(path.as_uri(), wait_until="load")
    images = page.evaluate(IMAGES)
    result = {
        "errors": errors,
        "images": len(images),
        "broken": [i for i in images if not i[0] or i[1] == 0],
        "clipped": page.evaluate(SVG_CHECK) + page.evaluate(HTML_CHECK),
        "text": page.inner_text("body"),
    }
    page.close()
    return result


def test_report_in_a_browser(browser, demo):
    got = check_page(browser, demo["report"])
    assert got["errors"] == [] and got["broken"] == [] and got["clipped"] == []
    assert got["images"] > 0  # the overlays
    assert "weights bundled: gemlabel-toy" in got["text"]


def test_gallery_in_a_browser(browser, demo):
    assert len(demo["gallery"]) == 2  # 24 images, 12 per page
    for page in demo["gallery"]:
        got = check_page(browser, page)
        assert got["errors"] == [] and got["broken"] == [] and got["clipped"] == [], page
        assert got["images"] == 12


SIZES = """() => [...document.images].map(i => [i.naturalWidth, i.naturalHeight,
  Math.max(i.getBoundingClientRect().width, i.getBoundingClientRect().height)])"""


def test_pictures_in_a_browser(browser, demo, tmp_path):
    """Gallery pictures and report overlays are drawn large enough for the labels drawn on
    them (pipeline.tools.draw keeps every label inside its picture): the gallery's at SIDE
    pixels, the report's at THUMB, at least 240 CSS pixels on their longer side on screen.
    Screenshots of both are saved beside the test's files (their paths printed) to look at."""
    for name, path, region in [
        ("gallery", demo["gallery"][0], "body"),
        ("report", demo["report"], "#examples"),
    ]:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(path.as_uri(), wait_until="load")
        sizes = page.evaluate(SIZES)
        shot = tmp_path / f"{name}.png"
        page.locator(region).screenshot(path=str(shot))
        print(f"screenshot of the {name}: {shot}")
        page.close()
        assert sizes and {max(w, h) for w, h, _ in sizes} == {SIDE if name == "gallery" else THUMB}
        assert min(shown for *_, shown in sizes) >= 240, sizes


def test_long_labels_in_a_browser(browser, tmp_path):
    """A class name far longer than the chart's label column: shortened, not clipped, the
    full name in the label's <title>."""
    out = small_output(tmp_path / "out", {"config": {"model": "gemlabel-tiny", "seed": 0}})
    write_report(out, str(tmp_path / "report.html"))
    got = check_page(browser, tmp_path / "report.html")
    assert got["errors"] == [] and got["clipped"] == []
    page = browser.new_page()
    page.goto((tmp_path / "report.html").as_uri())
    titles = page.eval_on_selector_all(
        "#top-classes text > title", "ts => ts.map(t => t.textContent)"
    )
    page.close()
    assert LONG in titles
