"""Export the U-Net denoiser to ONNX with its metadata, verified before it is written.

    res = export_onnx("runs/tiny", "tiny.onnx", precision="fp16")
    res.exporter, res.opset, res.report.table()

The graph is `out = unet(x[B,1,H,W], t[B])` (+ `x_self_cond`, + `class` when the
model has them; see train.model.Denoiser), batch axis "B" dynamic. Steps: load the
checkpoint -> trace with torch.onnx's dynamo exporter (legacy TorchScript exporter
as fallback) -> attach the metadata JSON -> optional fp16 conversion (fp32 I/O)
-> onnx.checker -> save to a temp file beside the target -> ORT-vs-PyTorch parity
on that temp file -> rename. A failure anywhere leaves nothing at the target.
"""
from __future__ import annotations

import contextlib
import io
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch

from cxr_ddpm.train.config import Config
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.fsutil import atomic_path, check_output_file, exclusive_lock, remove_dead_temps
from cxr_ddpm.runtime.contract.interface import io_spec, random_inputs
from cxr_ddpm.runtime.contract.metadata import METADATA_KEY, build_metadata, dumps
from cxr_ddpm.train.checkpoint import Checkpoint, load_checkpoint
from cxr_ddpm.train.model import Denoiser

from .batch import Batch, check_batch
from .verify import VerifyReport, check_parity, default_tolerance

MIN_OPSET = 17          # LayerNormalization is opset 17; TensorRT 10 parses 17+
MAX_OPSET = 23          # newest opset torch 2.14's exporter emits
DEFAULT_OPSET = 18      # GroupNormalization-capable, parsed by TensorRT 10/11 and ORT >= 1.14
DEFAULT_BATCH: Batch = (1, 4, 16)
EXPORTERS = ("dynamo", "legacy")


@dataclass
class ExportResult:
    path: Path
    exporter: str
    opset: int
    precision: str
    size_bytes: int
    seconds: float                       # wall time of the whole export incl. verification
    meta: dict[str, Any]
    report: VerifyReport | None = None
    notes: list[str] = field(default_factory=list)


def check_opset(opset: int) -> int:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise CxrError(f"--opset {opset}: supported opsets are {MIN_OPSET}..{MAX_OPSET} "
                       f"(minimum {MIN_OPSET}: LayerNormalization / GroupNorm export)")
    return opset


def newer_resume_state(ckpt: Path, step: int) -> Path | None:
    """For a run folder: its newest complete exact-resume checkpoint if that is newer than `step`
    (the newest consolidated one), i.e. a run killed between COMPLETE and the consolidated file."""
    if not ckpt.is_dir():
        return None
    from cxr_ddpm.train.state import DS_DIR, complete_checkpoints
    done = complete_checkpoints(ckpt / DS_DIR)
    return done[-1][1] if done and done[-1][0] > step else None


def default_onnx_path(ckpt: Checkpoint, precision: str) -> Path:
    stem = ckpt.path.stem if ckpt.path.suffix else ckpt.path.name
    return ckpt.path.with_name(f"{stem}.{precision}.onnx")


