"""The picture of `moshi see` in the terminal: half-block cells (`▀`, the top pixel as the
foreground colour, the bottom one as the background), so a cell shows two square-ish pixels.

Plain Pillow and Rich, no graphics protocol: it works in any terminal and in tmux, and under
NO_COLOR Textual turns the colours into greys, which still shows the picture.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from rich.style import Style
from rich.text import Text
from textual.widget import Widget

HALF_BLOCK = "▀"
# The largest picture shown or sent to the engine: engine/moshivis/vision.py's MAX_PIXELS (that
# module loads torch, which the app's process never does; a test keeps the two equal).
MAX_PIXELS = 100_000_000


class PictureError(ValueError):
    """A file the app cannot show: the message is one line naming it."""


def load_picture(path: Path):
    """The file's bytes (what the engine decodes) and an upright RGB picture to show."""
    from PIL import Image, ImageOps

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PictureError(f"picture not found: {path}") from None
    except IsADirectoryError:
        raise PictureError(f"{path} is a folder, not a picture") from None
    except OSError as exc:
        raise PictureError(f"cannot read {path}: {exc.strerror or exc}") from None
    not_a_picture = PictureError(f"{path} is not a picture (or not in a format Pillow reads)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own, lower limit follows
            image = Image.open(io.BytesIO(data))  # reads the header only: the size comes before any decoding
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError):
        raise not_a_picture from None
    with image:
        if image.width * image.height > MAX_PIXELS:
            raise PictureError(f"{path} is too large: {image.width}×{image.height}, over "
                               f"{MAX_PIXELS // 1_000_000} megapixels")
        try:
            image.load()
            return data, ImageOps.exif_transpose(image).convert("RGB")
        except (OSError, SyntaxError, ValueError, EOFError):
            raise not_a_picture from None


def half_blocks(picture, width: int, height: int) -> Text:
    """The picture fitted in `width`×`height` cells, centred, its aspect ratio kept."""
    from PIL import Image

    scale = min(width / picture.width, 2 * height / picture.height)
    w = max(1, min(width, round(picture.width * scale)))
    h = max(1, min(2 * height, round(picture.height * scale)))
    pixels = picture.resize((w, h), Image.Resampling.BOX).load()
    left = " " * ((width - w) // 2)
    text = Text(no_wrap=True, overflow="crop")
    text.append("\n" * ((height - (h + 1) // 2) // 2))
    for y in range(0, h, 2):
        text.append(left)
        for x in range(w):
            bottom = pixels[x, y + 1] if y + 1 < h else None
            text.append(HALF_BLOCK, Style(color=_rgb(pixels[x, y]), bgcolor=bottom and _rgb(bottom)))
        if y + 2 < h:
            text.append("\n")
    return text


def _rgb(pixel: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*pixel)


class PictureView(Widget):
    """The picture being talked about, redrawn to the panel's size."""

    def __init__(self, picture=None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.picture = picture
        self._drawn: tuple[int, int, Text] | None = None  # for this picture, at this size

    def show(self, picture, name: str) -> None:
        self.picture = picture
        self._drawn = None
        self.border_title = name
        self.refresh()

    def render(self) -> Text:
        width, height = self.content_size
        if self.picture is None or width < 1 or height < 1:
            return Text()
        if self._drawn is None or self._drawn[:2] != (width, height):
            self._drawn = (width, height, half_blocks(self.picture, width, height))
        return self._drawn[2]
