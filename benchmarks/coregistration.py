"""Co-registration on real bi-temporal pairs: false shifts, unrelated images, known shifts.

    python benchmarks/coregistration.py [--json]

On LEVIR-CD's 11 real pairs (0.5 m, co-registered, with real building change), grey levels:

- **zero shift**: each pair in 4 rotations and both orders (88 cases): how many are measured
  (``reliable``), and the largest measured shift (any measured estimate over 2 m is a false shift);
- **unrelated**: each pair's earlier image against every other pair's later one, 4 rotations
  (440 cases): how many are (wrongly) measured;
- **known shift**: the later image's window moved by (8, -6), (3, 3), (-12, 5), (20, 0), (0, -25)
  and (1, 0) px against the earlier one's (192 px windows, 2 rotations; 132 cases): how many are
  measured and the largest error of those, against the pair's own zero-shift estimate plus the
  applied shift (a pair may carry a real offset of its own).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from uvsam.coregister import shift_between

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "levir-cd"
PIXEL = 0.5
SHIFTS = [(8, -6), (3, 3), (-12, 5), (20, 0), (0, -25), (1, 0)]


def grey(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(float).mean(axis=2)


def px(s) -> tuple[float, float]:
    """(rows down, columns right) of a Shift."""
    return -s.north_m / PIXEL, s.east_m / PIXEL


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    pairs = [(p.stem, grey(p), grey(DATA / "B" / p.name)) for p in sorted((DATA / "A").glob("*.png"))]
    ok = np.ones((256, 256), bool)

    zero = []
    for _, a, b in pairs:
        for k in range(4):
            for x, y in ((a, b), (b, a)):
                zero.append(shift_between(np.rot90(x, k).copy(), np.rot90(y, k).copy(), ok, PIXEL))
    measured = [s for s in zero if s.reliable]

    unrelated = [shift_between(np.rot90(a, k).copy(), b2, ok, PIXEL)
                 for i, (_, a, _) in enumerate(pairs) for j, (_, _, b2) in enumerate(pairs) if i != j
                 for k in range(4)]

    known, errors = 0, []
    o, size = 32, 192
    for _, a, b in pairs:
        for k in range(2):
            ra, rb = np.rot90(a, k), np.rot90(b, k)
            own = shift_between(ra[o:o + size, o:o + size].copy(), rb[o:o + size, o:o + size].copy(),
                                np.ones((size, size), bool), PIXEL)
            for dy, dx in SHIFTS:
                moved = rb[o - dy:o - dy + size, o - dx:o - dx + size].copy()
                s = shift_between(ra[o:o + size, o:o + size].copy(), moved,
                                  np.ones((size, size), bool), PIXEL)
                known += 1
                if s.reliable:
                    base = px(own) if own.reliable else (0.0, 0.0)
                    got = px(s)
                    errors.append(float(np.hypot(got[0] - base[0] - dy, got[1] - base[1] - dx)))
    result = {
        "zero_shift": {"cases": len(zero), "measured": len(measured),
                       "largest_measured_m": round(max((s.metres for s in measured), default=0.0), 2),
                       "measured_over_2m": sum(s.metres > 2 for s in measured)},
        "unrelated": {"cases": len(unrelated), "measured": sum(s.reliable for s in unrelated)},
        "known_shift": {"cases": known, "measured": len(errors),
                        "largest_error_px": round(max(errors, default=0.0), 2)},
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
