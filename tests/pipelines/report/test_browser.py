"""The run report of a small pipeline run and its evaluate stage's report, opened in headless
Chromium (Debian's `chromium`, installed by `.ci/run`): every image loads, nothing is fetched
off the machine, the tables and plots are there. The screenshots are kept under
`test-artifacts/` (or `$WEAKCLIP_TEST_ARTIFACTS`).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pipelines.io.storage import resolve
from pipelines.report.run import write_stage_report
from tests.conftest import DemoChain

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(
    os.environ.get("WEAKCLIP_TEST_ARTIFACTS", Path(__file__).parents[3] / "test-artifacts")
)

# Appended to a copy of the page: once everything has loaded, writes what the browser saw
# into the DOM, which --dump-dom prints.
PROBE = """
<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images).map(i => ({
    src: i.getAttribute("src"), ok: i.complete && i.naturalWidth > 0}));
  const fetched = performance.getEntriesByType("resource").map(r => r.name);
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({
    images, fetched, location: String(window.location),
    tables: document.querySelectorAll("table").length,
    perClassRows: document.querySelectorAll("table.per-class tr").length,
    headings: Array.from(document.querySelectorAll("h2")).map(h => h.textContent)});
  document.body.appendChild(out);
});
</script>
"""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None, reason="chromium is not installed (.ci/run installs Debian's chromium)"
    ),
]


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--host-resolver-rules=MAP * ~NOTFOUND", *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def _open(index: Path) -> dict:
    """What Chromium saw of the page `index` once everything loaded (`PROBE`)."""
    page = index.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "a link off the machine"
    probe_page = index.parent / "_probe.html"
    probe_page.write_text(page.replace("</body>", PROBE + "</body>"))
    try:
        done = _chromium("--virtual-time-budget=20000", "--dump-dom", probe_page.as_uri())
    finally:
        probe_page.unlink()
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    assert found, f"no probe output; chromium said: {done.stderr[-2000:]}"
    seen = json.loads(html.unescape(found.group(1)))
    broken = [i["src"] for i in seen["images"] if not i["ok"]]
    assert not broken, f"broken images: {broken}"
    assert all(url.startswith("file://") for url in seen["fetched"]), seen["fetched"]
    return seen


def _screenshot(index: Path, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / name
    done = _chromium(f"--screenshot={shot}", "--window-size=1280,4000", index.as_uri())
    assert shot.exists() and shot.stat().st_size > 10_000, done.stderr[-2000:]


def test_run_report_renders_in_chromium(demo_chain: DemoChain) -> None:
    index = demo_chain.output / "report" / "index.html"
    seen = _open(index)
    sources = {i["src"] for i in seen["images"]}
    assert {"curves-train.png", "curves-retrain.png", "confusion.png"} <= sources
    assert sum(s.startswith("strips/") for s in sources) >= 1
    assert seen["perClassRows"] >= 2  # header and at least background
    for heading in ("Per-class IoU", "Training curves", "Confusion of the pseudo masks", "Images"):
        assert any(h.startswith(heading) for h in seen["headings"]), seen["headings"]
    _screenshot(index, "run-report.png")


def test_evaluate_stage_report_renders_in_chromium(demo_chain: DemoChain) -> None:
    output = resolve(str(demo_chain.output / "evaluate"))
    index = demo_chain.output / "evaluate" / "report" / "index.html"
    assert write_stage_report(output) == index.as_uri()
    seen = _open(index)
    sources = {i["src"] for i in seen["images"]}
    assert "confusion.png" in sources and sum(s.startswith("strips/") for s in sources) >= 1
    assert seen["perClassRows"] >= 2
    assert not any(h.startswith("Training curves") for h in seen["headings"])
    _screenshot(index, "evaluate-report.png")
