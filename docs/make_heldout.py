"""Build data/cxr-heldout, the held-out patients of the bundled models' data-copying test (not bundled).

    git clone https://github.com/agchung/Figure1-COVID-chestxray-dataset /tmp/figure1
    python docs/make_heldout.py /tmp/figure1 data/cxr-heldout

The Figure 1 COVID-19 Chest X-ray Dataset Initiative (research use only, as its authors ask):
another collection than data/cxr-sample (Actualmed), none of its patients trained on. One frontal
image per patient (the first where a patient has several: COVID-00003a, ...), processed as
data/cxr-sample: 8-bit grayscale, longest side 512 px (Lanczos, aspect kept), JPEG quality 92;
manifest.csv lists file, patient, source file, finding, view, source mode and size. The README's
figures used its commit 95bb569e (48 patients).
"""
from __future__ import annotations

import csv
import io
import re
import sys
from pathlib import Path

from PIL import Image


def main(src: Path, out: Path) -> int:
    images = sorted((src / "images").glob("*.*"))
    if not images:
        print(f"error: {src}/images holds no images (clone the Figure 1 repository there)", file=sys.stderr)
        return 2
    meta = {r["patientid"]: r for r in csv.DictReader(io.StringIO((src / "metadata.csv").read_bytes()
                                                                  .decode("latin-1")))}
    first: dict[str, Path] = {}
    for f in images:
        first.setdefault(re.sub(r"[a-z]?$", "", f.stem), f)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for pid, f in first.items():
        im = Image.open(f)
        gray = im.convert("L")
        gray.thumbnail((512, 512), Image.Resampling.LANCZOS)
        gray.save(out / f"{pid}.jpg", quality=92)
        r = meta.get(pid, {})
        rows.append([f"{pid}.jpg", pid, f.name, r.get("finding") or "", r.get("view") or "", im.mode, str(gray.size)])
    with open(out / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "patient", "source_file", "finding", "view", "source_mode", "size"])
        w.writerows(rows)
    print(f"wrote {len(rows)} radiographs (one per patient) and manifest.csv to {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
