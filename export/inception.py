"""`cxr-export inception`: pytorch-fid's Inception-v3 as an ONNX feature extractor for the
torch-free `cxr-runtime eval`.

    export_inception("pt_inception-2015-12-05-6726825d.pth", "inception.onnx")

The graph is pytorch-fid's `InceptionV3([3])` (FID's 2048-d pool features, its FID
Inception variant) with its own input handling: images (B, 3, H, W) in [0, 1], resized to
299 px bilinear (align_corners=False) and scaled to [-1, 1] inside. H and W are dynamic.
Weights: a local copy of pytorch-fid's published file (`--weights`), or pytorch-fid's own
download where the internet is reachable. Before anything is written the ONNX Runtime
features are compared with pytorch-fid's (relative error <= 1e-4 of the largest feature);
the metadata records the weights' sha256, so `eval` knows whether they are the published ones.
"""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.fsutil import atomic_path, ensure_writable_dir, file_sha256
from cxr_ddpm.runtime.contract.metadata import provenance

METADATA_KEY = "cxr_ddpm_features"
TOLERANCE = 1e-4
OPSET = 18


class PoolFeatures(torch.nn.Module):
    """pytorch-fid's InceptionV3 block 3 output, flattened: (B, 3, H, W) -> (B, 2048)."""

    def __init__(self, inception: torch.nn.Module) -> None:
        super().__init__()
        self.inception = inception.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.inception(images)[0].flatten(1)


@contextlib.contextmanager
def _weights_from(path: Path | None) -> Iterator[None]:
    """pytorch-fid fetches its weights with load_state_dict_from_url; serve a local file instead."""
    if path is None:
        yield
        return
    import pytorch_fid.inception as pfi
    original = pfi.load_state_dict_from_url
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CxrError(f"--weights {path}: not a readable PyTorch state dict ({' '.join(str(e).split())[:120]})") from None
    pfi.load_state_dict_from_url = lambda *a, **k: state
    try:
        yield
    finally:
        pfi.load_state_dict_from_url = original


def fid_inception(weights: Path | None) -> torch.nn.Module:
    try:
        from pytorch_fid.inception import InceptionV3
    except ImportError:
        raise CxrError("cxr-export inception needs pytorch-fid: pip install 'cxr-ddpm[train]'") from None
    with _weights_from(weights):
        try:
            model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True)
        except RuntimeError as e:                     # a state dict that is not FID Inception's
            raise CxrError(f"--weights {weights}: not pytorch-fid's Inception weights "
                           f"({str(e).splitlines()[0][:120]})") from None
        except OSError as e:                          # no local file given and no internet
            raise CxrError(f"cannot download pytorch-fid's weights ({e}); pass --weights FILE") from None
    return PoolFeatures(model)


def export_inception(weights: str | Path | None, out: str | Path, *, sizes: tuple[int, ...] = (64, 128),
                     seed: int = 0) -> dict[str, Any]:
    """Export, verify against pytorch-fid, write atomically; returns the metadata with the check."""
    weights = Path(weights) if weights is not None else None
    if weights is not None and not weights.is_file():
        raise CxrError(f"--weights {weights}: file not found")
    out = Path(out)
    ensure_writable_dir(out.parent or Path("."))
    model = fid_inception(weights)
    example = torch.rand(2, 3, sizes[0], sizes[0])
    # the dynamo exporter: the legacy one froze the 299-px resize to the traced input size
    dims = (torch.export.Dim("B", min=1, max=4096), torch.export.Dim("H", min=16, max=4096),
            torch.export.Dim("W", min=16, max=4096))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=OPSET, input_names=["images"],
                                    output_names=["features"], dynamic_shapes=({0: dims[0], 2: dims[1], 3: dims[2]},),
                                    verbose=False)
    if program is None:                          # only the legacy exporter (dynamo=False) returns None
        raise RuntimeError("torch.onnx.export(dynamo=True) returned no ONNXProgram")
    import onnx
    proto = program.model_proto
    meta: dict[str, Any] = {"kind": "inception-features", "dims": 2048, "input": "images (B, 3, H, W) float32 in [0, 1]",
            "preprocessing": "bilinear resize to 299 px (align_corners=False), 2x - 1, as pytorch-fid",
            "weights_file": weights.name if weights else "pytorch-fid download",
            "weights_sha256": file_sha256(weights) if weights else None,
            "provenance": provenance(pytorch_fid=_version("pytorch-fid"))}
    if weights is None:                                 # torch hub's cached copy of the download
        from pytorch_fid.inception import FID_WEIGHTS_URL
        meta["weights_file"] = FID_WEIGHTS_URL.rsplit("/", 1)[-1]
        cached = Path(torch.hub.get_dir()) / "checkpoints" / meta["weights_file"]
        meta["weights_sha256"] = file_sha256(cached) if cached.is_file() else None
    rng = np.random.default_rng(seed)
    with atomic_path(out) as tmp:
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(meta, sort_keys=True)
        onnx.save(proto, str(tmp))
        from cxr_ddpm.runtime.backends.onnx import open_session
        sess = open_session(tmp, provider="cpu", source=str(out))
        worst = 0.0
        for size in sizes:
            x = rng.random((2, 3, size, size), dtype=np.float32)
            with torch.inference_mode():
                want = model(torch.from_numpy(x)).numpy()
            got = sess.run(["features"], {"images": x})[0]
            worst = max(worst, float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12)))
        if not worst <= TOLERANCE:
            raise CxrError(f"{out}: ONNX features differ from pytorch-fid's by {worst:.2e} of the largest "
                           f"feature (tolerance {TOLERANCE:.0e}); nothing written")
    return {**meta, "verified_relative_error": worst, "verified_sizes": list(sizes)}


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return None
