"""The HTML reports in a real browser (headless Chromium): they render without console
errors or exceptions, make no network request, their tables sort, and a screenshot of
each is saved (``out/screenshots/``, or ``$GCOMP_SCREENSHOT_DIR``) for people to look at.

scripts/test.sh installs Debian's ``chromium`` package when it is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gcomp.backends import get_backend

from gcomp import io
from gcomp.report import compare_document, write_report
from tests.chromium import Browser, find_chromium, save

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "models" / "default.onnx"
SHOTS = Path(os.environ.get("GCOMP_SCREENSHOT_DIR") or REPO / "out" / "screenshots")

pytestmark = pytest.mark.skipif(
    find_chromium() is None,
    reason="chromium not installed (scripts/test.sh installs Debian's chromium package)",
)


@pytest.fixture(scope="module")
def browser():
    with Browser() as b:
        yield b


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """A ResNet-18 profile, an optimize report with before/after profiles, a comparison."""
    from models import build

    d = tmp_path_factory.mktemp("pages")
    model = d / "resnet18.onnx"
    io.save(build("resnet18"), model)
    feeds = {"input": np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)}
    fused = (
        get_backend("ort")
        .compile(model, "cpu", optimization="all")
        .profile(feeds, iters=8, warmup=1)
    )
    plain = (
        get_backend("ort")
        .compile(model, "cpu", optimization="disable")
        .profile(feeds, iters=4, warmup=1)
    )
    out = {"profile": write_report(fused.to_dict(), d / "profile.html")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gcomp",
            "optimize",
            str(DEFAULT),
            "-o",
            str(d / "o.onnx"),
            "--report",
            str(d / "optimize.html"),
            "--profile-iters",
            "5",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out["optimize"] = d / "optimize.html"
    cmp = compare_document(
        [plain.to_dict(), fused.to_dict()], ["ORT, optimizations off", "ORT, all optimizations"]
    )
    out["compare"] = write_report(cmp, d / "compare.html")
    return out


@pytest.mark.parametrize("kind", ["profile", "optimize", "compare"])
def test_report_renders_cleanly_offline(browser, pages, kind):
    page = browser.open(pages[kind].resolve().as_uri())
    assert page.console_errors == []
    assert page.exceptions == []
    assert page.requests == []  # no CDN, font, image or script fetched
    assert page.height > 1500  # the sections are there, not an empty page
    assert page.screenshot[:8] == b"\x89PNG\r\n\x1a\n"
    save(page.screenshot, SHOTS / f"{kind}.png")


def test_op_table_sorts_and_filters(browser, pages):
    script = """(function(){
      var t = document.getElementById('p-ops'), th = t.tHead.rows[0].cells[2];
      function col(){ return Array.prototype.map.call(t.tBodies[0].rows, function(r){
        return parseFloat(r.cells[2].getAttribute('data-v')); }); }
      th.click(); var up = col(); th.click(); var down = col();
      var box = document.querySelector('input.filter[data-table=p-ops]');
      box.value = 'MaxPool'; box.dispatchEvent(new Event('input'));
      var shown = Array.prototype.filter.call(t.tBodies[0].rows, function(r){ return r.style.display !== 'none'; });
      return JSON.stringify({up: up, down: down, shown: shown.map(function(r){ return r.cells[1].textContent; })});
    })()"""
    result = json.loads(browser.evaluate(pages["profile"].resolve().as_uri(), script))
    assert len(result["up"]) > 10
    assert result["up"] == sorted(result["up"]) and result["down"] == sorted(
        result["down"], reverse=True
    )
    assert result["shown"] and set(result["shown"]) == {"MaxPool"}


def test_the_browser_check_can_fail(browser, tmp_path):
    """The same harness on a page that logs an error, throws and fetches: all three are caught."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!DOCTYPE html><html><body><img src='http://127.0.0.1:9/x.png'>"
        "<script>console.error('boom'); missingFunction();</script></body></html>"
    )
    page = browser.open(bad.as_uri(), screenshot=False)
    assert any("boom" in e for e in page.console_errors)
    assert any("missingFunction" in e for e in page.exceptions)
    assert page.requests == ["http://127.0.0.1:9/x.png"]
