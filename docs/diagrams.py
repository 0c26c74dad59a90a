"""Draw docs/img/scaling-topologies.svg, the PostgreSQL topologies of docs/scaling.md.

    .venv/bin/python docs/diagrams.py [--out docs/img/scaling-topologies.svg]

Plain SVG written from Python (no dependency): two panels, a daemon per MTA host on a shared
PostgreSQL, and a pool behind a load balancer for HTTP intake; the daemons' LISTEN/NOTIFY
through PostgreSQL is dashed. tests/test_docs_diagrams.py checks that the committed file is
what this script draws.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from xml.sax.saxutils import escape

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "img" / "scaling-topologies.svg"
W, H = 1100, 560
PANEL_W = 530

COLORS = {"mta": "#e8f0fe", "daemon": "#e6f4ea", "db": "#fef7e0", "recv": "#fce8e6", "lb": "#f3e8fd"}


class Svg:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def box(self, x: float, y: float, w: float, h: float, label: str, kind: str, sub: str = "") -> None:
        self.parts.append(f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="8" fill="{COLORS[kind]}"'
                          ' stroke="#5f6368" stroke-width="1.2"/>')
        cy = y + h / 2 + (-4 if sub else 5)
        self.text(x + w / 2, cy, label, size=14, weight="bold")
        if sub:
            self.text(x + w / 2, cy + 17, sub, size=11)

    def text(self, x: float, y: float, s: str, *, size: int = 12, weight: str = "normal",
             anchor: str = "middle", fill: str = "#202124") -> None:
        self.parts.append(f'<text x="{x}" y="{y}" font-size="{size}" font-weight="{weight}"'
                          f' text-anchor="{anchor}" fill="{fill}">{escape(s)}</text>')

    def arrow(self, x1: float, y1: float, x2: float, y2: float, *, dashed: bool = False,
              color: str = "#3c4043", both: bool = False) -> None:
        dash = ' stroke-dasharray="6 4"' if dashed else ""
        start = ' marker-start="url(#head)"' if both else ""
        self.parts.append(f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="{color}" stroke-width="1.6"'
                          f'{dash} marker-end="url(#head)"{start}/>')

    def render(self) -> str:
        head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}"'
                ' font-family="DejaVu Sans, Arial, sans-serif">\n'
                '<defs><marker id="head" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7"'
                ' orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#3c4043"/></marker></defs>\n'
                f'<rect width="{W}" height="{H}" fill="#ffffff"/>\n')
        return head + "\n".join(self.parts) + "\n</svg>\n"


def shared(svg: Svg, ox: float, daemons_bottom: float, notes: tuple[str, str, str]) -> None:
    """What both panels have: the receivers, PostgreSQL and its replica, the dashed
    LISTEN/NOTIFY from the daemons, and three lines of notes (the first about NOTIFY)."""
    svg.box(ox + 400, 70, 120, 96, "receivers", "recv", "HTTPS, signed")
    svg.box(ox + 330, 400, 190, 70, "PostgreSQL", "db", "primary: one queue")
    svg.box(ox + 330, 490, 190, 44, "streaming replica", "db")
    svg.arrow(ox + 425, 470, ox + 425, 490)
    svg.arrow(ox + 260, daemons_bottom, ox + 330, 430, dashed=True, both=True)
    svg.text(ox + 20, 420, "LISTEN / NOTIFY", anchor="start", size=12, fill="#1a73e8")
    svg.text(ox + 20, 437, notes[0], anchor="start", size=11, fill="#1a73e8")
    svg.text(ox + 20, 460, notes[1], anchor="start", size=11)
    svg.text(ox + 20, 476, notes[2], anchor="start", size=11)


def per_host(svg: Svg, ox: float) -> None:
    svg.text(ox + PANEL_W / 2, 34, "A daemon per MTA host, one shared PostgreSQL", size=16, weight="bold")
    for i, y in enumerate((70, 170, 270)):
        host = "abc"[i]
        svg.box(ox + 10, y, 120, 60, f"MTA {host}", "mta", "Postfix / Exim")
        svg.box(ox + 190, y, 140, 60, f"webhookd {host}", "daemon", "Unix socket intake")
        svg.arrow(ox + 130, y + 30, ox + 190, y + 30)
        svg.arrow(ox + 330, y + 30, ox + 400, 400)  # to PostgreSQL
        svg.arrow(ox + 330, y + 22, ox + 400, 118)  # to the receivers
    shared(svg, ox, 332, ("webhook changes, released work", "claims + leases: a dead daemon's",
                          "deliveries go to the others"))


def pool(svg: Svg, ox: float) -> None:
    svg.text(ox + PANEL_W / 2, 34, "A pool behind a load balancer (HTTP intake)", size=16, weight="bold")
    svg.box(ox + 10, 70, 120, 60, "MTAs", "mta", "many hosts")
    svg.box(ox + 10, 190, 120, 60, "load balancer", "lb", "POST /v1/events")
    svg.arrow(ox + 70, 130, ox + 70, 190)
    for i, y in enumerate((90, 190, 290)):
        svg.box(ox + 190, y, 140, 56, f"webhookd {i + 1}", "daemon", "HTTP intake")
        svg.arrow(ox + 130, 220, ox + 190, y + 28)
        svg.arrow(ox + 330, y + 28, ox + 400, 400)
        svg.arrow(ox + 330, y + 20, ox + 400, 118)
    shared(svg, ox, 348, ("one failure gate for the fleet", "each daemon delivers what it took",
                          "in; a backlog is shared"))


def draw() -> str:
    svg = Svg()
    per_host(svg, 10)
    svg.parts.append(f'<line x1="{PANEL_W + 25}" y1="20" x2="{PANEL_W + 25}" y2="{H - 20}" stroke="#dadce0"/>')
    pool(svg, PANEL_W + 40)
    return svg.render()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(draw(), encoding="utf-8")
    print(args.out)


if __name__ == "__main__":
    main()
