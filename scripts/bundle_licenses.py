"""Licence and attribution files that travel with the image bundle (used by build_image_bundle.py)."""

from __future__ import annotations

import json
from pathlib import Path

# (file name in LICENSES/, package, path inside the package): the packages' own licence files, verbatim.
PACKAGE_FILES = (
    # svg-country-flags ships no LICENSE file; its README carries the public-domain statement.
    ("svg-country-flags-README.md", "svg-country-flags", "README.md"),
    ("flag-icons-LICENSE.txt", "flag-icons", "LICENSE"),
    ("emoji-datasource-twitter-LICENSE.txt", "emoji-datasource-twitter", "LICENSE"),
    ("emoji-datasource-google-LICENSE.txt", "emoji-datasource-google", "LICENSE"),
    ("openmoji-LICENSE.txt", "openmoji", "LICENSE.txt"),
    ("fluentui-emoji-LICENSE.txt", "fluentui-emoji", "LICENSE"),
)
# The emoji-datasource packages' LICENSE covers their code and data only; the pictures carry the
# licences below, whose full texts come from spdx-license-list.
SPDX_TEXTS = (("Twemoji-graphics-CC-BY-4.0.txt", "CC-BY-4.0"), ("Noto-Emoji-Apache-2.0.txt", "Apache-2.0"))

LICENSE_FILES_BY_STYLE = {
    "flag-svg": ["svg-country-flags-README.md"],
    "flag-icons": ["flag-icons-LICENSE.txt"],
    "twemoji": ["Twemoji-graphics-CC-BY-4.0.txt", "emoji-datasource-twitter-LICENSE.txt"],
    "noto": ["Noto-Emoji-Apache-2.0.txt", "emoji-datasource-google-LICENSE.txt"],
    "openmoji": ["openmoji-LICENSE.txt"],
    "fluent-color": ["Fluent-Emoji-MIT-Microsoft.txt", "fluentui-emoji-LICENSE.txt"],
    "fluent-flat": ["Fluent-Emoji-MIT-Microsoft.txt", "fluentui-emoji-LICENSE.txt"],
}

ATTRIBUTION = """\
# Image bundle: sources, licences, attribution

Every picture here was made by `scripts/build_image_bundle.py` from an openly licensed npm package:
each SVG was rendered with rsvg-convert, each PNG re-encoded, to an RGB PNG of at most 128 px on the
long side on a white background. That resizing and flattening is the only change made. `manifest.json`
records, for every picture, its style, package, version, licence and the file it was made from.

| style | pictures by | licence | npm package |
|---|---|---|---|
| flag-svg | country-flags by hjnilsson, SVG files taken from Wikipedia | public domain | svg-country-flags |
| flag-icons | flag-icons by Panayiotis Lipiridis and contributors | MIT | flag-icons |
| twemoji | Twemoji, Copyright Twitter, Inc and other contributors | CC BY 4.0 | emoji-datasource-twitter |
| noto | Noto Emoji, Copyright Google Inc. | Apache License 2.0 | emoji-datasource-google |
| openmoji | OpenMoji, the open-source emoji and icon project (openmoji.org) | CC BY-SA 4.0 | openmoji |
| fluent-color, fluent-flat | Fluent Emoji, Copyright (c) Microsoft Corporation | MIT | fluentui-emoji |

svg-country-flags ships no LICENSE file; its public-domain statement is in
`LICENSES/svg-country-flags-README.md`.

- Twemoji graphics are licensed under CC BY 4.0: https://creativecommons.org/licenses/by/4.0/
- Noto Emoji images are licensed under the Apache License 2.0; the Noto flag images derive from the
  public-domain region-flags collection.
- "All emojis designed by OpenMoji – the open-source emoji and icon project. License: CC BY-SA 4.0."
  The PNGs in `openmoji/` are adaptations and are shared under the same licence, CC BY-SA 4.0.
- Fluent Emoji by Microsoft, MIT licence; packaged for npm by Mohammad Abu Mattar (fluentui-emoji).
- No Apple or Facebook emoji art is used.
- Flags depict national symbols; their use may be restricted by national law independent of copyright.

Full licence texts are in `LICENSES/`.
"""

MICROSOFT_COPYRIGHT = "Copyright (c) Microsoft Corporation."


def spdx_text(node_modules: Path, license_id: str) -> str:
    spec = json.loads((node_modules / "spdx-license-list" / "licenses" / f"{license_id}.json").read_text())
    return str(spec["licenseText"])


def write_licenses(node_modules: Path, out: Path) -> dict[str, list[str]]:
    """Write LICENSES/ and ATTRIBUTION.md into out; returns style -> licence files (relative to out)."""
    folder = out / "LICENSES"
    folder.mkdir(parents=True, exist_ok=True)
    for target, package, relative in PACKAGE_FILES:
        (folder / target).write_bytes((node_modules / package / relative).read_bytes())
    for target, license_id in SPDX_TEXTS:
        (folder / target).write_text(spdx_text(node_modules, license_id), encoding="utf-8")
    placeholder = "Copyright (c) <year> <copyright holders>"
    mit = spdx_text(node_modules, "MIT").replace(placeholder, MICROSOFT_COPYRIGHT)
    (folder / "Fluent-Emoji-MIT-Microsoft.txt").write_text(mit, encoding="utf-8")
    (out / "ATTRIBUTION.md").write_text(ATTRIBUTION, encoding="utf-8")
    return {style: [f"LICENSES/{name}" for name in names] for style, names in LICENSE_FILES_BY_STYLE.items()}
