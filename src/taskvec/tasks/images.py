"""Every image file taskvec reads is opened here, under a pixel limit checked before any pixel decodes.

A PNG of 12000 x 12000 black pixels is a 420 KB file and 432 MB of RGB once decoded, and an image
prompt holds several images: such a file must be refused from its header alone.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

# 4096 x 4096 pixels (48 MiB as RGB). The largest task image taskvec ships is 128 x 128, the paper's
# flags and emoji are a few hundred pixels wide and every processor shrinks an image to 224-1024
# pixels, so the limit only binds far above any real task; a 4K frame (3840 x 2160) and a
# 12-megapixel photo (4000 x 3000) still open. PIL's own limit (89 million pixels, refused only above
# twice that) lets a 420 KB file through.
MAX_IMAGE_SIDE = 4096
MAX_IMAGE_PIXELS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE


class ImageTooLargeError(ValueError):
    """An image file declaring more pixels than MAX_IMAGE_PIXELS (a decompression bomb, or a photo
    that needs shrinking first)."""


def _refusal(path: Path, width: int, height: int) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"{path}: image of {width} x {height} pixels, over taskvec's limit of {MAX_IMAGE_PIXELS:,} "
        f"pixels ({MAX_IMAGE_SIDE} x {MAX_IMAGE_SIDE}); shrink it first"
    )


def _declared_size(path: Path) -> tuple[int, int] | None:
    """The width and height in the file's header, read by PIL's format readers themselves, which
    (unlike Image.open) do not refuse a large image; None when none of them reads the file."""
    Image.init()
    with path.open("rb") as file:
        prefix = file.read(16)
        for format_id in Image.ID:
            reader, accepts = Image.OPEN[format_id]
            if accepts is not None and not accepts(prefix):
                continue
            file.seek(0)
            try:
                width, height = reader(file, str(path)).size
            except Exception:  # a reader that does not recognise the file, as Image.open skips it
                continue
            return width, height
    return None


@contextlib.contextmanager
def open_image(path: str | Path) -> Iterator[Image.Image]:
    """The image at `path`, opened lazily: only its header is read before the size check, so a file
    over MAX_IMAGE_PIXELS raises ImageTooLargeError (a ValueError) without decoding a pixel. Other
    unreadable files raise what Image.open raises (OSError, e.g. UnidentifiedImageError)."""
    path = Path(path)
    try:
        # The check below is stricter than PIL's warning, which would only add a second line.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as error:
        size = _declared_size(path)
        raise (_refusal(path, *size) if size else ImageTooLargeError(f"{path}: {error}")) from None
    with image:
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise _refusal(path, image.width, image.height)
        yield image


def read_rgb(path: str | Path) -> Image.Image:
    """The image at `path` decoded as RGB, under the pixel limit of `open_image`."""
    with open_image(path) as image:
        return image.convert("RGB")
