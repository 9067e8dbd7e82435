"""`AnalysisDocument`: what `run_analyses` returns and analysis.json holds (format 3).

{
  "format": 3,
  "meta": {"model", "llm", "taskvec", "model_fingerprint", "llm_fingerprint", "settings": {...},
           "quick", "finished", "seconds"},
  "tasks": [names],
  "layer": {"chosen": int, "num_layers": int, "source": str},
  "vectors": {"<task> / <spec>" | "llm:<task> / <spec>": description},
  "results": {analysis name: its result},           # see taskvec.analysis.paper_analyses
  "errors": {analysis or step name: message}         # what failed; the rest still ran
}

Each result is its analysis's `result_type` dataclass as `taskvec.typed_json` writes it; the
settings are `AnalysisSettings`, their prompt settings nested under "prompts". Format 2 held the
prompt settings flat in "settings" and the numbers in untyped shapes: a bare dict of tasks for
`lens`, a list for `conflict`, [token, probability] pairs for `decoded_tokens`. Reading a document
decodes the results of the analyses it is given (the paper's by default) and refuses one that does
not fit, naming the field; a result of an analysis it is not given stays as read until `result()`
decodes it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from taskvec.analysis.context import Analysis
from taskvec.analysis.paper_analyses import PAPER_ANALYSES
from taskvec.analysis.settings import AnalysisSettings
from taskvec.atomic_files import write_json_atomically
from taskvec.typed_json import from_json, to_json

ANALYSIS_FORMAT = 3
R = TypeVar("R")


@dataclass
class AnalysisMeta:
    model: str
    llm: str | None
    taskvec: str  # the version that wrote the document
    model_fingerprint: str
    llm_fingerprint: str | None
    settings: AnalysisSettings
    quick: bool
    finished: str  # ISO time, UTC
    seconds: float


@dataclass
class AnalysisLayer:
    """The layer the layer-dependent analyses read, and where the caller took it from."""

    chosen: int
    num_layers: int
    source: str


@dataclass(kw_only=True)
class AnalysisDocument:
    format: int = ANALYSIS_FORMAT
    meta: AnalysisMeta
    tasks: list[str]
    layer: AnalysisLayer
    vectors: dict[str, str]  # vector label -> where it came from
    results: dict[str, object]  # analysis name -> its result (an instance of its result_type)
    errors: dict[str, str]  # analysis (or "analysis/part") name -> "ErrorType: message"

    def result(self, analysis: Analysis[R]) -> R | None:
        """The analysis's result, None when the document has none; a ValueError naming the field
        when what the document holds under its name is not one."""
        if analysis.name not in self.results:
            return None
        value = self.results[analysis.name]
        typed = analysis.holds(value)
        return typed if typed is not None else analysis.decode(value, f"analysis.results.{analysis.name}")

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = to_json(self)
        return data

    @classmethod
    def from_json(cls, data: Any, analyses: Sequence[Analysis[Any]] = PAPER_ANALYSES) -> AnalysisDocument:
        """The document of `to_json()` data, the results of `analyses` decoded; a ValueError naming
        what is wrong otherwise."""
        if not isinstance(data, dict):
            raise ValueError(f"an analysis document is a JSON object, not {type(data).__name__}")
        found = data.get("format")
        if found != ANALYSIS_FORMAT:
            raise ValueError(
                f"analysis document format {found!r}, this taskvec reads format {ANALYSIS_FORMAT}: "
                "run the analyses again to rewrite it"
            )
        results = data.get("results")
        if not isinstance(results, dict):
            raise ValueError(
                "analysis: missing field 'results'"
                if results is None
                else "analysis.results: expected an object"
            )
        document = from_json(cls, {**data, "results": {}}, "analysis")
        known = {analysis.name: analysis for analysis in analyses}
        decoded = {
            name: known[name].decode(value, f"analysis.results.{name}") if name in known else value
            for name, value in results.items()
        }
        document = replace(document, results=decoded)
        layer = document.layer
        if not 0 <= layer.chosen < layer.num_layers:
            raise ValueError(f"analysis.layer.chosen {layer.chosen} is not one of {layer.num_layers} layers")
        return document

    def write(self, path: str | Path) -> Path:
        """Write as JSON (atomically: a killed process never leaves half a file)."""
        target = Path(path)
        write_json_atomically(target, self.to_json())
        return target

    @classmethod
    def read(cls, path: str | Path, analyses: Sequence[Analysis[Any]] = PAPER_ANALYSES) -> AnalysisDocument:
        source = Path(path)
        if not source.is_file():
            raise FileNotFoundError(f"no analysis document at {source}")
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{source} is not JSON: {error}") from None
        try:
            return cls.from_json(data, analyses)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None
