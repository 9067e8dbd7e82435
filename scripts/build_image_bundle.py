#!/usr/bin/env python3
"""Rebuild the image bundle in src/taskvec/data/images from openly licensed npm packages.

    python scripts/build_image_bundle.py                 # npm-installs the pinned packages into a temp dir
    python scripts/build_image_bundle.py --node-modules DIR   # reuse an existing node_modules

Needs `npm` and `rsvg-convert` (Debian: `apt-get install librsvg2-bin`) on PATH; only this script
needs them, the shipped bundle is plain PNG. Output: one RGB PNG per (entity, style), at most
128 px on the long side on a white background, plus manifest.json, LICENSES/ and ATTRIBUTION.md.
The entities come from src/taskvec/data/tasks/entities/*.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bundle_licenses import write_licenses
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "src" / "taskvec" / "data"
MAX_SIDE = 128
MIN_STYLES_PER_ENTITY = 3

# Pinned so that a rebuild gives the same pictures; bump deliberately and rebuild.
PACKAGES: dict[str, tuple[str, str]] = {
    # name: (version, licence the package.json must declare)
    "svg-country-flags": ("1.2.10", "PD"),
    "flag-icons": ("7.5.0", "MIT"),
    "emoji-datasource-twitter": ("16.0.0", "MIT"),
    "emoji-datasource-google": ("16.0.0", "MIT"),
    "openmoji": ("17.0.0", "CC-BY-SA-4.0"),
    "fluentui-emoji": ("1.3.0", "MIT"),
    "spdx-license-list": ("6.12.0", "CC0-1.0"),  # licence texts only, no pictures
}


@dataclass(frozen=True)
class Style:
    name: str
    package: str
    art_license: str  # SPDX id of the pictures (the npm package's own licence may cover only its code)
    families: frozenset[str]
    kind: str  # "flag-svg" | "emoji-png" | "emoji-svg" | "fluent-svg"
    pattern: str  # path inside the package; {iso2} {image} {code} {slug} are filled in


EMOJI_FAMILIES = frozenset({"countries", "animals", "foods"})
STYLES = (
    Style(
        "flag-svg",
        "svg-country-flags",
        "LicenseRef-Public-Domain",
        frozenset({"countries"}),
        "flag-svg",
        "svg/{iso2}.svg",
    ),
    Style("flag-icons", "flag-icons", "MIT", frozenset({"countries"}), "flag-svg", "flags/4x3/{iso2}.svg"),
    Style(
        "twemoji",
        "emoji-datasource-twitter",
        "CC-BY-4.0",
        EMOJI_FAMILIES,
        "emoji-png",
        "img/twitter/64/{image}",
    ),
    Style(
        "noto", "emoji-datasource-google", "Apache-2.0", EMOJI_FAMILIES, "emoji-png", "img/google/64/{image}"
    ),
    Style("openmoji", "openmoji", "CC-BY-SA-4.0", EMOJI_FAMILIES, "emoji-svg", "color/svg/{code}.svg"),
    # Fluent has no country flags; "modern" is the package's name for Microsoft's "Color" set.
    Style(
        "fluent-color",
        "fluentui-emoji",
        "MIT",
        frozenset({"animals", "foods"}),
        "fluent-svg",
        "icons/modern/{slug}.svg",
    ),
    Style(
        "fluent-flat",
        "fluentui-emoji",
        "MIT",
        frozenset({"animals", "foods"}),
        "fluent-svg",
        "icons/flat/{slug}.svg",
    ),
)


def slugify(name: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def flag_emoji_code(iso2: str) -> str:
    return "-".join(f"{0x1F1E6 + ord(c) - ord('A'):X}" for c in iso2.upper())


def npm_install(target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    (target / "package.json").write_text('{"name": "taskvec-image-sources", "private": true}\n')
    specs = [f"{name}@{version}" for name, (version, _) in PACKAGES.items()]
    # --ignore-scripts: we only need the packages' files, never their install hooks.
    subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--ignore-scripts", "--no-save", *specs],
        cwd=target,
        check=True,
    )
    return target / "node_modules"


def check_packages(node_modules: Path) -> None:
    for name, (version, license_id) in PACKAGES.items():
        meta = json.loads((node_modules / name / "package.json").read_text())
        if meta.get("version") != version or meta.get("license") != license_id:
            sys.exit(
                f"{name}: expected version {version} licence {license_id}, "
                f"found {meta.get('version')} {meta.get('license')}"
            )


def emoji_images(node_modules: Path, package: str, vendor: str) -> dict[str, str]:
    """unified code -> PNG file name, only where the vendor has its own art (no fallback images)."""
    table = json.loads((node_modules / package / "emoji.json").read_text())
    return {e["unified"]: e["image"] for e in table if e.get(f"has_img_{vendor}")}


def source_file(
    style: Style, entity: dict[str, str], node_modules: Path, images: dict[str, dict[str, str]]
) -> Path | None:
    code = flag_emoji_code(entity["iso2"]) if "iso2" in entity else entity["emoji"]
    root = node_modules / style.package
    if style.kind == "flag-svg":
        candidates = [style.pattern.format(iso2=entity["iso2"].lower())]
    elif style.kind == "emoji-png":
        image = images[style.name].get(code)
        candidates = [style.pattern.format(image=image)] if image else []
    elif style.kind == "emoji-svg":
        # OpenMoji names files without the emoji-presentation selector FE0F.
        candidates = [style.pattern.format(code=c) for c in (code, code.replace("-FE0F", ""))]
    else:
        candidates = [style.pattern.format(slug=entity["fluent"])] if "fluent" in entity else []
    for relative in candidates:
        if (root / relative).is_file():
            return root / relative
    return None


def to_png(source: Path, target: Path, scratch: Path) -> tuple[int, int]:
    if source.suffix == ".svg":
        rendered = scratch / "render.png"
        subprocess.run(
            [
                "rsvg-convert",
                "-w",
                str(MAX_SIDE),
                "-h",
                str(MAX_SIDE),
                "--keep-aspect-ratio",
                "-b",
                "white",
                "-f",
                "png",
                "-o",
                str(rendered),
                str(source),
            ],
            check=True,
        )
        picture = Image.open(rendered)
    else:
        picture = Image.open(source)
    picture.load()
    # White background and RGB: any VLM image processor accepts it, and transparency can't turn black.
    canvas = Image.new("RGBA", picture.size, "white")
    canvas.alpha_composite(picture.convert("RGBA"))
    rgb = canvas.convert("RGB")
    if max(rgb.size) > MAX_SIDE:
        rgb.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    target.parent.mkdir(parents=True, exist_ok=True)
    rgb.save(target, format="PNG", optimize=True)
    return rgb.size


def write_manifest(head: dict[str, object], records: list[dict[str, object]], path: Path) -> None:
    # One image record per line keeps the file small and its diffs readable.
    text = json.dumps(head, ensure_ascii=False, indent=1)[:-2]
    rows = ",\n  ".join(json.dumps(r, ensure_ascii=False) for r in records)
    path.write_text(f'{text},\n "images": [\n  {rows}\n ]\n}}\n', encoding="utf-8")
    json.loads(path.read_text(encoding="utf-8"))


def load_families() -> dict[str, list[dict[str, str]]]:
    families = {}
    for path in sorted((DATA / "tasks" / "entities").glob("*.json")):
        spec = json.loads(path.read_text(encoding="utf-8"))
        families[spec["family"]] = spec["entities"]
    return families


def build(node_modules: Path, out: Path) -> None:
    check_packages(node_modules)
    if shutil.which("rsvg-convert") is None:
        sys.exit("rsvg-convert not found: apt-get install librsvg2-bin")
    images = {
        "twemoji": emoji_images(node_modules, "emoji-datasource-twitter", "twitter"),
        "noto": emoji_images(node_modules, "emoji-datasource-google", "google"),
    }
    if out.exists():
        shutil.rmtree(out)  # a clean rebuild leaves no orphan pictures behind
    out.mkdir(parents=True)
    records: list[dict[str, object]] = []
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        for family, entities in load_families().items():
            for entity in entities:
                slug, found = slugify(entity["name"]), 0
                for style in STYLES:
                    if family not in style.families:
                        continue
                    source = source_file(style, entity, node_modules, images)
                    if source is None:
                        print(f"  no {style.name} art for {family}/{entity['name']}", file=sys.stderr)
                        continue
                    relative = f"{style.name}/{family}/{slug}.png"
                    width, height = to_png(source, out / relative, scratch)
                    found += 1
                    records.append(
                        {
                            "entity": f"{family}/{slug}",
                            "name": entity["name"],
                            "style": style.name,
                            "path": relative,
                            "package": style.package,
                            "version": PACKAGES[style.package][0],
                            "license": style.art_license,
                            "source": source.relative_to(node_modules / style.package).as_posix(),
                            "width": width,
                            "height": height,
                        }
                    )
                if found < MIN_STYLES_PER_ENTITY:
                    problems.append(f"{family}/{entity['name']}: only {found} styles")
    if problems:
        sys.exit("entities with too few styles:\n  " + "\n  ".join(problems))
    styles = {
        s.name: {
            "package": s.package,
            "version": PACKAGES[s.package][0],
            "license": s.art_license,
            "families": sorted(s.families),
            "source_pattern": s.pattern,
        }
        for s in STYLES
    }
    license_files = write_licenses(node_modules, out)
    head = {
        "format": 1,
        "generated_by": "scripts/build_image_bundle.py",
        "max_side": MAX_SIDE,
        "styles": styles,
        "license_files": license_files,
    }
    write_manifest(head, records, out / "manifest.json")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{len(records)} images, {size / 1e6:.1f} MB in {out}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DATA / "images")
    parser.add_argument("--node-modules", type=Path, help="reuse this node_modules instead of npm install")
    args = parser.parse_args()
    if args.node_modules:
        build(args.node_modules, args.out)
        return
    with tempfile.TemporaryDirectory() as work:
        build(npm_install(Path(work)), args.out)


if __name__ == "__main__":
    main()