def export_onnx(ckpt: str | Path, out: str | Path | None = None, *, config: Config | None = None,
                ema: bool = True, opset: int = DEFAULT_OPSET, batch: Batch = DEFAULT_BATCH,
                precision: str = "fp32", verify: bool = True, atol: float | None = None,
                verify_batches: tuple[int, ...] = (1, 3), exporter: str = "auto",
                log: Any = None, derive_diffusion: bool = False) -> ExportResult:
    """Checkpoint (file, run folder, or lucidrains .pt + config) -> verified ONNX at `out`."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    start = time.perf_counter()
    check_opset(opset)
    if precision not in ("fp32", "fp16"):
        raise CxrError(f"--precision {precision!r}: ONNX export supports fp32 and fp16")
    if exporter not in ("auto", *EXPORTERS):
        raise ValueError(f"exporter must be auto, dynamo or legacy, got {exporter!r}")
    lo, opt, hi = check_batch(batch)
    if out is not None:                      # fail on a folder or an unwritable target before minutes of work
        check_output_file(out, example="unet.onnx")

    ck = load_checkpoint(ckpt, config, derive_diffusion=derive_diffusion)
    log(f"checkpoint: {ck.path} (step {ck.step})")
    newer = newer_resume_state(Path(ckpt), ck.step)
    if newer:
        log(f"warning: {newer} is newer than step {ck.step} but has no consolidated checkpoint (its run "
            "was killed while saving); `cxr-train fit --resume auto` on the run writes it")
    cfg = ck.cfg
    out = check_output_file(out if out is not None else default_onnx_path(ck, precision), example="unet.onnx")
    unet = ck.build_unet(ema=ema)
    wrapper = Denoiser(unet, cfg.model).eval()
    spec = io_spec(cfg.model)

    model, used = export_graph(wrapper, cfg, spec, opset, exporter, log)
    weights = "ema" if (ema and ck.ema is not None) else "online"
    doc = build_metadata(
        cfg, kind="onnx", class_names=ck.class_names, io=spec, precision=precision, exporter=used,
        opset=opset, batch={"min": lo, "opt": opt, "max": hi},
        source={"checkpoint_sha256": ck.sha256, "step": ck.step, "weights": weights,
                "path": str(ck.path)},
        null_class=cfg.model.num_classes if cfg.model.num_classes > 0 else None,
        self_condition=bool(cfg.model.self_condition and cfg.model.num_classes == 0))
    model = finalize_model(model, doc, precision)

    report = None
    # Every export of `out` takes this lock, so temp files of `out` found under it are dead
    # (an export killed mid-write); the lock file goes with the lock.
    with exclusive_lock(out.parent, "cxr-export onnx", name=f".{out.name}.lock"):
        remove_dead_temps(out)
        with atomic_path(out) as tmp:
            onnx.save(model, str(tmp))
            if verify:
                tol = atol if atol is not None else default_tolerance(precision)
                report = check_parity(tmp, wrapper, cfg, precision=precision, batches=verify_batches,
                                      tol=tol, source=str(out))
                if not report.ok:
                    raise CxrError(f"{out}: verification failed: {report.summary()}; nothing written")
    return ExportResult(out, used, opset, precision, out.stat().st_size, time.perf_counter() - start,
                        doc, report)


def export_graph(wrapper: Denoiser, cfg: Config, spec: dict[str, Any], opset: int,
                 exporter: str, log: Any) -> tuple[onnx.ModelProto, str]:
    """Trace to an in-memory ModelProto; dynamo first, legacy TorchScript exporter as fallback."""
    example = example_inputs(cfg, spec, batch=2)   # batch 2: a batch of 1 would be specialised away
    names = [s["name"] for s in spec["inputs"]]
    order = EXPORTERS if exporter == "auto" else (exporter,)
    errors = []
    for name in order:
        log(f"exporting with the torch.onnx {name} exporter (opset {opset})...")
        try:
            with _quiet():
                model = (_export_dynamo if name == "dynamo" else _export_legacy)(wrapper, example, names, opset)
            if model.opset_import and max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) != opset:
                raise RuntimeError("exporter produced another opset than requested")
            return model, name
        except Exception as e:  # exporter internals: any failure means "try the next one"
            errors.append(f"{name}: {' '.join(str(e).split())[:200]}")
            log(f"  {name} exporter failed: {errors[-1]}")
    raise CxrError(f"ONNX export failed with every exporter ({'; '.join(errors)})")


def example_inputs(cfg: Config, spec: dict[str, Any], batch: int) -> tuple[torch.Tensor, ...]:
    feeds = random_inputs(spec, batch, timesteps=cfg.diffusion.timesteps, num_classes=cfg.model.num_classes,
                          seed=0)
    return tuple(torch.from_numpy(feeds[s["name"]]) for s in spec["inputs"])


def _export_dynamo(wrapper: torch.nn.Module, example: tuple, names: list[str], opset: int) -> onnx.ModelProto:
    B = torch.export.Dim("B", min=1, max=4096)
    program = torch.onnx.export(wrapper, example, dynamo=True, opset_version=opset, input_names=names,
                                output_names=["out"], dynamic_shapes=tuple({0: B} for _ in names),
                                verbose=False, optimize=True)
    if program is None:                          # only the legacy exporter (dynamo=False) returns None
        raise RuntimeError("torch.onnx.export(dynamo=True) returned no ONNXProgram")
    return program.model_proto


def _export_legacy(wrapper: torch.nn.Module, example: tuple, names: list[str], opset: int) -> onnx.ModelProto:
    buf = io.BytesIO()
    # torch annotates f as a path only; its legacy (TorchScript) exporter writes to a file object too
    torch.onnx.export(wrapper, example, buf, dynamo=False, opset_version=opset, input_names=names,  # type: ignore[arg-type]
                      output_names=["out"], dynamic_axes={n: {0: "B"} for n in [*names, "out"]},
                      do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue())


@contextlib.contextmanager
def _quiet():
    """The exporters print progress lines and user warnings meant for torch developers."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def finalize_model(model: onnx.ModelProto, doc: dict[str, Any], precision: str) -> onnx.ModelProto:
    """Attach metadata, convert to fp16 when asked, and check the graph."""
    if precision == "fp16":
        model = to_fp16(model)
    del model.metadata_props[:]
    for node in model.graph.node:      # exporter debug info: stack traces with this machine's paths
        del node.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, dumps(doc)
    model.producer_name = "cxr-ddpm"
    try:
        onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as e:
        raise CxrError(f"exported graph fails onnx.checker: {' '.join(str(e).split())[:200]}") from None
    return model


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and activations with float32 graph inputs/outputs (Cast nodes at the boundary).

    onnxconverter-common's converter; int64 inputs (t, class) and the ops it knows
    to be fp16-unsafe stay as they are, and so does the time embedding up to its
    sin/cos: t * freq reaches ~1000, where fp16's spacing is 0.5, so sin(t * freq)
    would lose its phase at late timesteps (cxr128, random init, t=999: max error
    2.2e-2 x output std with it in fp16, 1.7e-2 with it kept in fp32).
    """
    from onnxconverter_common import float16
    keep_fp32 = time_embedding_nodes(model.graph)
    originals = {i.name: onnx.TensorProto.FromString(i.SerializeToString()) for i in model.graph.initializer}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")           # "values truncated to fp16 range" for tiny weights
        model = float16.convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False,
                                                 node_block_list=keep_fp32)
    # The converter still rounds the blocked nodes' weights (the embedding frequencies) to fp16
    # and casts them back; restore the fp32 values where only Cast(to=float) consumes them.
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for init in model.graph.initializer:
        users = consumers.get(init.name, [])
        if (init.data_type == onnx.TensorProto.FLOAT16 and users and init.name in originals
                and all(u.op_type == "Cast" and u.attribute[0].i == onnx.TensorProto.FLOAT for u in users)):
            init.CopyFrom(originals[init.name])
    # The converter retypes every float value_info to fp16 but leaves the graph's own
    # Cast(to=float) nodes (here: t -> float for the time embedding) alone, which ORT
    # rejects as a type mismatch. Point those casts at fp16 too.
    f16 = {v.name for v in model.graph.value_info
           if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}
    for node in model.graph.node:
        if node.op_type == "Cast" and node.output[0] in f16:
            for attr in node.attribute:
                if attr.name == "to" and attr.i == onnx.TensorProto.FLOAT:
                    attr.i = onnx.TensorProto.FLOAT16
    return model


def time_embedding_nodes(graph: onnx.GraphProto, max_nodes: int = 64) -> list[str]:
    """Names of the nodes from input `t` up to and including the first Sin/Cos on each path."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    seen: dict[str, onnx.NodeProto] = {}
    frontier = ["t"]
    while frontier and len(seen) <= max_nodes:
        for node in consumers.get(frontier.pop(), []):
            if node.name in seen or node.op_type == "Shape":   # Shape(t) only feeds batch-size plumbing
                continue
            seen[node.name] = node
            if node.op_type not in ("Sin", "Cos"):
                frontier.extend(node.output)
    if len(seen) > max_nodes or not any(n.op_type in ("Sin", "Cos") for n in seen.values()):
        return []                                  # not the sinusoidal embedding we know: convert as is
    return list(seen)
