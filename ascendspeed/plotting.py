"""Line charts written as PNG files with numpy and zlib alone (no plotting package): the pictures
of tools/compare_loss.py.

A `Canvas` is an RGB array. Lines are polylines stamped `width` pixels thick (no anti-aliasing,
so every pixel of a curve has the curve's exact colour), text uses the built-in 5x7 bitmap font
below, and `line_chart` lays out a title, axes with 1-2-5 ticks and their numbers, grid lines,
curves and a legend. `png_bytes` encodes 8-bit RGB PNG: the signature, IHDR, one IDAT holding the
zlib stream of the scanlines (each with filter byte 0), and IEND, every chunk with its CRC-32.
"""
from __future__ import annotations

import math
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np

WHITE, BLACK = (255, 255, 255), (0, 0, 0)
GRID, AXIS_TEXT = (225, 225, 225), (60, 60, 60)
BLUE, ORANGE, RED = (31, 119, 180), (255, 127, 14), (214, 39, 40)

# ------------------------------------------------------------------------------------ the font
# 5 columns x 7 rows per glyph, rows top to bottom, and 2 more rows below the baseline for the
# descenders of g, j, p, q, y; a character is 6 columns wide with its gap.
_GLYPHS = {
    " ": "..... ..... ..... ..... ..... ..... .....",
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
    "A": ".###. #...# #...# #...# ##### #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "###.. #..#. #...# #...# #...# #..#. ###..",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "a": "..... ..... .###. ....# .#### #...# .####",
    "b": "#.... #.... #.##. ##..# #...# #...# ####.",
    "c": "..... ..... .###. #.... #.... #...# .###.",
    "d": "....# ....# .##.# #..## #...# #...# .####",
    "e": "..... ..... .###. #...# ##### #.... .###.",
    "f": "..##. .#..# .#... ###.. .#... .#... .#...",
    "g": "..... ..... .#### #...# #...# #...# .#### ....# .###.",
    "h": "#.... #.... #.##. ##..# #...# #...# #...#",
    "i": "..#.. ..... .##.. ..#.. ..#.. ..#.. .###.",
    "j": "...#. ..... ..##. ...#. ...#. ...#. ...#. #..#. .##..",
    "k": "#.... #.... #..#. #.#.. ##... #.#.. #..#.",
    "l": ".##.. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "m": "..... ..... ##.#. #.#.# #.#.# #...# #...#",
    "n": "..... ..... #.##. ##..# #...# #...# #...#",
    "o": "..... ..... .###. #...# #...# #...# .###.",
    "p": "..... ..... ####. #...# #...# #...# ####. #.... #....",
    "q": "..... ..... .#### #...# #...# #...# .#### ....# ....#",
    "r": "..... ..... #.##. ##..# #.... #.... #....",
    "s": "..... ..... .###. #.... .###. ....# ####.",
    "t": ".#... .#... ###.. .#... .#... .#..# ..##.",
    "u": "..... ..... #...# #...# #...# #..## .##.#",
    "v": "..... ..... #...# #...# #...# .#.#. ..#..",
    "w": "..... ..... #...# #...# #.#.# #.#.# .#.#.",
    "x": "..... ..... #...# .#.#. ..#.. .#.#. #...#",
    "y": "..... ..... #...# #...# #...# #...# .#### ....# .###.",
    "z": "..... ..... ##### ...#. ..#.. .#... #####",
    ".": "..... ..... ..... ..... ..... .##.. .##..",
    ",": "..... ..... ..... ..... .##.. ..#.. .#...",
    ":": "..... .##.. .##.. ..... .##.. .##.. .....",
    "-": "..... ..... ..... ##### ..... ..... .....",
    "+": "..... ..#.. ..#.. ##### ..#.. ..#.. .....",
    "=": "..... ..... ##### ..... ##### ..... .....",
    "%": "##... ##..# ...#. ..#.. .#... #..## ...##",
    "_": "..... ..... ..... ..... ..... ..... #####",
    "/": "..... ....# ...#. ..#.. .#... #.... .....",
    "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.",
    ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
    "[": ".###. .#... .#... .#... .#... .#... .###.",
    "]": ".###. ...#. ...#. ...#. ...#. ...#. .###.",
    "|": "..#.. ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "'": "..#.. ..#.. ..... ..... ..... ..... .....",
    "*": "..... ..#.. #.#.# .###. #.#.# ..#.. .....",
    "#": ".#.#. .#.#. ##### .#.#. ##### .#.#. .#.#.",
    "<": "...#. ..#.. .#... #.... .#... ..#.. ...#.",
    ">": ".#... ..#.. ...#. ....# ...#. ..#.. .#...",
    "!": "..#.. ..#.. ..#.. ..#.. ..#.. ..... ..#..",
    "?": ".###. #...# ....# ...#. ..#.. ..... ..#..",
}
GLYPH_W, GLYPH_H, ADVANCE = 5, 9, 6
FONT = {char: np.array([[c == "#" for c in row] for row in rows.split()]
                       + [[False] * GLYPH_W] * (GLYPH_H - len(rows.split())), dtype=bool)
        for char, rows in _GLYPHS.items()}


