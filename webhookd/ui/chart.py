"""The overview's chart: attempts per hour (succeeded / failed), drawn on the server as SVG.

Pure: hour counts in, SVG text out. No style sheet inside (the dashboard's CSP allows no
inline style, and an SVG loaded by `<img>` cannot use the page's): presentation attributes
only, with colours that read on light and dark backgrounds alike.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from xml.sax.saxutils import escape, quoteattr

from webhookd.store.model import HourCount

HOUR = 3600
WIDTH, HEIGHT = 760, 240
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 28, 30
OK_COLOUR, BAD_COLOUR, INK = "#2da44e", "#e5534b", "#8c8c8c"


def nice_ceiling(value: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... that is >= value (at least 1)."""
    step = 1
    while True:
        for m in (1, 2, 5):
            if step * m >= value:
                return step * m
        step *= 10


def _hhmm(ts: float) -> str:
    return time.strftime("%H:%M", time.gmtime(ts))


def render(counts: Sequence[HourCount], start: int, hours: int = 24) -> str:
    """SVG of `hours` buckets from `start` (an hour boundary, epoch seconds)."""
    by_hour = {c.hour: c for c in counts}
    buckets = [by_hour.get(start + i * HOUR, HourCount(start + i * HOUR)) for i in range(hours)]
    total_ok = sum(b.succeeded for b in buckets)
    total_bad = sum(b.failed for b in buckets)
    top = nice_ceiling(max([1, *(max(b.succeeded, b.failed) for b in buckets)]))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / hours
    bar = max(1.0, slot * 0.36)
    title = (f"Delivery attempts per hour, last {hours} hours (UTC): "
             f"{total_ok} succeeded, {total_bad} failed")
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
        f'height="{HEIGHT}" role="img" aria-label={quoteattr(title)} font-family="system-ui, sans-serif" '
        f'font-size="12">',
        f"<title>{escape(title)}</title>",
    ]
    for frac in (0.0, 0.5, 1.0):
        y = TOP + plot_h * (1 - frac)
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" stroke="{INK}" '
                   f'stroke-opacity="0.35" stroke-width="1"/>')
        label = round(top * frac)
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" fill="{INK}">{label}</text>')
    for i, b in enumerate(buckets):
        x0 = LEFT + i * slot + (slot - 2 * bar) / 2
        span = f"{_hhmm(b.hour)}\u2013{_hhmm(b.hour + HOUR)} UTC"
        for j, (value, colour, word) in enumerate(((b.succeeded, OK_COLOUR, "succeeded"),
                                                   (b.failed, BAD_COLOUR, "failed"))):
            if not value:
                continue
            h = max(1.0, plot_h * value / top)
            out.append(
                f'<rect x="{x0 + j * bar:.1f}" y="{TOP + plot_h - h:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                f'fill="{colour}"><title>{escape(f"{span}: {value} {word}")}</title></rect>'
            )
        if i % 3 == 0:
            out.append(f'<text x="{LEFT + i * slot + slot / 2:.1f}" y="{HEIGHT - BOTTOM + 18}" '
                       f'text-anchor="middle" fill="{INK}">{_hhmm(b.hour)}</text>')
    lx = WIDTH - RIGHT - 230
    out.append(f'<rect x="{lx}" y="8" width="12" height="12" fill="{OK_COLOUR}"/>'
               f'<text x="{lx + 16}" y="18" fill="{INK}">succeeded ({total_ok})</text>')
    out.append(f'<rect x="{lx + 120}" y="8" width="12" height="12" fill="{BAD_COLOUR}"/>'
               f'<text x="{lx + 136}" y="18" fill="{INK}">failed ({total_bad})</text>')
    out.append("</svg>")
    return "\n".join(out)
