"""Print the demo's realism and copying figures side by side, from `cxr-runtime eval` reports.

    python docs/demo_report.py "this run=runs/demo/samples" "committed model=runs/demo/pretrained-samples"

Each argument is LABEL=SAMPLE_SET (its report at SAMPLE_SET/eval/eval.json). The goals are
issue 20's: on 64 samples at 32 px, median distance to the nearest training image <= 0.24 and
histogram TV <= 0.16 (what `configs/tiny.yaml` reaches after 1,000 steps of 16 images), and the
data-copying test's rule (Meehan et al. 2020): Z < -3 means the model copies its training images.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

GOAL_MEDIAN, GOAL_TV = 0.24, 0.16


def line(label: str, folder: Path) -> str:
    ev = json.loads((folder / "eval" / "eval.json").read_text())
    rec = json.loads((folder / "samples.json").read_text())
    med, tv = ev["memorization"]["median_nearest_distance"], ev["histogram"]["total_variation"]
    cp = ev.get("data_copying") or {}
    z = cp.get("z")
    copying = "not run" if z is None else f"Z {z:+.2f} ({cp.get('verdict')})"
    ok = "radiographs" if med <= GOAL_MEDIAN and tv <= GOAL_TV else "not yet radiographs"
    return (f"  {label:<16} {rec['n']:>4} images  median nearest {med:.3f}  TV {tv:.3f}  {copying:<26}  "
            f"-> {ok}  ({Path(rec['engine']).name}; grid {rec.get('grid')})")


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    print(f"demo: realism (goals: median nearest <= {GOAL_MEDIAN}, TV <= {GOAL_TV}) and copying (Z < -3 = copies; "
          "needs data/cxr-heldout: docs/make_heldout.py)")
    for arg in argv:
        label, _, folder = arg.partition("=")
        print(line(label, Path(folder)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
