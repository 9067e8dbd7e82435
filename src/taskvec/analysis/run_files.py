"""What the analyses read from and keep in a run directory: the chosen layer, finished steps."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Conditions whose chosen layer the analyses adopt, in order of preference (docs/RUN_LAYOUT.md).
LAYER_CONDITIONS = ("text-icl-xpatch", "text->text", "image-icl-patch", "llm-xpatch")


def chosen_layer(run_dir: Path, num_layers: int) -> tuple[int, str]:
    """The layer the experiments chose on validation, else the middle layer; and where it came from."""
    path = run_dir / "results.json"
    if path.is_file():
        layers = json.loads(path.read_text(encoding="utf-8")).get("layers") or {}
        ordered = [c for c in LAYER_CONDITIONS if c in layers] + [
            c for c in layers if c not in LAYER_CONDITIONS
        ]
        for condition in ordered:
            chosen = (layers[condition] or {}).get("chosen")
            if isinstance(chosen, int) and 0 <= chosen < num_layers:
                return chosen, f"results.json layers[{condition!r}]['chosen']"
    return num_layers // 2, "middle layer (results.json has no chosen layer)"


class StepCache:
    """JSON results of finished steps, valid while the settings that made them are unchanged."""

    def __init__(self, directory: Path, fingerprint: dict[str, Any]) -> None:
        self.directory = directory
        self.fingerprint = json.loads(json.dumps(fingerprint))  # the form it takes after a round trip

    def get_or_run(self, name: str, compute: Callable[[], Any]) -> Any:
        path = self.directory / f"{name.replace('/', '_')}.json"
        if path.is_file():
            stored = json.loads(path.read_text(encoding="utf-8"))
            if stored.get("fingerprint") == self.fingerprint:
                return stored["result"]
        result = json.loads(json.dumps(compute()))
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(
            json.dumps({"fingerprint": self.fingerprint, "result": result}), encoding="utf-8"
        )
        temporary.replace(path)  # a step interrupted mid-write leaves no half file behind
        return result
