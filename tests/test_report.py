"""The report: self-contained HTML from a tiny run directory, rendered by headless Chromium."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_handle
from PIL import Image
from run_fixtures import tiny_base_lm, tiny_config, write_shared_input_task_file

from taskvec.analysis import PAPER_ANALYSES, Analysis, AnalysisContext, AnalysisDocument, with_analysis
from taskvec.cli import main
from taskvec.experiments import RunResults, run_analyses_of_run, run_experiments
from taskvec.report import PAPER_SECTIONS, ReportContext, ReportSection, with_section, write_report
from taskvec.report.claims import evaluate_claims


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run of two tasks that share their inputs, its analyses and its report."""
    root = tmp_path_factory.mktemp("run")
    second = write_shared_input_task_file(root / "tasks")
    config = tiny_config(
        second.parent / "country-capital.jsonl",
        tasks=(str(second.parent / "country-capital.jsonl"), str(second)),
    )
    vlm = tiny_handle("llava")
    llm = tiny_base_lm(vlm)
    results = run_experiments(vlm, config, root / "out", llm=llm, progress=False)
    document = run_analyses_of_run(vlm, results, root / "out", llm=llm, progress=False)
    assert document.errors == {}
    write_report(root / "out")
    return root / "out"


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
    # Lens: 2 tasks + their mean; sweeps, ensemble, LM cosine, similarity (2 + LM vs VLM), t-SNE,
    # and the heads' indirect effects of each task.
    assert len(figures) == 12, [figure.name for figure in figures]
    thumbnails = len([value for value in images if value.startswith("data:image/png")]) - len(figures)
    assert thumbnails >= 1  # the example generations show their image queries
    assert all(value.startswith("data:image/png;base64,") for value in images)
    for tag, name, value in parser.links:
        assert value.startswith(("data:", "#")), f"<{tag} {name}={value[:60]!r}> leaves the file"
    assert "script" not in parser.tags and "link" not in parser.tags and "url(" not in text
    assert "http://" not in text and "https://" not in text
    for heading in (
        "The paper&#x27;s claims",
        "Results beside the paper",
        "Three phases",
        "Similarity",
        "t-SNE",
        "Task conflict",
    ):
        assert heading in text
    assert text.index("The paper&#x27;s claims") < text.index("Results beside the paper")  # claims open it
    assert "paper: Idefics2-8B" in text and "0.51" in text  # the paper's rows beside ours
    assert "copy the input" in text and "majority answer" in text  # both floors
    assert "95% bootstrap interval" in text and "class='interval'" in text
    assert "Missing" not in text


def test_the_claims_table_has_a_computed_verdict_for_each_claim(run_dir: Path) -> None:
    results = RunResults.read(run_dir / "results.json")
    claims = evaluate_claims(results, AnalysisDocument.read(run_dir / "analysis.json"))
    assert [claim.number for claim in claims] == [1, 2, 3, 4, 5, 6]
    assert all(
        claim.verdict in ("holds", "does not hold", "not testable") and claim.evidence for claim in claims
    )
    # Claims 2 and 3 need the analyses; without them they cannot be tested.
    without = evaluate_claims(results, None)
    assert [claim.verdict for claim in without][1:3] == ["not testable", "not testable"]
    text = (run_dir / "report.html").read_text(encoding="utf-8")
    assert text.count('class="verdict ') == 6


def test_a_condition_that_ignores_the_query_is_no_transfer(run_dir: Path) -> None:
    results = RunResults.read(run_dir / "results.json")
    summary = results.summary("text->text")
    assert summary is not None
    summary.vector_answer_share = 1.0  # every answer is the vector's own decoded token
    summary.mean, summary.interval = 1.0, type(summary.interval)(1.0, 1.0)
    claim = evaluate_claims(results, None)[0]
    assert claim.verdict == "does not hold"
    assert any("does not depend on the query" in line for line in claim.evidence)


@dataclass
class LayerCount:
    layers: int


def _layer_count(context: AnalysisContext) -> LayerCount:
    return LayerCount(context.handle.num_layers)


LAYER_COUNT = Analysis("layer-count", _layer_count, LayerCount)


def _layer_count_section(context: ReportContext) -> str:
    assert context.analysis is not None
    found = context.analysis.result(LAYER_COUNT)
    return f"<p>layers: {found.layers if found is not None else '?'}</p>"


def test_an_added_analysis_reaches_analysis_json_and_the_report(run_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(run_dir, tmp_path / "run")
    analyses = with_analysis(PAPER_ANALYSES, LAYER_COUNT)
    section = ReportSection("layer-count", "Layer count", "analysis", _layer_count_section, (LAYER_COUNT,))
    sections = with_section(PAPER_SECTIONS, section)
    vlm = tiny_handle("llava")
    results = RunResults.read(tmp_path / "run" / "results.json")
    document = run_analyses_of_run(
        vlm, results, tmp_path / "run", llm=tiny_base_lm(vlm), progress=False, analyses=analyses
    )
    text = write_report(tmp_path / "run", sections=sections).read_text(encoding="utf-8")
    assert document.result(LAYER_COUNT) == LayerCount(vlm.num_layers)
    assert json.loads((tmp_path / "run" / "analysis.json").read_text())["results"]["layer-count"] == {
        "layers": 3
    }
    assert "<p>layers: 3</p>" in text
    assert [s.anchor for s in sections].index("layer-count") == [s.anchor for s in sections].index(
        "examples"
    ) - 1
    # The library's lists are untouched: a report with the defaults has no such section.
    assert "layer-count" not in [a.name for a in PAPER_ANALYSES]
    assert "<p>layers:" not in write_report(tmp_path / "run").read_text(encoding="utf-8")


def test_adding_an_analysis_or_section_of_an_existing_name_replaces_it() -> None:
    """Running a notebook cell twice gives the same lists, not an error or a duplicate."""
    once = with_analysis(PAPER_ANALYSES, LAYER_COUNT)
    assert with_analysis(once, LAYER_COUNT) == once
    other_lens = Analysis("lens", _layer_count, LayerCount)
    replaced = with_analysis(PAPER_ANALYSES, other_lens)
    assert [a.name for a in replaced] == [a.name for a in PAPER_ANALYSES]
    assert replaced[0] is other_lens
    section = ReportSection("layer-count", "Layer count", "analysis", _layer_count_section)
    sections = with_section(PAPER_SECTIONS, section)
    assert with_section(sections, section) == sections
    renamed = ReportSection("layer-count", "Layers", "analysis", _layer_count_section)
    again = with_section(sections, renamed, before=None)
    assert [s.anchor for s in again] == [s.anchor for s in sections]
    assert again[[s.anchor for s in again].index("layer-count")].heading == "Layers"


def test_report_of_a_partial_run_says_what_is_missing(run_dir: Path, tmp_path: Path) -> None:
    shutil.copy(run_dir / "results.json", tmp_path / "results.json")
    text = write_report(tmp_path).read_text(encoding="utf-8")
    assert "analysis.json not found" in text and "Missing: analysis.json" in text
    assert "Results beside the paper" in text and "not testable" in text
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "absent")


def test_report_command(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(run_dir / "results.json", tmp_path / "results.json")
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
    images = report.read_text(encoding="utf-8").count("<img ")
    assert probed == {"images": images, "broken": [], "problems": []} and images > 10

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
    assert failed["images"] == images and len(failed["broken"]) == 1
    assert any("failed to load IMG" in problem for problem in failed["problems"])
    assert any("undefinedFunction" in problem for problem in failed["problems"])
