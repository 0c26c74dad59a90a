"""Summarise a `py-spy record --format raw` file (collapsed stacks: "frame;frame;... COUNT").

    python bench/pyspy_top.py PROFILE.txt [--top 25]

Prints the functions (or, with --lines, the lines) with the most samples on top of the stack (self) and the frames
present anywhere in the stack (inclusive), as percentages of all samples.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LINENO = re.compile(r":\d+\)$")


def summarise(path: Path, top: int = 25, lines: bool = False) -> str:
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")[1:]  # the first entry names the process
        if not lines:
            frames = [_LINENO.sub(")", f) for f in frames]
        if not frames:
            continue
        own[frames[-1]] += n
        for frame in set(frames):
            incl[frame] += n
    out = [f"{path.name}: {total} samples", "", "self:"]
    out += [f"{100 * n / total:6.1f}%  {frame}" for frame, n in own.most_common(top)]
    out += ["", "inclusive:"]
    out += [f"{100 * n / total:6.1f}%  {frame}" for frame, n in incl.most_common(top)]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("profile", type=Path)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--lines", action="store_true", help="keep line numbers (default: per function)")
    args = ap.parse_args()
    print(summarise(args.profile, args.top, args.lines))


if __name__ == "__main__":
    main()
