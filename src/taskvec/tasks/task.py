"""The task data model: items (input -> output, with images per style) and tasks (items + splits)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

# The default image of an item is its first style in this order: real flags before emoji flags, then
# emoji styles by how widely they are seen, then an external file's single image.
STYLE_PREFERENCE = (
    "flag-svg",
    "flag-icons",
    "twemoji",
    "noto",
    "openmoji",
    "fluent-color",
    "fluent-flat",
    "image",
)


class TaskFileError(ValueError):
    """A task file that cannot be used: malformed, missing fields or images, empty, or (loaded
    strictly) giving an input more than once."""


class DuplicateInputWarning(UserWarning):
    """A task file gives an input more than once; each such input became one item of all its answers."""


class MissingImageError(LookupError):
    """An item has no image in the requested style (or no images at all)."""


# A task's name is a folder name in a run directory (vectors/ROLE/NAME, cache/KIND/NAME), and most
# filesystems take at most 255 bytes per name.
MAX_TASK_NAME_BYTES = 255


def task_name_error(name: str) -> str | None:
    """Why `name` cannot be a task's name, as a one-line message, or None. Such names are refused,
    not rewritten into safe ones: two names rewritten alike would share their vectors and results."""
    if not name.strip():
        problem = "is empty"
    elif name in (".", ".."):
        problem = "names a folder itself"
    elif "/" in name or "\\" in name:
        problem = "contains a path separator"
    elif any(ord(character) < 32 or ord(character) == 127 for character in name):
        problem = "contains a control character"
    elif any(0xD800 <= ord(character) <= 0xDFFF for character in name):
        problem = "contains a lone surrogate, which no file name can hold"
    elif len(name.encode("utf-8")) > MAX_TASK_NAME_BYTES:
        problem = f"is longer than a file name may be ({MAX_TASK_NAME_BYTES} bytes in UTF-8)"
    else:
        return None
    return f"task name {name!r} {problem}: a task's name becomes a folder name in a run directory"


def order_styles(styles: set[str] | list[str]) -> list[str]:
    known = [s for s in STYLE_PREFERENCE if s in styles]
    return known + sorted(s for s in styles if s not in STYLE_PREFERENCE)


@dataclass(frozen=True)
class Item:
    """One example: `input -> output`; `aliases` are further accepted answers."""

    input: str
    output: str
    aliases: tuple[str, ...] = ()
    # style -> absolute path; empty for text-only tasks. Excluded from hashing (a dict is unhashable).
    images: Mapping[str, Path] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.aliases, tuple):  # accept lists from callers, keep the frozen type
            object.__setattr__(self, "aliases", tuple(self.aliases))

    def answers(self) -> tuple[str, ...]:
        return (self.output, *self.aliases)

    def image(self, style: str | None = None) -> Path:
        """The image in `style`, or in the first available style of STYLE_PREFERENCE when None."""
        if not self.images:
            raise MissingImageError(f"item {self.input!r} has no images (text-only task)")
        if style is None:
            return self.images[order_styles(list(self.images))[0]]
        if style not in self.images:
            raise MissingImageError(
                f"item {self.input!r} has no image in style {style!r}; it has: "
                + ", ".join(order_styles(list(self.images)))
            )
        return self.images[style]


@dataclass(frozen=True)
class Task:
    """A named task: instruction, items and splits (split name -> indices into `items`)."""

    name: str
    instruction: str
    items: tuple[Item, ...]
    splits: Mapping[str, tuple[int, ...]] = field(default_factory=dict, hash=False)
    # Words naming the task, looked for by the logit lens in the middle ("task") layers.
    task_words: tuple[str, ...] = ()
    source: str = "builtin"

    def __post_init__(self) -> None:
        error = task_name_error(self.name)
        if error is not None:
            raise ValueError(error)
        object.__setattr__(self, "items", tuple(self.items))
        object.__setattr__(self, "task_words", tuple(self.task_words))

    def split(self, name: str) -> list[Item]:
        if name not in self.splits:
            raise KeyError(f"task {self.name!r} has no split {name!r}; it has: {', '.join(self.splits)}")
        return [self.items[i] for i in self.splits[name]]

    def styles(self) -> list[str]:
        """Image styles that every item has, in preference order (empty for text-only tasks)."""
        if not self.items:
            return []
        shared = set(self.items[0].images)
        for item in self.items[1:]:
            shared &= set(item.images)
        return order_styles(shared)

    def style_counts(self) -> dict[str, int]:
        """Number of items having each style (a style may cover only part of an external task)."""
        counts: dict[str, int] = {}
        for item in self.items:
            for style in item.images:
                counts[style] = counts.get(style, 0) + 1
        return {style: counts[style] for style in order_styles(list(counts))}

    @property
    def has_images(self) -> bool:
        return any(item.images for item in self.items)

    def __len__(self) -> int:
        return len(self.items)
