"""The benchmark report in a real browser: headless Chromium renders the page, every image loads, tables
scroll inside a narrow window instead of widening the page, and a screenshot is taken (slow suite)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)

#: appended to a copy of the page: the verdict goes into the title, which --dump-dom prints
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  const wide = document.documentElement.scrollWidth > window.innerWidth + 1;
  document.title = `images=${imgs.length} broken=${broken} page-wider-than-window=${wide}`;
});</script>"""


def _chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=480,2400", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(BROWSER is None, reason="no chromium on this machine (apt-get install chromium; .ci/run does)")
def test_report_renders_in_headless_chromium(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run([sys.executable, "-m", "attnzoo.cli", "bench", "--methods",
                          "exact,sliding_window,linear,block_topk", "--lengths", "64,128", "--heads", "2",
                          "--head-dim", "16", "--repeat", "1", "--min-time", "0", "--out", str(tmp_path / "run")],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    page = tmp_path / "run" / "report.html"
    text = page.read_text()
    # structured: a time-vs-length and a Pareto plot; real (SmolLM2, run at the longest length only): its plots
    assert text.count("<img") >= 4
    probe = page.with_name("probe.html")
    probe.write_text(text.replace("</body>", PROBE + "</body>"))
    dom = _chromium("--dump-dom", "--virtual-time-budget=10000", probe.as_uri(), cwd=tmp_path)
    title = re.search(r"<title>(.*?)</title>", dom.stdout)
    assert title, dom.stderr[-2000:]
    assert re.fullmatch(r"images=(\d+) broken=0 page-wider-than-window=false", title.group(1)), title.group(1)
    assert int(re.match(r"images=(\d+)", title.group(1)).group(1)) == text.count("<img")
    shot = tmp_path / "report.png"
    _chromium(f"--screenshot={shot}", page.as_uri(), cwd=tmp_path)
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000  # a rendered page, not a blank
