"""The one batch-range syntax of cxr-export: `onnx --batch`, `trt --batch` and `verify --batch`.

MIN:OPT:MAX, or one number N meaning N:N:N. An ONNX file records the range it was exported
with (metadata "batch": the TensorRT profile `cxr-export trt` builds by default); an engine
records the profile it was built with ("tensorrt" -> "profile"); `cxr-export verify` checks
the distinct sizes of a range. Pure and light: verify and the CLI use it without TensorRT.
"""
from __future__ import annotations

import re
from typing import Any

from cxr_ddpm.runtime.errors import CxrError

Batch = tuple[int, int, int]                    # (min, opt, max)
SYNTAX = "MIN:OPT:MAX (e.g. 1:4:16) or one number N for N:N:N"
VERIFY_DEFAULT: Batch = (1, 2, 3)               # no recorded range: one batch > 1 and one odd size
_BATCH_RE = re.compile(r"^\s*(\d+)\s*(?::\s*(\d+)\s*:\s*(\d+)\s*)?$")


def batch_text(batch: Batch) -> str:
    return ":".join(str(b) for b in batch)


def check_batch(batch: Batch, flag: str = "--batch") -> Batch:
    """(min, opt, max) with 1 <= min <= opt <= max; CxrError naming `flag` otherwise."""
    lo, opt, hi = (int(b) for b in batch)
    if not 1 <= lo <= opt <= hi:
        raise CxrError(f"{flag} {batch_text(batch)}: need 1 <= MIN <= OPT <= MAX")
    return lo, opt, hi


def parse_batch(text: str, flag: str = "--batch") -> Batch:
    """'MIN:OPT:MAX' (or one number N meaning N:N:N) -> (min, opt, max), 1 <= min <= opt <= max."""
    m = _BATCH_RE.match(str(text))
    if not m:
        hint = " (comma lists of sizes are no longer taken)" if "," in str(text) else ""
        raise CxrError(f"{flag} {text!r}: expected {SYNTAX}{hint}")
    lo, opt, hi = (int(m.group(1)),) * 3 if m.group(2) is None else map(int, m.groups())
    return check_batch((lo, opt, hi), flag)


def batch_sizes(batch: Batch) -> tuple[int, ...]:
    """The distinct sizes of a range, ascending: what verify runs (1:4:16 -> 1, 4, 16; 8 -> 8)."""
    return tuple(sorted(set(check_batch(batch))))


def recorded_batch(meta: dict[str, Any]) -> Batch | None:
    """The range an artifact's metadata records: an engine's built profile, else the ONNX's
    export range; None when it records none."""
    rec = (meta.get("tensorrt") or {}).get("profile") or meta.get("batch")
    if not isinstance(rec, dict) or not {"min", "opt", "max"} <= rec.keys():
        return None
    return int(rec["min"]), int(rec["opt"]), int(rec["max"])
