"""Self-contained charts: SVG line charts written by hand, heatmaps as inline base64 PNG.

No plotting library and nothing fetched at view time: every chart is text inside the HTML.
Line charts take plain numpy arrays; non-finite points break the line (a NaN loss is a gap,
marked by the caller with an event marker). Heatmaps are encoded as PNG with zlib, one pixel
per (row, step), scaled up by the browser with `image-rendering: pixelated`.
"""

from __future__ import annotations

import base64
import html
import math
import struct
import zlib
from collections.abc import Sequence

import numpy as np

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b")
SEVERITY_COLOR = {"critical": "#b00020", "warning": "#e07b00", "info": "#2e7d32"}


def esc(s: object) -> str:
    return html.escape(str(s), quote=True)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    return [round(start + i * step, 12) for i in range(int((hi - start) / step) + 1)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    return f"{v:.0e}" if a >= 1e5 or a < 1e-3 else f"{v:g}"


def line_chart(
    title: str,
    series: list[tuple[str, np.ndarray, np.ndarray]],
    *,
    log_y: bool = False,
    markers: Sequence[tuple[float, str, str]] = (),
    hlines: Sequence[tuple[float, str, str]] = (),
    width: int = 760,
    height: int = 260,
    y_label: str = "",
) -> str:
    """series: (name, x, y); markers: (x, colour, tooltip) vertical lines; hlines: (y, colour,
    label). Returns an <svg> element."""
    ml, mr, mt, mb = 62, 16, 28, 34
    pw, ph = width - ml - mr, height - mt - mb
    xs = np.concatenate([np.asarray(x, float) for _, x, _ in series]) if series else np.zeros(0)
    ys = np.concatenate([np.asarray(y, float) for _, _, y in series]) if series else np.zeros(0)
    ys = np.concatenate([ys, [h for h, _, _ in hlines]]) if hlines else ys
    ok = np.isfinite(ys) & ((ys > 0) if log_y else True)
    tr = (lambda v: np.log10(v)) if log_y else (lambda v: v)
    x0, x1 = (float(np.nanmin(xs)), float(np.nanmax(xs))) if xs.size else (0.0, 1.0)
    if x1 <= x0:
        x1 = x0 + 1
    if ok.any():
        y0, y1 = float(tr(ys[ok]).min()), float(tr(ys[ok]).max())
    else:
        y0, y1 = 0.0, 1.0
    if y1 <= y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad

    def px(x):
        return ml + (np.asarray(x, float) - x0) / (x1 - x0) * pw

    def py(y):
        return mt + ph - (np.asarray(y, float) - y0) / (y1 - y0) * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{esc(title)}">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
        f'<text x="{ml}" y="18" font-size="13" font-weight="bold">{esc(title)}</text>',
        f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>',
    ]
    if log_y:
        yt = [float(v) for v in range(math.floor(y0), math.ceil(y1) + 1) if y0 <= v <= y1]
        labels = [_fmt(10**v) for v in yt]
    else:
        yt = nice_ticks(y0, y1)
        labels = [_fmt(v) for v in yt]
    for v, lab in zip(yt, labels):
        y = float(py(v))
        out.append(
            f'<line x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
            f'<text x="{ml - 4}" y="{y + 4:.1f}" font-size="10" '
            f'text-anchor="end">{lab}</text>'
        )
    for v in nice_ticks(x0, x1, 8):
        x = float(px(v))
        out.append(
            f'<text x="{x:.1f}" y="{mt + ph + 14}" font-size="10" '
            f'text-anchor="middle">{_fmt(v)}</text>'
        )
    out.append(
        f'<text x="{ml + pw / 2}" y="{height - 4}" font-size="10" text-anchor="middle">step</text>'
    )
    if y_label:
        out.append(
            f'<text x="12" y="{mt + ph / 2}" font-size="10" text-anchor="middle" '
            f'transform="rotate(-90 12 {mt + ph / 2})">{esc(y_label)}</text>'
        )
    for h, colour, label in hlines:
        if math.isfinite(h) and (h > 0 or not log_y):
            y = float(py(tr(h)))
            out.append(
                f'<line x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" '
                f'stroke="{colour}" stroke-dasharray="5 3"/>'
                f'<text x="{ml + pw - 2}" y="{y - 3:.1f}" font-size="10" fill="{colour}" '
                f'text-anchor="end">{esc(label)}</text>'
            )
    for i, (name, sx, sy) in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        x_S, y_S = np.asarray(sx, float), np.asarray(sy, float)
        good = np.isfinite(y_S) & ((y_S > 0) if log_y else True)
        # one polyline per run of finite points
        runs = np.split(np.arange(y_S.size), np.flatnonzero(np.diff(good.astype(int)) != 0) + 1)
        for idx in runs:
            if idx.size and good[idx[0]]:
                pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(px(x_S[idx]), py(tr(y_S[idx]))))
                out.append(
                    f'<polyline class="series" fill="none" stroke="{colour}" '
                    f'stroke-width="1.5" points="{pts}"><title>{esc(name)}</title>'
                    f"</polyline>"
                )
        out.append(
            f'<text x="{ml + 8 + 150 * i}" y="{mt + 12}" font-size="10" '
            f'fill="{colour}">{esc(name)}</text>'
        )
    for x, colour, tip in markers:
        if x0 <= x <= x1:
            xx = float(px(x))
            out.append(
                f'<line class="marker" x1="{xx:.1f}" x2="{xx:.1f}" y1="{mt}" '
                f'y2="{mt + ph}" stroke="{colour}" stroke-width="1.5" opacity="0.8">'
                f"<title>{esc(tip)}</title></line>"
            )
    out.append("</svg>")
    return "".join(out)


