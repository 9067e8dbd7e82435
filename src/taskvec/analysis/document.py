"""`AnalysisDocument`: what `run_analyses` returns and analysis.json holds (format 2).

{
  "format": 2,
  "meta": {"model", "llm", "taskvec", "model_fingerprint", "llm_fingerprint", "settings": {...},
           "quick", "finished", "seconds"},
  "tasks": [names],
  "layer": {"chosen": int, "num_layers": int, "source": str},
  "vectors": {"<task> / <spec>" | "llm:<task> / <spec>": description},
  "results": {analysis name: its JSON result},       # see taskvec.analysis.registry
  "errors": {analysis or step name: message}         # what failed; the rest still ran
}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskvec.atomic_files import write_json_atomically
from taskvec.typed_json import from_json, to_json

ANALYSIS_FORMAT = 2


@dataclass
class AnalysisMeta:
    model: str
    llm: str | None
    taskvec: str  # the version that wrote the document
    model_fingerprint: str
    llm_fingerprint: str | None
    settings: dict[str, Any]  # AnalysisSettings.as_dict()
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
    results: dict[str, Any]  # analysis name -> its result
    errors: dict[str, str]  # analysis (or "analysis/part") name -> "ErrorType: message"

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = to_json(self)
        return data

    @classmethod
    def from_json(cls, data: Any) -> AnalysisDocument:
        """The document of `to_json()` data; a ValueError naming what is wrong otherwise."""
        if not isinstance(data, dict):
            raise ValueError(f"an analysis document is a JSON object, not {type(data).__name__}")
        found = data.get("format")
        if found != ANALYSIS_FORMAT:
            raise ValueError(
                f"analysis document format {found!r}, this taskvec reads format {ANALYSIS_FORMAT}: "
                "run the analyses again to rewrite it"
            )
        document = from_json(cls, data, "analysis")
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
    def read(cls, path: str | Path) -> AnalysisDocument:
        source = Path(path)
        if not source.is_file():
            raise FileNotFoundError(f"no analysis document at {source}")
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{source} is not JSON: {error}") from None
        try:
            return cls.from_json(data)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None
