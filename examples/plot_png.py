"""A line chart written as a PNG with the standard library alone (``zlib`` + ``struct``).

matplotlib is not a dependency of shardgraph, and a training log needs one chart: lines over a
step axis, with ticks, tick labels and a title. ``line_chart`` rasterises that onto an RGB canvas
(Bresenham lines, a 5x7 bitmap font drawn at twice its size) and ``write_png`` stores the rows
unfiltered in one IDAT chunk.

    line_chart("loss.png", [Series(steps, losses, (70, 130, 220), "loss")], title="training loss",
               x_label="step", y_label="loss")
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Canvas", "Series", "line_chart", "nice_ticks", "write_png"]

Color = tuple[int, int, int]

WHITE: Color = (255, 255, 255)
BLACK: Color = (30, 30, 30)
GRID: Color = (225, 225, 225)

# A 5x7 bitmap font: each line is a character and its seven rows, '#' lit. Lower case only;
# upper case is drawn with these. The letters with descenders start at the x-height and are drawn
# two rows lower, so that "step" does not read as "ster".
_FONT = """
0 .###. #...# #..## #.#.# ##..# #...# .###.
1 ..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.
2 .###. #...# ....# ...#. ..#.. .#... #####
3 ##### ...#. ..#.. ...#. ....# #...# .###.
4 ...#. ..##. .#.#. #..#. ##### ...#. ...#.
5 ##### #.... ####. ....# ....# #...# .###.
6 ..##. .#... #.... ####. #...# #...# .###.
7 ##### ....# ...#. ..#.. .#... .#... .#...
8 .###. #...# #...# .###. #...# #...# .###.
9 .###. #...# #...# .#### ....# ...#. .##..
a ..... ..... .###. ....# .#### #...# .####
b #.... #.... #.##. ##..# #...# #...# ####.
c ..... ..... .###. #.... #.... #...# .###.
d ....# ....# .##.# #..## #...# #...# .####
e ..... ..... .###. #...# ##### #.... .###.
f ..##. .#..# .#... ###.. .#... .#... .#...
g .#### #...# #...# #..## .##.# ....# .###.
h #.... #.... #.##. ##..# #...# #...# #...#
i ..#.. ..... .##.. ..#.. ..#.. ..#.. .###.
j ...#. ..... ..##. ...#. ...#. #..#. .##..
k #.... #.... #..#. #.#.. ##... #.#.. #..#.
l .##.. ..#.. ..#.. ..#.. ..#.. ..#.. .###.
m ..... ..... ##.#. #.#.# #.#.# #...# #...#
n ..... ..... #.##. ##..# #...# #...# #...#
o ..... ..... .###. #...# #...# #...# .###.
p ####. #...# #...# #...# ####. #.... #....
q .#### #...# #...# #...# .#### ....# ....#
r ..... ..... #.##. ##..# #.... #.... #....
s ..... ..... .###. #.... .###. ....# ####.
t .#... .#... ###.. .#... .#... .#..# ..##.
u ..... ..... #...# #...# #...# #..## .##.#
v ..... ..... #...# #...# #...# .#.#. ..#..
w ..... ..... #...# #...# #.#.# #.#.# .#.#.
x ..... ..... #...# .#.#. ..#.. .#.#. #...#
y #...# #...# #...# #..## .##.# ....# .###.
z ..... ..... ##### ...#. ..#.. .#... #####
. ..... ..... ..... ..... ..... .##.. .##..
, ..... ..... ..... ..... .##.. ..#.. .#...
- ..... ..... ..... ##### ..... ..... .....
+ ..... ..#.. ..#.. ##### ..#.. ..#.. .....
: ..... .##.. .##.. ..... .##.. .##.. .....
/ ..... ....# ...#. ..#.. .#... #.... .....
( ...#. ..#.. .#... .#... .#... ..#.. ...#.
) .#... ..#.. ...#. ...#. ...#. ..#.. .#...
= ..... ..... ##### ..... ##### ..... .....
% ##... ##..# ...#. ..#.. .#... #..## ...##
_ ..... ..... ..... ..... ..... ..... #####
"""
_GLYPHS = {line[0]: "".join(line.split()[1:]) for line in _FONT.strip().splitlines()}
_GLYPHS[" "] = "." * 35
_DESCENDERS = "gpqy"
GLYPH_WIDTH, GLYPH_HEIGHT = 5, 7


def write_png(path: str, width: int, height: int, rgb: bytes | bytearray) -> None:
    """Write ``height`` rows of ``width`` RGB pixels (8 bits each, row-major) as a PNG."""
    if len(rgb) != width * height * 3:
        raise ValueError(f"write_png: {len(rgb)} bytes is not {width} x {height} RGB pixels")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    stride = width * 3
    # Every row starts with its filter type; 0 (none) keeps the writer trivial, zlib still compresses.
    raw = b"".join(b"\x00" + bytes(rgb[row * stride:(row + 1) * stride]) for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                     + chunk(b"IEND", b""))


class Canvas:
    """An RGB pixel buffer with the few drawing operations a chart needs."""

    def __init__(self, width: int, height: int, background: Color = WHITE):
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def set(self, x: int, y: int, color: Color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            offset = (y * self.width + x) * 3
            self.pixels[offset:offset + 3] = bytes(color)

    def fill(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        """The rectangle ``x0 <= x < x1``, ``y0 <= y < y1``."""
        for y in range(max(y0, 0), min(y1, self.height)):
            for x in range(max(x0, 0), min(x1, self.width)):
                self.set(x, y, color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color: Color, thickness: int = 1) -> None:
        """Bresenham's line, widened to ``thickness`` pixels by stamping a square at each point."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        error = dx + dy
        low = -(thickness // 2)
        while True:
            for oy in range(low, low + thickness):
                for ox in range(low, low + thickness):
                    self.set(x0 + ox, y0 + oy, color)
            if x0 == x1 and y0 == y1:
                return
            doubled = 2 * error
            if doubled >= dy:
                error += dy
                x0 += sx
            if doubled <= dx:
                error += dx
                y0 += sy

    def text(self, x: int, y: int, text: str, color: Color = BLACK, scale: int = 2, vertical: bool = False) -> None:
        """``text`` with its top-left corner at (x, y); ``vertical`` runs it bottom to top from (x, y)."""
        for index, char in enumerate(text.lower()):
            glyph = _GLYPHS.get(char, _GLYPHS[" "])
            advance = index * (GLYPH_WIDTH + 1) * scale
            drop = 2 if char in _DESCENDERS else 0
            for row in range(GLYPH_HEIGHT):
                for column in range(GLYPH_WIDTH):
                    if glyph[row * GLYPH_WIDTH + column] != "#":
                        continue
                    for oy in range(scale):
                        for ox in range(scale):
                            gx, gy = advance + column * scale + ox, (row + drop) * scale + oy
                            if vertical:
                                self.set(x + gy, y - gx, color)
                            else:
                                self.set(x + gx, y + gy, color)

    def png(self, path: str) -> None:
        write_png(path, self.width, self.height, self.pixels)


def text_width(text: str, scale: int = 2) -> int:
    return max(len(text) * (GLYPH_WIDTH + 1) * scale - scale, 0)


def nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering ``[low, high]``."""
    if not math.isfinite(low) or not math.isfinite(high):
        raise ValueError(f"nice_ticks: the range [{low}, {high}] is not finite")
    if high <= low:
        high = low + (abs(low) or 1.0)
    rough = (high - low) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(rough))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= rough)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value < high + step * 0.5:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _label(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    return f"{value:.{decimals}f}"


@dataclass
class Series:
    xs: Sequence[float]
    ys: Sequence[float]
    color: Color
    label: str = ""
    thickness: int = 2


def line_chart(path: str, series: Sequence[Series], *, title: str = "", x_label: str = "", y_label: str = "",
               width: int = 800, height: int = 480) -> None:
    """Draw ``series`` as lines on shared axes with ticks and a legend, and write the PNG."""
    points = [(x, y) for s in series for x, y in zip(s.xs, s.ys) if math.isfinite(y)]
    if not points:
        raise ValueError("line_chart: no finite points to draw")
    x_ticks = nice_ticks(min(p[0] for p in points), max(p[0] for p in points))
    y_ticks = nice_ticks(min(p[1] for p in points), max(p[1] for p in points))
    canvas = Canvas(width, height)
    left, right, top, bottom = 90, width - 20, 50, height - 60
    x_low, x_high, y_low, y_high = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def to_pixel(x: float, y: float) -> tuple[int, int]:
        return (round(left + (x - x_low) / (x_high - x_low) * (right - left)),
                round(bottom - (y - y_low) / (y_high - y_low) * (bottom - top)))

    y_step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else 1.0
    for value in y_ticks:
        _, py = to_pixel(x_low, value)
        canvas.line(left, py, right, py, GRID)
        canvas.line(left - 6, py, left, py, BLACK)
        label = _label(value, y_step)
        canvas.text(left - 10 - text_width(label), py - GLYPH_HEIGHT, label)
    x_step = x_ticks[1] - x_ticks[0] if len(x_ticks) > 1 else 1.0
    for value in x_ticks:
        px, _ = to_pixel(value, y_low)
        canvas.line(px, top, px, bottom, GRID)
        canvas.line(px, bottom, px, bottom + 6, BLACK)
        label = _label(value, x_step)
        canvas.text(px - text_width(label) // 2, bottom + 12, label)
    canvas.line(left, top, left, bottom, BLACK, 2)
    canvas.line(left, bottom, right, bottom, BLACK, 2)
    for item in series:
        previous = None
        for x, y in zip(item.xs, item.ys):
            if not math.isfinite(y):
                previous = None  # a gap where the value is missing
                continue
            here = to_pixel(x, y)
            if previous is not None:
                canvas.line(*previous, *here, item.color, item.thickness)
            previous = here
    canvas.text((left + right - text_width(title)) // 2, 16, title)
    canvas.text((left + right - text_width(x_label)) // 2, height - 26, x_label)
    canvas.text(14, (top + bottom + text_width(y_label)) // 2, y_label, vertical=True)
    legend_y = top + 10
    for item in (s for s in series if s.label):
        legend_x = right - 20 - text_width(item.label) - 36
        canvas.line(legend_x, legend_y + GLYPH_HEIGHT, legend_x + 26, legend_y + GLYPH_HEIGHT, item.color, 3)
        canvas.text(legend_x + 36, legend_y, item.label)
        legend_y += 2 * GLYPH_HEIGHT + 10
    canvas.png(path)
