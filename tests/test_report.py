"""The report: self-contained HTML from a synthetic run directory, rendered by headless Chromium."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_handle
from PIL import Image
from report_fixtures import fake_results
from tiny_tasks import make_tiny_tasks

from taskvec.analysis import run_analyses
from taskvec.cli import main
from taskvec.report import write_report


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """results.json written by hand after RUN_LAYOUT.md, analysis.json by run_analyses (quick)."""
    root = tmp_path_factory.mktemp("run")
    tasks = make_tiny_tasks(root / "images")
    handle = tiny_handle("llava")
    image = tasks[0].items[0].image()
    results = fake_results([task.name for task in tasks], handle.num_layers, image)
    (root / "results.json").write_text(json.dumps(results))
    analysis = run_analyses(handle, tasks, root, quick=True, progress=False)
    assert analysis["errors"] == {}
    write_report(root)
    return root


class LinkCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "data", "poster", "action") and value is not None:
                self.links.append((tag, name, value))


def test_report_is_self_contained_with_every_section(run_dir: Path) -> None:
    text = (run_dir / "report.html").read_text(encoding="utf-8")
    parser = LinkCollector()
    parser.feed(text)
    images = [value for tag, name, value in parser.links if tag == "img"]
    figures = sorted((run_dir / "figures").glob("*.png"))
    # Lens: 3 tasks + their mean; sweeps, ensemble, LM cosine, similarity (2), t-SNE; and one photo.
    assert len(figures) == 10 and len(images) == len(figures) + 1
    assert all(value.startswith("data:image/png;base64,") for value in images)
    for tag, name, value in parser.links:
        assert value.startswith(("data:", "#")), f"<{tag} {name}={value[:60]!r}> leaves the file"
    assert "script" not in parser.tags and "link" not in parser.tags and "url(" not in text
    assert "http://" not in text and "https://" not in text
    for heading in ("Results beside the paper", "Three phases", "Similarity", "t-SNE", "Task conflict"):
        assert heading in text
    assert (
        "paper: Idefics2-8B" in text and "0.51" in text and "paper: directions (Idefics2-8B)" in text
    )  # the paper's row beside ours
    assert "&lt;b&gt;not html&lt;/b&gt;" in text and "<b>not html" not in text  # generated text escaped
    assert "Missing" not in text


def test_report_of_a_partial_run_says_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(json.dumps({"format": 1, "tables": {"paper": "not a table"}}))
    text = write_report(tmp_path).read_text(encoding="utf-8")
    assert "analysis.json not found" in text
    assert "Missing: lens phases in analysis.json" in text
    assert "Missing: examples in results.json" in text
    assert "could not be drawn" in text  # a malformed table costs its section, not the report
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "results.json not found" in write_report(empty).read_text(encoding="utf-8")
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "absent")


def test_report_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "results.json").write_text(json.dumps({"format": 1, "meta": {"model": "m"}}))
    assert main(["report", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "report.html")
    assert main(["report", str(tmp_path / "absent")]) == 2
    assert "no run directory" in capsys.readouterr().err


# Placed first in <head>: records failed resources (capture phase sees <img> load errors), script
# errors and console.error, then, once everything has loaded, writes what it found into the DOM.
PROBE = """<script>
window.__problems = [];
window.addEventListener("error", function (event) {
  var target = event.target;
  window.__problems.push(target && target.tagName ? "failed to load " + target.tagName + " " +
    (target.alt || "") : "script error: " + event.message);
}, true);
var originalError = console.error;
console.error = function () {
  window.__problems.push("console.error: " + Array.prototype.join.call(arguments, " "));
  originalError.apply(console, arguments);
};
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (image) { return !image.complete || image.naturalWidth === 0; });
  var out = document.createElement("pre");
  out.id = "probe-result";
  out.textContent = JSON.stringify({images: images.length,
    broken: broken.map(function (image) { return image.alt; }), problems: window.__problems});
  document.body.appendChild(out);
});
</script>"""

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)"
)


def _chromium(page: Path, profile: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-extensions", "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}",
        *arguments, page.as_uri(),
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def _probe(report: Path, tmp_path: Path) -> dict[str, Any]:
    """Load the report with the probe injected; return what the probe wrote into the DOM."""
    probed = tmp_path / f"probed-{report.name}"
    text = report.read_text(encoding="utf-8")
    probed.write_text(text.replace("<head>", "<head>\n" + PROBE, 1), encoding="utf-8")
    result = _chromium(probed, tmp_path / "profile", "--dump-dom", "--virtual-time-budget=10000")
    found = re.search(r'<pre id="probe-result">(.*?)</pre>', result.stdout, re.S)
    assert found, f"the probe did not report (chromium exit {result.returncode}): {result.stderr[-2000:]}"
    return dict(json.loads(html.unescape(found.group(1))))


@needs_chromium
def test_chromium_renders_the_report_with_every_image_and_no_error(run_dir: Path, tmp_path: Path) -> None:
    report = run_dir / "report.html"
    probed = _probe(report, tmp_path)
    assert probed == {"images": 11, "broken": [], "problems": []}

    screenshot = tmp_path / "report.png"
    result = _chromium(report, tmp_path / "profile", f"--screenshot={screenshot}", "--window-size=1280,3000")
    assert screenshot.is_file(), result.stderr[-2000:]
    assert screenshot.stat().st_size > 50_000
    with Image.open(screenshot) as picture:
        assert picture.size == (1280, 3000)
        assert len(picture.convert("RGB").getcolors(maxcolors=1_000_000) or []) > 100  # not a blank page

    # The probe must be able to fail: a corrupt image and a script error are both caught.
    broken = tmp_path / "broken.html"
    text = report.read_text(encoding="utf-8")
    text = re.sub(r'src="data:image/png;base64,[^"]*"', 'src="data:image/png;base64,AAAA"', text, count=1)
    broken.write_text(
        text.replace("</body>", "<script>undefinedFunction();</script></body>"), encoding="utf-8"
    )
    failed = _probe(broken, tmp_path)
    assert failed["images"] == 11 and len(failed["broken"]) == 1
    assert any("failed to load IMG" in problem for problem in failed["problems"])
    assert any("undefinedFunction" in problem for problem in failed["problems"])


def test_main_table_is_followed_by_the_majority_answer_floor() -> None:
    from taskvec.report.results_sections import majority_floor_note

    tables = {
        "baselines": {
            "majority_answer": {
                "metric": "prefix",
                "answers": {"food-flavor": "sweet"},
                "per_task": {"food-flavor": 0.64},
                "mean": 0.64,
            }
        }
    }
    text = majority_floor_note(tables)
    assert "Floor without a model" in text and "0.64" in text and "sweet" in text
    assert majority_floor_note({}) == ""
