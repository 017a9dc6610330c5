"""Split data/cxr-sample into real-train/ and real-test/ class folders by patient (manifest.csv), for
`cxr-train utility` (README, "Utility"): within each class, patients in sorted order, every
EVERY-th one (the 3rd, 6th, ...) to test, so no patient is on both sides.

    python docs/split_by_patient.py data/cxr-sample runs/utility-demo --every 3
"""
from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="class folders with a manifest.csv (class, file, patient)")
    ap.add_argument("out", type=Path, help="gets real-train/ and real-test/")
    ap.add_argument("--every", type=int, default=3)
    args = ap.parse_args()
    with open(args.data / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for cls in sorted({r["class"] for r in rows}):
        patients = sorted({r["patient"] for r in rows if r["class"] == cls})
        for i, patient in enumerate(patients):
            side = "real-test" if i % args.every == args.every - 1 else "real-train"
            for r in rows:
                if r["class"] == cls and r["patient"] == patient:
                    (args.out / side / cls).mkdir(parents=True, exist_ok=True)
                    shutil.copy2(args.data / cls / r["file"], args.out / side / cls / r["file"])
    for side in ("real-train", "real-test"):
        counts = {d.name: len(list(d.iterdir())) for d in sorted((args.out / side).iterdir())}
        print(side, counts)


if __name__ == "__main__":
    main()
