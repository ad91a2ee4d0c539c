"""PNG pictures without a plotting library: an RGB canvas, a 5x7 pixel font and stacked bar
charts, written with ``zlib`` and ``struct`` (the PNG format: a signature, then IHDR, IDAT and
IEND chunks, each with its CRC).

``Canvas(width, height)`` draws rectangles and text; ``stacked_bars(canvas, ...)`` draws one
chart into a box of it; ``canvas.png()`` returns the file's bytes. The font has upper-case
letters, digits and a little punctuation; lower case is drawn as upper case.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Canvas", "Series", "stacked_bars", "unit_for", "text_width", "GLYPH_WIDTH", "GLYPH_HEIGHT"]

Colour = tuple[int, int, int]

GLYPH_WIDTH, GLYPH_HEIGHT = 5, 7
# Each glyph: seven rows of five pixels, "#" for ink.
_GLYPHS = {
    "A": " ### |#   #|#   #|#####|#   #|#   #|#   #",
    "B": "#### |#   #|#   #|#### |#   #|#   #|#### ",
    "C": " ### |#   #|#    |#    |#    |#   #| ### ",
    "D": "#### |#   #|#   #|#   #|#   #|#   #|#### ",
    "E": "#####|#    |#    |#### |#    |#    |#####",
    "F": "#####|#    |#    |#### |#    |#    |#    ",
    "G": " ### |#   #|#    |# ###|#   #|#   #| ####",
    "H": "#   #|#   #|#   #|#####|#   #|#   #|#   #",
    "I": " ### |  #  |  #  |  #  |  #  |  #  | ### ",
    "J": "  ###|   # |   # |   # |   # |#  # | ##  ",
    "K": "#   #|#  # |# #  |##   |# #  |#  # |#   #",
    "L": "#    |#    |#    |#    |#    |#    |#####",
    "M": "#   #|## ##|# # #|# # #|#   #|#   #|#   #",
    "N": "#   #|#   #|##  #|# # #|#  ##|#   #|#   #",
    "O": " ### |#   #|#   #|#   #|#   #|#   #| ### ",
    "P": "#### |#   #|#   #|#### |#    |#    |#    ",
    "Q": " ### |#   #|#   #|#   #|# # #|#  # | ## #",
    "R": "#### |#   #|#   #|#### |# #  |#  # |#   #",
    "S": " ####|#    |#    | ### |    #|    #|#### ",
    "T": "#####|  #  |  #  |  #  |  #  |  #  |  #  ",
    "U": "#   #|#   #|#   #|#   #|#   #|#   #| ### ",
    "V": "#   #|#   #|#   #|#   #|#   #| # # |  #  ",
    "W": "#   #|#   #|#   #|# # #|# # #|# # #| # # ",
    "X": "#   #|#   #| # # |  #  | # # |#   #|#   #",
    "Y": "#   #|#   #|#   #| # # |  #  |  #  |  #  ",
    "Z": "#####|    #|   # |  #  | #   |#    |#####",
    "0": " ### |#   #|#  ##|# # #|##  #|#   #| ### ",
    "1": "  #  | ##  |  #  |  #  |  #  |  #  | ### ",
    "2": " ### |#   #|    #|   # |  #  | #   |#####",
    "3": "#####|   # |  #  |   # |    #|#   #| ### ",
    "4": "   # |  ## | # # |#  # |#####|   # |   # ",
    "5": "#####|#    |#### |    #|    #|#   #| ### ",
    "6": "  ## | #   |#    |#### |#   #|#   #| ### ",
    "7": "#####|    #|   # |  #  | #   | #   | #   ",
    "8": " ### |#   #|#   #| ### |#   #|#   #| ### ",
    "9": " ### |#   #|#   #| ####|    #|   # | ##  ",
    " ": "     |     |     |     |     |     |     ",
    ".": "     |     |     |     |     | ##  | ##  ",
    ",": "     |     |     |     | ##  |  #  | #   ",
    ":": "     | ##  | ##  |     | ##  | ##  |     ",
    ";": "     | ##  | ##  |     | ##  |  #  | #   ",
    "-": "     |     |     |#####|     |     |     ",
    "/": "     |    #|   # |  #  | #   |#    |     ",
    "(": "   # |  #  | #   | #   | #   |  #  |   # ",
    ")": " #   |  #  |   # |   # |   # |  #  | #   ",
    "%": "##   |##  #|   # |  #  | #   |#  ##|   ##",
    "_": "     |     |     |     |     |     |#####",
    "+": "     |  #  |  #  |#####|  #  |  #  |     ",
    "=": "     |     |#####|     |#####|     |     ",
    "*": "     |  #  |# # #| ### |# # #|  #  |     ",
    "|": "  #  |  #  |  #  |  #  |  #  |  #  |  #  ",
}
_UNKNOWN = "#####|#   #|#   #|#   #|#   #|#   #|#####"


def _bitmap(char: str) -> list[str]:
    return _GLYPHS.get(char.upper(), _UNKNOWN).split("|")


def text_width(text: str, scale: int = 1) -> int:
    """Pixels a line of ``text`` takes: one blank column between glyphs."""
    return max(0, len(text) * (GLYPH_WIDTH + 1) - 1) * scale


class Canvas:
    """A width x height RGB picture, (0, 0) at the top left."""

    def __init__(self, width: int, height: int, background: Colour = (255, 255, 255)):
        self.width, self.height = width, height
        self.pixels = [bytearray(bytes(background) * width) for _ in range(height)]

    def rect(self, x: int, y: int, width: int, height: int, colour: Colour) -> None:
        """Fill a rectangle, clipped to the canvas."""
        left, right = max(0, int(x)), min(self.width, int(x + width))
        if right <= left:
            return
        row = bytes(colour) * (right - left)
        for line in range(max(0, int(y)), min(self.height, int(y + height))):
            self.pixels[line][3 * left:3 * right] = row

    def text(self, x: int, y: int, text: str, colour: Colour = (0, 0, 0), scale: int = 1) -> None:
        """Draw one line of text with its top-left corner at (x, y)."""
        for index, char in enumerate(text):
            left = x + index * (GLYPH_WIDTH + 1) * scale
            for row, bits in enumerate(_bitmap(char)):
                for column, bit in enumerate(bits):
                    if bit == "#":
                        self.rect(left + column * scale, y + row * scale, scale, scale, colour)

    def png(self) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        # Each scanline starts with its filter type; 0 leaves the bytes as they are.
        raw = b"".join(b"\x00" + bytes(line) for line in self.pixels)
        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                + chunk(b"IEND", b""))

    def save(self, path: str) -> None:
        with open(path, "wb") as handle:
            handle.write(self.png())


@dataclass(frozen=True)
class Series:
    """One stacked part of every bar: its legend name, colour and one value per category."""

    name: str
    colour: Colour
    values: Sequence[float]


_INK = (40, 40, 40)
_GRID = (225, 225, 225)


def _nice_step(top: float, ticks: int) -> float:
    """A round tick step (1, 2 or 5 times a power of ten) with about ``ticks`` steps to ``top``."""
    raw = top / ticks
    power = 10.0 ** math.floor(math.log10(raw))
    return next(power * factor for factor in (1, 2, 5, 10) if power * factor >= raw)


def stacked_bars(canvas: Canvas, x: int, y: int, width: int, height: int, title: str, categories: Sequence[str],
                 series: Sequence[Series], unit: tuple[str, float] = ("", 1.0), note: str = "",
                 label_every: int | None = None) -> None:
    """One chart in the box (x, y, width, height): a title, a legend, a grey note, a y axis in
    ``unit`` (name, divisor) and one stacked bar per category, labelled below (every
    ``label_every``-th; by default as many as fit)."""
    scale = 2
    line = (GLYPH_HEIGHT + 3) * scale
    unit_name, divisor = unit
    canvas.text(x, y, f"{title} ({unit_name})" if unit_name else title, _INK, scale)
    legend_x, legend_y = x, y + line
    for item in series:
        if legend_x + text_width(item.name, scale) + 16 * scale > x + width:
            legend_x, legend_y = x, legend_y + line
        canvas.rect(legend_x, legend_y, GLYPH_HEIGHT * scale, GLYPH_HEIGHT * scale, item.colour)
        canvas.text(legend_x + (GLYPH_HEIGHT + 3) * scale, legend_y, item.name, _INK, scale)
        legend_x += text_width(item.name, scale) + 16 * scale
    # Half a line more, for the top tick's label.
    top_y = legend_y + line + (line if note else 0) + line // 2
    if note:
        canvas.text(x, legend_y + line, note, (110, 110, 110), scale)
    bottom_y = y + height - line - 4
    totals = [sum(s.values[i] for s in series) / divisor for i in range(len(categories))]
    top = max(totals, default=0.0) or 1.0
    step = _nice_step(top, 4)
    top = step * max(1, -(-top // step))
    labels = [f"{step * k:g}" for k in range(round(top / step) + 1)]
    axis_x = x + max(text_width(label, scale) for label in labels) + 4 * scale
    plot_height = bottom_y - top_y
    for k, label in enumerate(labels):
        tick_y = bottom_y - int(plot_height * step * k / top)
        canvas.rect(axis_x, tick_y, x + width - axis_x, 1, _GRID)
        label_x = axis_x - 3 * scale - text_width(label, scale)
        canvas.text(label_x, tick_y - GLYPH_HEIGHT * scale // 2, label, _INK, scale)
    canvas.rect(axis_x, top_y, 1, plot_height + 1, _INK)
    canvas.rect(axis_x, bottom_y, x + width - axis_x, 1, _INK)
    slot = (x + width - axis_x - 4) / max(len(categories), 1)
    bar = max(1, int(slot * 0.7))
    widest = max((text_width(c, scale) for c in categories), default=0)
    every = label_every or max(1, -(-(widest + 4 * scale) // max(int(slot), 1)))
    for index, category in enumerate(categories):
        left = int(axis_x + 4 + slot * index + (slot - bar) / 2)
        level = bottom_y
        for item in series:
            size = round(plot_height * item.values[index] / divisor / top)
            canvas.rect(left, level - size, bar, size, item.colour)
            level -= size
        if index % every == 0:
            label_x = left + bar // 2 - text_width(category, scale) // 2
            canvas.text(label_x, bottom_y + 4 * scale, category, _INK, scale)


def unit_for(largest: float) -> tuple[str, float]:
    """The byte unit (name, divisor) that shows ``largest`` as a number below 1024."""
    for power, name in enumerate(("B", "KIB", "MIB", "GIB", "TIB")):
        if largest < 1024 ** (power + 1) or name == "TIB":
            return name, float(1024 ** power)
    return "B", 1.0

