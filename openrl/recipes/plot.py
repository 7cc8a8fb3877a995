"""Line charts as PNG files with the standard library only (zlib + struct).

The recipes run next to the tinker SDK on a researcher's laptop, where matplotlib may not
be installed; one small chart per run does not justify a plotting dependency. This draws
axes, ticks with numbers, one polyline per series and a legend in a 5x7 bitmap font.

    line_chart("reward.png", {"reward/mean": [(0, 0.8), (1, 0.85), ...]}, title="async GRPO",
               x_label="step", y_label="reward")
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

# 5x7 glyphs: seven rows of five bits (MSB = leftmost pixel), as 14 hex digits.
_FONT = {
    "0": "0e11131519110e", "1": "040c040404040e", "2": "0e11010204081f", "3": "1f02040201110e",
    "4": "02060a121f0202", "5": "1f101e0101110e", "6": "0608101e11110e", "7": "1f010204080808",
    "8": "0e11110e11110e", "9": "0e11110f01020c", "A": "0e11111f111111", "B": "1e11111e11111e",
    "C": "0e11101010110e", "D": "1c12111111121c", "E": "1f10101e10101f",
    "F": "1f10101e101010", "G": "0e11101711110f", "H": "1111111f111111",
    "I": "0e04040404040e", "J": "0702020202120c", "K": "11121418141211",
    "L": "1010101010101f", "M": "111b1515111111", "N": "11111915131111", "O": "0e11111111110e",
    "P": "1e11111e101010", "Q": "0e11111115120d", "R": "1e11111e141211",
    "S": "0f10100e01011e", "T": "1f040404040404", "U": "1111111111110e", "V": "11111111110a04",
    "W": "1111111515150a", "X": "11110a040a1111", "Y": "1111110a040404", "Z": "1f01020408101f",
    " ": "00000000000000", ".": "00000000000c0c", "-": "0000001f000000", "_": "0000000000001f",
    "/": "00010204081000", ":": "000c0c000c0c00", "=": "00001f001f0000", "(": "02040808080402",
    ")": "08040202020408", "%": "18190204081303", ",": "000000000c0408", "+": "0004041f040400",
    "?": "0e110102040004",
}
_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75), (227, 119, 194), (23, 190, 207)]
_WHITE, _BLACK, _GRID = (255, 255, 255), (0, 0, 0), (225, 225, 225)


class _Canvas:
    def __init__(self, width: int, height: int):
        self.w, self.h = width, height
        self.px = bytearray(_WHITE * (width * height))

    def dot(self, x: int, y: int, color: tuple[int, int, int]) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            i = 3 * (y * self.w + x)
            self.px[i : i + 3] = bytes(color)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        for y in range(max(0, y0), min(self.h, y1 + 1)):
            for x in range(max(0, x0), min(self.w, x1 + 1)):
                self.dot(x, y, color)

    def line(self, x0: float, y0: float, x1: float, y1: float, color, width: int = 1) -> None:
        n = max(1, int(max(abs(x1 - x0), abs(y1 - y0))))
        for k in range(n + 1):
            x, y = round(x0 + (x1 - x0) * k / n), round(y0 + (y1 - y0) * k / n)
            self.rect(x - width // 2, y - width // 2, x + (width - 1) // 2, y + (width - 1) // 2, color)

    def text(self, x: int, y: int, s: str, color=_BLACK, scale: int = 1) -> None:
        for c in s.upper():
            rows = bytes.fromhex(_FONT.get(c, _FONT["?"]))
            for r, bits in enumerate(rows):
                for col in range(5):
                    if bits & (0x10 >> col):
                        self.rect(x + col * scale, y + r * scale, x + col * scale + scale - 1, y + r * scale + scale - 1, color)
            x += 6 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[3 * y * self.w : 3 * (y + 1) * self.w]) for y in range(self.h))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        ihdr = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)  # 8-bit RGB
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round numbers covering [lo, hi]."""
    span = hi - lo
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    out = []
    t = first
    while t <= hi + step * 1e-9:
        if t >= lo - step * 1e-9:
            out.append(round(t, 10))
        t += step
    return out


def _label(v: float) -> str:
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.3g}"


def line_chart(path: str | Path, series: Mapping[str, Sequence[tuple[float, float]]], *, title: str = "", x_label: str = "",
               y_label: str = "", y_range: tuple[float, float] | None = None, x_ticks: Sequence[float] | None = None,
               width: int = 720, height: int = 420) -> Path:  # fmt: skip
    """Write a PNG with one line per series (points are (x, y); NaN and None points are skipped)."""
    points = {name: [(float(x), float(y)) for x, y in pts if y is not None and math.isfinite(y)] for name, pts in series.items()}
    xs = [x for pts in points.values() for x, _ in pts] or [0.0, 1.0]
    ys = [y for pts in points.values() for _, y in pts] or [0.0, 1.0]
    x0, x1 = min(xs), max(xs)
    y0, y1 = y_range if y_range else (min(ys), max(ys))
    if x1 - x0 < 1e-12:
        x0, x1 = x0 - 1, x1 + 1
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    legend_w = 12 + 6 * max((len(n) for n in points), default=0) + 24
    left, right, top, bottom = 64, width - max(legend_w, 40), 42, height - 44
    c = _Canvas(width, height)

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (right - left)

    def py(y: float) -> float:
        return bottom - (y - y0) / (y1 - y0) * (bottom - top)

    for t in _ticks(y0, y1):
        c.line(left, py(t), right, py(t), _GRID)
        s = _label(t)
        c.text(left - 6 - 6 * len(s), round(py(t)) - 3, s)
    for t in x_ticks if x_ticks is not None else _ticks(x0, x1):
        c.line(px(t), top, px(t), bottom, _GRID)
        s = _label(t)
        c.text(round(px(t)) - 3 * len(s), bottom + 6, s)
    c.line(left, top, left, bottom, _BLACK)
    c.line(left, bottom, right, bottom, _BLACK)
    c.text(left, 6, title, scale=2 if 12 * len(title) < width - left else 1)
    c.text((left + right) // 2 - 3 * len(x_label), height - 16, x_label)
    c.text(4, top - 12, y_label)
    for i, (name, pts) in enumerate(points.items()):
        color = _COLORS[i % len(_COLORS)]
        for (ax, ay), (bx, by) in zip(pts, pts[1:]):
            c.line(px(ax), py(ay), px(bx), py(by), color, width=2)
        for x, y in pts:
            c.rect(round(px(x)) - 2, round(py(y)) - 2, round(px(x)) + 2, round(py(y)) + 2, color)
        ly = top + 6 + 14 * i
        c.rect(right + 12, ly, right + 24, ly + 6, color)
        c.text(right + 30, ly, name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(c.png())
    return path


def read_png(path: str | Path) -> tuple[int, int, bytes]:
    """(width, height, RGB bytes) of a PNG written by `line_chart` (8-bit RGB, filter 0 rows)."""
    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    pos, idat, w, h = 8, b"", 0, 0
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        if zlib.crc32(kind + body) & 0xFFFFFFFF != struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])[0]:
            raise ValueError(f"{path}: bad CRC in {kind!r}")
        if kind == b"IHDR":
            w, h = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    return w, h, b"".join(raw[y * (3 * w + 1) + 1 : (y + 1) * (3 * w + 1)] for y in range(h))
