"""HTML building blocks for a self-contained page: escaped text, tables, data-URI images, CSS.

Nothing here links outside the file: images are base64 data URIs, the style sheet is inline and
there are no scripts or web fonts, so the report opens offline, can be mailed as one file, and a
browser makes no network request for it.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from taskvec.tasks.images import open_image

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto;
       max-width: 1180px; padding: 1em 2em 4em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #bbb; margin-top: 2.2em; padding-bottom: .15em; }
h3 { margin-top: 1.4em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: .25em .55em; text-align: right; vertical-align: top; }
th { background: #f0f0f0; }
td.text, th.text { text-align: left; }
tr.paper td { color: #555; font-style: italic; }
img.figure { max-width: 100%; height: auto; display: block; margin: .6em 0; }
img.thumb { width: 64px; height: auto; image-rendering: auto; }
.note { color: #555; font-size: 0.9em; }
.missing { background: #fff4e0; border-left: 4px solid #e69500; padding: .4em .8em; margin: .6em 0; }
.error { background: #fde8e8; border-left: 4px solid #c62828; padding: .4em .8em; margin: .6em 0; }
nav ul { columns: 2; font-size: 0.92em; }
code { background: #f4f4f4; padding: 0 .25em; }
details summary { cursor: pointer; color: #333; }
.interval { color: #666; font-size: 0.88em; white-space: nowrap; }
.verdict { font-weight: bold; white-space: nowrap; }
.verdict.holds { color: #1b7f3b; }
.verdict.does-not-hold { color: #b3261e; }
.verdict.not-testable { color: #777; }
"""


def escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def number(value: Any, digits: int = 2) -> str:
    """Numbers with fixed decimals, integers as they are, missing values as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return escape(value)


def mean_std(entry: Any) -> str:
    """A table cell from {"mean": x, "std": y} (std shown when above zero)."""
    if not isinstance(entry, dict) or entry.get("mean") is None:
        return number(entry) if not isinstance(entry, dict) else "–"
    std = entry.get("std")
    return number(entry["mean"]) + (f" ± {number(std)}" if isinstance(std, float) and std > 0 else "")


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    text_columns: int = 1,
    row_classes: Sequence[str] | None = None,
) -> str:
    """A table of already formatted (escaped) cells; the first `text_columns` are left aligned."""
    head = "".join(
        f'<th class="text">{escape(h)}</th>' if i < text_columns else f"<th>{escape(h)}</th>"
        for i, h in enumerate(headers)
    )
    body = []
    for index, row in enumerate(rows):
        cells = "".join(
            f'<td class="text">{cell}</td>' if i < text_columns else f"<td>{cell}</td>"
            for i, cell in enumerate(row)
        )
        css = f' class="{row_classes[index]}"' if row_classes and row_classes[index] else ""
        body.append(f"<tr{css}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def figure_tag(path: Path, alt: str) -> str:
    return f'<img class="figure" src="{data_uri(path.read_bytes(), "image/png")}" alt="{escape(alt)}">'


def thumbnail_uri(path: Path, width: int = 128) -> str | None:
    """A small PNG copy of an image as a data URI (task images can be large), None if unreadable or
    over taskvec's pixel limit."""
    try:
        with open_image(path) as image:
            picture = image.convert("RGBA")
    except (OSError, ValueError):
        return None
    if picture.width > width:
        picture = picture.resize((width, max(1, round(picture.height * width / picture.width))))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return data_uri(buffer.getvalue(), "image/png")


def note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def missing(text: str) -> str:
    return f'<div class="missing">Missing: {escape(text)}</div>'


def page(title: str, sections: Sequence[tuple[str, str, str]], intro: str = "") -> str:
    """The whole document: title, a table of contents, then (anchor, heading, body) sections."""
    contents = "".join(
        f'<li><a href="#{anchor}">{escape(heading)}</a></li>' for anchor, heading, _ in sections
    )
    body = "".join(
        f'<h2 id="{anchor}">{escape(heading)}</h2>\n{html_body}\n' for anchor, heading, html_body in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<h1>{escape(title)}</h1>\n{intro}\n<nav><ul>{contents}</ul></nav>\n{body}</body>\n</html>\n"
    )
