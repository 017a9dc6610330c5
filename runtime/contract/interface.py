"""The denoiser's I/O contract: what export builds, verification checks and every backend feeds.

    out (B, C, H, W) float32 = f(x (B, C, H, W) float32, t (B,) int64
                                 [, x_self_cond (B, C, H, W) float32 | class (B,) int64])

`io_spec` writes it into the metadata ("B" is the dynamic batch axis), `model_inputs`
assembles one call's named inputs in x's array namespace (NumPy or CuPy), and
`random_inputs` draws test inputs for parity checks and export tracing. Class id
`num_classes` is the null (unconditional) label of classifier-free guidance.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .config import ModelConfig


def io_spec(m: ModelConfig) -> dict[str, Any]:
    """Input/output names, dtypes and shapes as stored in the metadata ("B" = dynamic batch)."""
    img = ["B", m.channels, m.image_size, m.image_size]
    inputs = [{"name": "x", "dtype": "float32", "shape": img}, {"name": "t", "dtype": "int64", "shape": ["B"]}]
    if m.num_classes > 0:
        inputs.append({"name": "class", "dtype": "int64", "shape": ["B"]})
    elif m.self_condition:
        inputs.append({"name": "x_self_cond", "dtype": "float32", "shape": img})
    return {"inputs": inputs, "outputs": [{"name": "out", "dtype": "float32", "shape": img}]}


def model_inputs(names: list[str], x: Any, t: Any, x_self_cond: Any = None, classes: Any = None,
                 null_class: int | None = None) -> dict[str, Any]:
    """Named, contiguous inputs for one call; absent optional inputs get their neutral value
    (zeros for the self-conditioning estimate, the null class for the label)."""
    xp = np if isinstance(x, np.ndarray) else _namespace(x)
    feeds = {"x": xp.ascontiguousarray(x, dtype=xp.float32), "t": xp.ascontiguousarray(t, dtype=xp.int64)}
    if "x_self_cond" in names:
        feeds["x_self_cond"] = (xp.zeros_like(feeds["x"]) if x_self_cond is None
                                else xp.ascontiguousarray(x_self_cond, dtype=xp.float32))
    if "class" in names:
        feeds["class"] = (xp.full((x.shape[0],), null_class, dtype=xp.int64) if classes is None
                          else xp.ascontiguousarray(classes, dtype=xp.int64))
    return feeds


def random_inputs(io: dict[str, Any], batch: int, *, timesteps: int, num_classes: int, seed: int,
                  timestep: int | None = None) -> dict[str, np.ndarray]:
    """Inputs at the scale sampling sees: x ~ N(0, 1), t = `timestep` (or uniform over 0..T-1),
    class ids cycling through every label and the null label, x_self_cond a clipped estimate."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for s in io["inputs"]:
        shape = [batch if d == "B" else int(d) for d in s["shape"]]
        if s["name"] == "t":
            feeds["t"] = (np.full(shape, timestep, np.int64) if timestep is not None
                          else rng.integers(0, timesteps, shape, dtype=np.int64))
        elif s["name"] == "class":
            feeds["class"] = np.arange(batch, dtype=np.int64) % (num_classes + 1)
        elif s["name"] == "x_self_cond":
            feeds["x_self_cond"] = np.clip(rng.standard_normal(shape) * 0.5, -1, 1).astype(np.float32)
        else:
            feeds[s["name"]] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _namespace(x: Any) -> Any:
    from ..sampling.samplers import array_namespace
    return array_namespace(x)
