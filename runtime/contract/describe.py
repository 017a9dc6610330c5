"""What `cxr-runtime inspect` prints: an artifact's metadata as aligned `key  value` lines.

    print(describe(open_artifact("model.onnx")))
"""
from __future__ import annotations

import json
from pathlib import Path

from .artifact import Artifact
from .metadata import FORMAT_MAJOR, FORMAT_MINOR

SHOWN_KEYS = ("precision", "exporter", "opset", "batch", "source", "step", "tensorrt")


def describe_rows(art: Artifact, *, file: str | Path | None = None, backend: str | None = None
                  ) -> list[tuple[str, str]]:
    """(key, value) rows: contract version, model, schedule, I/O, provenance (with the training
    and data settings it was made with, as recorded: shown, never validated).
    file/backend: as the user named them [default: the artifact's path and kind]."""
    m, model, diffusion = art.meta, art.spec.model, art.spec.diffusion
    rows = [("file", str(file if file is not None else art.path)), ("kind", art.kind),
            ("backend", backend or art.kind),
            ("format", f"{art.version_text} (this cxr-ddpm reads {FORMAT_MAJOR}.*, writes "
                       f"{FORMAT_MAJOR}.{FORMAT_MINOR})"),
            ("image", f"{model.image_size}x{model.image_size}, {model.channels} channel(s)"),
            ("model", f"dim {model.dim}, dim_mults {list(model.dim_mults)}, "
                      f"self_condition {art.self_condition}, classes {model.num_classes}"),
            ("objective", diffusion.objective),
            ("schedule", f"{diffusion.beta_schedule}, T={diffusion.timesteps}, "
                         f"sha256 {art.schedule.digest()[:16]}"),
            ("class_names", ", ".join(art.class_names) or "-")]
    rows += [(key, json.dumps(m[key]) if isinstance(m[key], (dict, list)) else str(m[key]))
             for key in SHOWN_KEYS if key in m]
    for io_kind, specs in (("input", art.io.inputs), ("output", art.io.outputs)):
        rows += [(io_kind, f"{s.name} {s.dtype} {list(s.shape)}") for s in specs]
    for section, values in sorted(art.training.items()):          # provenance: as recorded
        text = ", ".join(f"{k}={v}" for k, v in values.items()) if isinstance(values, dict) else json.dumps(values)
        rows.append((f"trained: {section}", text))
    prov = {k: v for k, v in art.provenance.items() if k != "training" and v is not None}
    rows.append(("provenance", ", ".join(f"{k}={v}" for k, v in prov.items())))
    return rows


def describe(art: Artifact, *, file: str | Path | None = None, backend: str | None = None) -> str:
    """describe_rows as aligned lines."""
    rows = describe_rows(art, file=file, backend=backend)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
