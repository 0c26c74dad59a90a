"""docs/diagrams.py draws docs/img/scaling-topologies.svg: valid SVG with its labels, and the
committed file is exactly what the script draws now (so the picture never goes stale)."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_topology_picture_is_valid_svg_with_its_labels_and_up_to_date(tmp_path: Path) -> None:
    out = tmp_path / "topologies.svg"
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "diagrams.py"), "--out", str(out)],
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    tree = ET.fromstring(out.read_text(encoding="utf-8"))
    assert tree.tag == "{http://www.w3.org/2000/svg}svg"
    labels = {t.text for t in tree.iter("{http://www.w3.org/2000/svg}text")}
    for label in ("PostgreSQL", "streaming replica", "load balancer", "LISTEN / NOTIFY", "receivers",
                  "webhookd a", "webhookd 3", "MTA c"):
        assert label in labels, label
    assert out.read_text(encoding="utf-8") == (ROOT / "docs" / "img" / "scaling-topologies.svg").read_text(
        encoding="utf-8"), "run .venv/bin/python docs/diagrams.py and commit docs/img/scaling-topologies.svg"
    assert "scaling-topologies.svg" in (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
