"""Charts for the report pages, written as SVG text directly.

The pages used matplotlib, which took about 2 s for report.html's eight charts (about two plain
inference passes over 256 EfficientNet-Lite0 samples) and 1 s more to import. These charts are
plain SVG elements (lines, circles, rectangles, text) on linear or logarithmic axes with round tick
values; the same data give the same text.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

FONT = "font-family='system-ui, sans-serif'"
AXIS_COLOUR = "#444"
GRID_COLOUR = "#ddd"
LINE_COLOUR = "#1f77b4"
DOT_COLOUR = "#ff7f0e"
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def _n(value: float) -> str:
    """A coordinate, short and exact enough."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _e(text: object) -> str:
    return html.escape(str(text))


def nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
    """Round values (1, 2 or 5 times a power of ten apart) covering [low, high], about ``count`` of them."""
    if not high > low:
        high = low + 1.0
    raw = (high - low) / max(count - 1, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(low / step + 1e-9) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9 or len(ticks) < 2:
        ticks.append(round(value, 12))
        value = first + len(ticks) * step
    return ticks


def tick_label(value: float) -> str:
    """A tick value as matplotlib would print it on a plain axis: no trailing zeros, small exponents plain."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1e5 or magnitude < 1e-3:
        return f"{value:.0e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{value:.6g}"


class Chart:
    """One chart: a title, a plot area with x and y axes, and marks added in data coordinates."""

    def __init__(self, width: int, height: int, title: str = "", *, left: int = 60, right: int = 20,
                 top: int = 30, bottom: int = 48, font: int = 14) -> None:
        self.width, self.height, self.font = width, height, font
        self.x0, self.x1 = left, width - right
        self.y0, self.y1 = top, height - bottom  # y0 top of the plot area, y1 its bottom
        self.parts: list[str] = []
        self.overlay: list[str] = []
        self.title = title
        self.xlim = (0.0, 1.0)
        self.ylim = (0.0, 1.0)
        self.ylog = False

    def scales(self, xlim: tuple[float, float], ylim: tuple[float, float], ylog: bool = False) -> None:
        self.xlim, self.ylim, self.ylog = xlim, ylim, ylog

    def x(self, value: float) -> float:
        lo, hi = self.xlim
        return self.x0 + (value - lo) / (hi - lo or 1.0) * (self.x1 - self.x0)

    def y(self, value: float) -> float:
        lo, hi = self.ylim
        if self.ylog:
            value, lo, hi = (math.log10(max(v, 1e-300)) for v in (value, lo, hi))
        return self.y1 - (value - lo) / (hi - lo or 1.0) * (self.y1 - self.y0)

    def axes(self, xticks: Sequence[tuple[float, str]], yticks: Sequence[tuple[float, str]], xlabel: str = "",
             ylabel: str = "", xgrid: bool = True, ygrid: bool = True) -> None:
        """The frame, ticks with labels, optional grid lines, and axis labels."""
        f = self.font - 2
        for value, label in xticks:
            px = _n(self.x(value))
            if xgrid:
                self.parts.append(f"<line x1='{px}' y1='{self.y0}' x2='{px}' y2='{self.y1}' stroke='{GRID_COLOUR}'/>")
            self.parts.append(f"<line x1='{px}' y1='{self.y1}' x2='{px}' y2='{self.y1 + 4}' stroke='{AXIS_COLOUR}'/>")
            self.parts.append(f"<text x='{px}' y='{self.y1 + 6 + f}' font-size='{f}' text-anchor='middle'>"
                              f"{_e(label)}</text>")
        for value, label in yticks:
            py = _n(self.y(value))
            if ygrid:
                self.parts.append(f"<line x1='{self.x0}' y1='{py}' x2='{self.x1}' y2='{py}' stroke='{GRID_COLOUR}'/>")
            self.parts.append(f"<line x1='{self.x0 - 4}' y1='{py}' x2='{self.x0}' y2='{py}' stroke='{AXIS_COLOUR}'/>")
            self.parts.append(f"<text x='{self.x0 - 6}' y='{py}' font-size='{f}' text-anchor='end' "
                              f"dominant-baseline='middle'>{_e(label)}</text>")
        self.overlay.append(f"<rect x='{self.x0}' y='{self.y0}' width='{self.x1 - self.x0}' "
                            f"height='{self.y1 - self.y0}' fill='none' stroke='{AXIS_COLOUR}'/>")
        if xlabel:
            self.overlay.append(f"<text x='{_n((self.x0 + self.x1) / 2)}' y='{self.height - 8}' "
                                f"font-size='{self.font - 1}' text-anchor='middle'>{_e(xlabel)}</text>")
        if ylabel:
            cy = _n((self.y0 + self.y1) / 2)
            self.overlay.append(f"<text x='14' y='{cy}' font-size='{self.font - 1}' text-anchor='middle' "
                                f"transform='rotate(-90 14 {cy})'>{_e(ylabel)}</text>")

    def polyline(self, points: Sequence[tuple[float, float]], colour: str = LINE_COLOUR, width: float = 1.5,
                 dash: str = "") -> None:
        coords = " ".join(f"{_n(self.x(px))},{_n(self.y(py))}" for px, py in points)
        dashing = f" stroke-dasharray='{dash}'" if dash else ""
        self.parts.append(f"<polyline points='{coords}' fill='none' stroke='{colour}' stroke-width='{width}'"
                          f"{dashing}/>")

    def dots(self, points: Sequence[tuple[float, float]], radius: float, colour: str, hollow: bool = False) -> None:
        paint = f"fill='none' stroke='{colour}' stroke-width='1.5'" if hollow else f"fill='{colour}'"
        self.parts.append(f"<g {paint}>" + "".join(
            f"<circle cx='{_n(self.x(px))}' cy='{_n(self.y(py))}' r='{radius}'/>" for px, py in points) + "</g>")

    def rect(self, x: float, y: float, x_end: float, y_end: float, colour: str) -> str:
        """A rectangle between two corners in data coordinates."""
        left, right = sorted((self.x(x), self.x(x_end)))
        top, bottom = sorted((self.y(y), self.y(y_end)))
        return (f"<rect x='{_n(left)}' y='{_n(top)}' width='{_n(max(right - left, 0.0))}' "
                f"height='{_n(max(bottom - top, 0.0))}' fill='{colour}'/>")

    def vline(self, value: float, colour: str, dash: str = "5,3", width: float = 1.2) -> None:
        px = _n(self.x(value))
        self.overlay.append(f"<line x1='{px}' y1='{self.y0}' x2='{px}' y2='{self.y1}' stroke='{colour}' "
                            f"stroke-width='{width}' stroke-dasharray='{dash}'/>")

    def legend(self, entries: Sequence[tuple[str, str]]) -> None:
        """Entries (label, SVG of a 20 x 10 marker at 0,0) in a box at the plot's top right."""
        f = self.font - 2
        width = max(len(label) for label, _ in entries) * f * 0.56 + 36
        x, y = self.x1 - width - 8, self.y0 + 8
        items = [f"<rect x='{_n(x)}' y='{y}' width='{_n(width)}' height='{len(entries) * (f + 6) + 6}' fill='white' "
                 f"fill-opacity='0.85' stroke='#ccc'/>"]
        for row, (label, marker) in enumerate(entries):
            top = y + 6 + row * (f + 6)
            items.append(f"<g transform='translate({_n(x + 6)},{top})'>{marker}</g>"
                         f"<text x='{_n(x + 32)}' y='{top + f - 2}' font-size='{f}'>{_e(label)}</text>")
        self.overlay.append("".join(items))

    def svg(self) -> str:
        title = (f"<text x='{_n((self.x0 + self.x1) / 2)}' y='{self.y0 - 10}' font-size='{self.font + 1}' "
                 f"text-anchor='middle'>{_e(self.title)}</text>") if self.title else ""
        return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{self.width}' height='{self.height}' "
                f"viewBox='0 0 {self.width} {self.height}' {FONT} fill='#222'>"
                f"<rect width='100%' height='100%' fill='white'/>{title}{''.join(self.parts)}{''.join(self.overlay)}"
                "</svg>")