# ---- heatmaps ---------------------------------------------------------------------------
def encode_png(rgb: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes (8-bit RGB, no interlace)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[i].tobytes() for i in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + tag
            + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def diverging(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Values in [lo, hi] (log-ratios, 0 = normal) -> RGB: blue below 0, white at 0, red
    above; NaN -> grey."""
    v = np.asarray(v, float)
    t = np.clip(np.where(v < 0, v / -lo if lo else 0, v / hi if hi else 0), -1, 1)
    out = np.empty(v.shape + (3,))
    white, blue, red = np.array([1, 1, 1.0]), np.array([0.13, 0.3, 0.75]), np.array([0.8, 0.1, 0.1])
    neg = np.clip(-t, 0, 1)[..., None]
    pos = np.clip(t, 0, 1)[..., None]
    out = white * (1 - neg - pos) + blue * neg + red * pos
    out[~np.isfinite(v)] = (0.75, 0.75, 0.75)
    return (out * 255).round().astype(np.uint8)


def heatmap(
    title: str,
    values_RS: np.ndarray,
    row_labels: list[str],
    steps: np.ndarray,
    *,
    lo: float,
    hi: float,
    legend: str,
    row_groups: Sequence[tuple[int, str]] = (),
    width: int = 760,
) -> str:
    """values [rows, steps] of log2 ratios -> an SVG holding the PNG, axes and labels.
    row_groups: (first row, label) of each group (e.g. a layer)."""
    R, S = values_RS.shape
    rgb = diverging(values_RS, lo, hi)
    data = base64.b64encode(encode_png(rgb)).decode()
    ml, mt, mb = 70, 26, 40
    pw = width - ml - 16
    row_h = max(2, min(8, 480 // max(R, 1)))
    ph = row_h * R
    height = mt + ph + mb
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="heatmap" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{esc(title)}">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{ml}" y="16" font-size="13" font-weight="bold">{esc(title)}</text>',
        f'<image x="{ml}" y="{mt}" width="{pw}" height="{ph}" preserveAspectRatio="none" '
        f'style="image-rendering:pixelated" href="data:image/png;base64,{data}"/>',
        f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>',
    ]
    for first, label in row_groups:
        y = mt + first * row_h
        out.append(
            f'<line x1="{ml - 6}" x2="{ml + pw}" y1="{y}" y2="{y}" stroke="#333" '
            f'stroke-width="0.6"/><text x="{ml - 8}" y="{y + 10}" font-size="10" '
            f'text-anchor="end">{esc(label)}</text>'
        )
    if S:
        s0, s1 = float(steps[0]), float(steps[-1])
        for v in nice_ticks(s0, s1, 8):
            x = ml + (v - s0 + 0.5) / max(s1 - s0 + 1, 1) * pw
            out.append(
                f'<text x="{x:.1f}" y="{mt + ph + 13}" font-size="10" '
                f'text-anchor="middle">{_fmt(v)}</text>'
            )
    out.append(f'<text x="{ml}" y="{mt + ph + 30}" font-size="10">{esc(legend)}</text>')
    out.append("</svg>")
    return "".join(out)