def text_size(text: str, scale: int = 2) -> tuple[int, int]:
    """(width, height) in pixels of `text` at `scale`."""
    return max(0, len(text) * ADVANCE - 1) * scale, GLYPH_H * scale


# ------------------------------------------------------------------------------------ drawing
class Canvas:
    """An RGB image (`pixels[y, x]`, y down) to draw on."""

    def __init__(self, width: int, height: int, background=WHITE):
        self.width, self.height = width, height
        self.pixels = np.empty((height, width, 3), dtype=np.uint8)
        self.pixels[:] = background

    def rect(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        """Fill [x0, x1) x [y0, y1), clipped to the image."""
        x0, x1 = max(0, int(x0)), min(self.width, int(x1))
        y0, y1 = max(0, int(y0)), min(self.height, int(y1))
        if x0 < x1 and y0 < y1:
            self.pixels[y0:y1, x0:x1] = color

    def polyline(self, xs, ys, color, width: int = 2, dash: int = 0, clip=None) -> None:
        """Join the points (xs[i], ys[i]) (pixel coordinates, floats) with lines `width` pixels
        thick; `dash` > 0 draws dashes of that many pixels; `clip` = (x0, y0, x1, y1) keeps
        the stamped pixels inside that box."""
        x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
        if len(x) == 0:
            return
        if len(x) > 1:  # points at most one pixel apart along each segment
            dx, dy = np.diff(x), np.diff(y)
            steps = np.maximum(1, np.ceil(np.maximum(np.abs(dx), np.abs(dy)))).astype(np.int64)
            segment = np.repeat(np.arange(len(dx)), steps)
            t = (np.arange(steps.sum()) - np.repeat(np.cumsum(steps) - steps, steps)) / steps[segment]
            x = np.append(x[segment] + dx[segment] * t, x[-1])
            y = np.append(y[segment] + dy[segment] * t, y[-1])
        if dash > 0:
            keep = (np.arange(len(x)) // dash) % 2 == 0
            x, y = x[keep], y[keep]
        x0, y0, x1, y1 = clip if clip is not None else (0, 0, self.width, self.height)
        px, py = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
        low = -(width // 2)
        for ox in range(low, low + width):
            for oy in range(low, low + width):
                sx, sy = px + ox, py + oy
                inside = (sx >= max(0, x0)) & (sx < min(self.width, x1)) & \
                         (sy >= max(0, y0)) & (sy < min(self.height, y1))
                self.pixels[sy[inside], sx[inside]] = color

    def text(self, x: int, y: int, text: str, color=BLACK, scale: int = 2,
             align: str = "left") -> None:
        """`text` with its top at y; x is its left edge, centre or right edge (`align`).
        Characters the font lacks are drawn as '?'."""
        width, _ = text_size(text, scale)
        x = int(x - {"left": 0, "center": width // 2, "right": width}[align])
        for k, char in enumerate(text):
            glyph = FONT.get(char, FONT["?"])
            mask = np.kron(glyph, np.ones((scale, scale), dtype=bool))
            gx, gy = x + k * ADVANCE * scale, int(y)
            ys, xs = np.nonzero(mask)
            xs, ys = xs + gx, ys + gy
            inside = (xs >= 0) & (xs < self.width) & (ys >= 0) & (ys < self.height)
            self.pixels[ys[inside], xs[inside]] = color


# ------------------------------------------------------------------------------------ axes
def nice_ticks(low: float, high: float, count: int = 6, integer: bool = False) -> list[float]:
    """About `count` round values (1, 2 or 5 times a power of ten apart) within [low, high]."""
    if not high > low:
        return [low]
    raw = (high - low) / max(1, count - 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if raw <= m * magnitude * (1 + 1e-9))
    if integer:
        step = max(1.0, round(step))
    first = math.ceil(low / step - 1e-9)
    last = math.floor(high / step + 1e-9)
    return [k * step for k in range(first, last + 1)]


def format_tick(value: float, step: float) -> str:
    """A tick's number with as many decimals as its step needs; scientific for tiny or huge."""
    if value == 0:
        return "0"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 0
    if decimals > 4 or abs(value) >= 1e7:
        return f"{value:.1e}"
    return f"{value:.{decimals}f}"


@dataclass
class Series:
    label: str
    xs: np.ndarray
    ys: np.ndarray
    color: tuple
    dash: int = 0
    width: int = 2  # pixels; a wider first curve stays visible under an equal second one


def _padded_range(values: list[np.ndarray], floor: float | None) -> tuple[float, float]:
    """The y range of the finite values, 5% wider on each side; from `floor` (no margin below
    it) when given."""
    finite = np.concatenate([v[np.isfinite(v)] for v in values] or [np.array([])])
    if not finite.size:
        base = floor or 0.0
        return base, base + 1.0
    low, high = float(finite.min()), float(finite.max())
    if floor is not None:
        low = min(low, floor)
    pad = (high - low) * 0.05 or abs(high) * 0.05 or 1.0
    return (low if floor is not None else low - pad), high + pad


def _envelope(xs: np.ndarray, ys: np.ndarray, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """Many more points than pixel columns: per column its first, lowest, highest and last
    point, in order, which draws the same picture with far fewer segments."""
    if len(xs) <= 4 * columns:
        return xs, ys
    edges = np.linspace(xs[0], xs[-1], columns + 1)
    column = np.clip(np.searchsorted(edges, xs, side="right") - 1, 0, columns - 1)
    keep = np.zeros(len(xs), dtype=bool)
    starts = np.flatnonzero(np.r_[True, column[1:] != column[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    keep[starts] = keep[ends - 1] = True
    for start, end in zip(starts, ends):
        chunk = ys[start:end]
        keep[start + int(np.argmin(chunk))] = keep[start + int(np.argmax(chunk))] = True
    return xs[keep], ys[keep]


def line_chart(series: list[Series], *, title: str, x_label: str, y_label: str,
               width: int = 960, height: int = 540, y_floor: float | None = None,
               y_percent: bool = False) -> np.ndarray:
    """An RGB image of `series` against a shared x axis (the x values are integers, e.g.
    iterations). `y_floor`: the y axis starts at this value (or lower, if data is lower);
    `y_percent`: y tick numbers are shown times 100 with a '%'. Non-finite points are left out."""
    scale = 2
    char_h = GLYPH_H * scale
    plain = [(s, np.asarray(s.xs, float), np.asarray(s.ys, float)) for s in series]
    x_values = [x for _, x, _ in plain if len(x)]
    x_low = min(float(x.min()) for x in x_values) if x_values else 0.0
    x_high = max(float(x.max()) for x in x_values) if x_values else 1.0
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1
    y_low, y_high = _padded_range([y for _, _, y in plain], y_floor)
    x_ticks = nice_ticks(x_low, x_high, 8, integer=True)
    y_ticks = nice_ticks(y_low, y_high, 6)
    y_step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else 1.0
    x_step = x_ticks[1] - x_ticks[0] if len(x_ticks) > 1 else 1.0
    factor, suffix = (100.0, "%") if y_percent else (1.0, "")
    y_texts = [format_tick(v * factor, y_step * factor) + suffix for v in y_ticks]

    left = 24 + max(text_size(t, scale)[0] for t in y_texts)
    top, right, bottom = 3 * char_h + 20, 24, 2 * char_h + 36
    plot = (left, top, width - right, height - bottom)  # x0, y0, x1, y1
    x0, y0, x1, y1 = plot

    def to_px(x, y):
        return (x0 + (np.asarray(x, float) - x_low) / (x_high - x_low) * (x1 - x0),
                y1 - (np.asarray(y, float) - y_low) / (y_high - y_low) * (y1 - y0))

    canvas = Canvas(width, height)
    canvas.text(width // 2, 10, title, BLACK, scale, align="center")
    canvas.text(x0, top - char_h - 10, y_label, AXIS_TEXT, scale)
    canvas.text((x0 + x1) // 2, height - char_h - 8, x_label, AXIS_TEXT, scale, align="center")
    for value, label in zip(y_ticks, y_texts):
        _, py = to_px(x_low, value)
        canvas.rect(x0, round(py), x1, round(py) + 1, GRID)
        canvas.rect(x0 - 6, round(py), x0, round(py) + 1, BLACK)
        canvas.text(x0 - 10, round(py) - char_h // 2, label, AXIS_TEXT, scale, align="right")
    for value in x_ticks:
        px, _ = to_px(value, y_low)
        canvas.rect(round(px), y0, round(px) + 1, y1, GRID)
        canvas.rect(round(px), y1, round(px) + 1, y1 + 6, BLACK)
        canvas.text(round(px), y1 + 10, format_tick(value, x_step), AXIS_TEXT, scale,
                    align="center")
    for s, x, y in plain:
        finite = np.isfinite(x) & np.isfinite(y)
        x, y = _envelope(x[finite], y[finite], x1 - x0)
        px, py = to_px(x, y)
        canvas.polyline(px, py, s.color, width=s.width, dash=s.dash, clip=plot)
    # the frame, over the curves' ends
    canvas.rect(x0, y0, x1, y0 + 1, BLACK)
    canvas.rect(x0, y1, x1 + 1, y1 + 1, BLACK)
    canvas.rect(x0, y0, x0 + 1, y1, BLACK)
    canvas.rect(x1, y0, x1 + 1, y1, BLACK)
    _legend(canvas, series, plot, scale)
    return canvas.pixels


def _legend(canvas: Canvas, series: list[Series], plot, scale: int) -> None:
    """A framed box in the plot's top-right corner: a stroke of each series' colour, its label."""
    if not series:
        return
    x0, y0, x1, _ = plot
    char_h = GLYPH_H * scale
    row, stroke = char_h + 10, 28
    box_w = 12 + stroke + 8 + max(text_size(s.label, scale)[0] for s in series) + 12
    box_h = 10 + row * len(series)
    bx1, by0 = x1 - 10, y0 + 10
    bx0 = max(x0 + 10, bx1 - box_w)
    canvas.rect(bx0, by0, bx1, by0 + box_h, WHITE)
    for side in ((bx0, by0, bx1, by0 + 1), (bx0, by0 + box_h - 1, bx1, by0 + box_h),
                 (bx0, by0, bx0 + 1, by0 + box_h), (bx1 - 1, by0, bx1, by0 + box_h)):
        canvas.rect(*side, AXIS_TEXT)
    for k, s in enumerate(series):
        cy = by0 + 10 + k * row + char_h // 2
        canvas.polyline([bx0 + 12, bx0 + 12 + stroke], [cy, cy], s.color, width=s.width,
                        dash=s.dash)
        canvas.text(bx0 + 12 + stroke + 8, cy - char_h // 2, s.label, BLACK, scale)


# ------------------------------------------------------------------------------------ PNG
def png_bytes(pixels: np.ndarray) -> bytes:
    """An (height, width, 3) uint8 array as an 8-bit RGB PNG file."""
    height, width, _ = pixels.shape
    scanlines = np.zeros((height, 1 + 3 * width), dtype=np.uint8)  # filter byte 0: none
    scanlines[:, 1:] = pixels.reshape(height, 3 * width)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 9)) + chunk(b"IEND", b""))


def write_png(path: str, pixels: np.ndarray) -> None:
    """Write the PNG under a temporary name and rename it into place."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(png_bytes(pixels))
    os.replace(tmp, path)