def line_marker(colour: str) -> str:
    return f"<line x1='0' y1='5' x2='20' y2='5' stroke='{colour}' stroke-width='1.5'/>"


def dot_marker(colour: str, radius: float = 2.5, hollow: bool = False) -> str:
    paint = f"fill='none' stroke='{colour}' stroke-width='1.5'" if hollow else f"fill='{colour}'"
    return f"<circle cx='10' cy='5' r='{radius}' {paint}/>"


def box_marker(colour: str) -> str:
    return f"<rect x='2' y='0' width='16' height='10' fill='{colour}'/>"


def value_ticks(low: float, high: float, count: int = 6) -> tuple[tuple[float, float], list[tuple[float, str]]]:
    """Axis limits (the data range with a 5% margin) and the round ticks within them."""
    span = (high - low) or max(abs(high), 1.0)
    limits = (low - 0.05 * span, high + 0.05 * span)
    return limits, [(t, tick_label(t)) for t in nice_ticks(*limits, count) if limits[0] <= t <= limits[1]]


def log_ticks(high: float) -> tuple[tuple[float, float], list[tuple[float, str]]]:
    """Limits from 0.5 to above ``high`` and a tick at every power of ten (every few when there are many)."""
    top = 10 ** math.ceil(math.log10(max(high, 1.0)) + 0.05)
    powers = list(range(0, round(math.log10(top)) + 1))
    stride = max(1, math.ceil(len(powers) / 6))
    return (0.5, top), [(10.0 ** p, f"1e{p}" if p > 3 else f"{10 ** p}") for p in powers[::stride]]
