"""`cxr-export`: thin click commands over export/ library functions.

    cxr-export onnx --ckpt runs/tiny --precision fp16          # -> runs/tiny/checkpoints/step_..fp16.onnx
    cxr-export onnx --ckpt model-10.pt --config configs/cxr128.yaml --out unet.onnx
    cxr-export trt --onnx unet.fp16.onnx --batch 1:8:32 --timing-cache trt.cache   # fp16: the ONNX's precision
    cxr-export verify unet.fp16.onnx --ckpt runs/tiny            # at the sizes of the ONNX's batch range
    cxr-export verify unet.fp16.onnx --ckpt runs/tiny --batch 1:2:3

--batch is one syntax for all three commands (export/batch.py): MIN:OPT:MAX, or N for N:N:N.
"""
from __future__ import annotations

from pathlib import Path

import click

from cxr_ddpm.runtime.errors import TRAIN_MODULES, CxrError, OneLineGroup, cli_errors, require_extra
from cxr_ddpm.runtime.fsutil import check_output_file

from .batch import VERIFY_DEFAULT, batch_text, parse_batch


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@cli_errors
def main() -> None:
    """Export a trained U-Net to ONNX / TensorRT, verified against PyTorch."""
    command = click.get_current_context().invoked_subcommand
    if command != "trt":            # trt needs TensorRT ([gpu]), not torch: it says so itself
        require_extra("train", TRAIN_MODULES, f"cxr-export {command}")


def _config(path: str | None) -> dict:
    """load_checkpoint's config keywords for --config (lucidrains checkpoints)."""
    if path is None:
        return {}
    from cxr_ddpm.train.config import load_checkpoint_config
    cfg, derive = load_checkpoint_config(path)
    return {"config": cfg, "derive_diffusion": derive}


@main.command("onnx")
@click.option("--ckpt", required=True, help="Checkpoint .safetensors, run folder (newest checkpoint) or lucidrains model-N.pt.")
@click.option("--config", "config_path", default=None, help="Config file describing a lucidrains model-N.pt.")
@click.option("--out", default=None, help="Output .onnx (default: beside the checkpoint).")
@click.option("--ema/--no-ema", default=True, show_default=True, help="Export the EMA (default) or online weights.")
@click.option("--opset", default=None, type=int, help="ONNX opset (default 18, minimum 17).")
@click.option("--batch", default="1:4:16", show_default=True,
              help="MIN:OPT:MAX (or N for N:N:N): the batch range the ONNX records (cxr-export trt's "
                   "default profile).")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--verify/--no-verify", default=True, show_default=True, help="ORT vs PyTorch parity before writing.")
@click.option("--atol", default=None, type=float, help="Tolerance on max error / output std (default 1e-4 fp32, 2e-2 fp16).")
@cli_errors
def onnx_cmd(ckpt: str, config_path: str | None, out: str | None, ema: bool, opset: int | None, batch: str,
             precision: str, verify: bool, atol: float | None) -> None:
    """Export the U-Net denoiser to ONNX with its metadata; verify; write atomically."""
    from .onnx_export import DEFAULT_OPSET, check_opset, export_onnx
    bounds = parse_batch(batch)
    check_opset(opset if opset is not None else DEFAULT_OPSET)
    res = export_onnx(ckpt, out, **_config(config_path), ema=ema, batch=bounds,
                      opset=opset if opset is not None else DEFAULT_OPSET, precision=precision,
                      verify=verify, atol=atol)
    if res.report is not None:
        click.echo(res.report.table())
        click.echo(f"verified: {res.report.summary()}")
    source = res.meta["source"]
    click.echo(f"wrote {res.path} from step {source['step']} ({source['weights']} weights of {source['path']}; "
               f"{res.size_bytes / 1e6:.2f} MB, {res.precision}, {res.exporter} exporter, opset {res.opset}, "
               f"{res.seconds:.1f} s)")


@main.command("trt")
@click.option("--onnx", "onnx_path", required=True, help="ONNX file written by cxr-export onnx.")
@click.option("--out", default=None, help="Output engine file (default: beside the ONNX).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="Engine precision; it must be the ONNX's own (the default).")
@click.option("--batch", default=None,
              help="MIN:OPT:MAX (or N for N:N:N): the engine's optimization profile [default: the range the "
                   "ONNX records].")
@click.option("--timing-cache", default=None, help="Timing cache file: loaded if present, saved after the build.")
@click.option("--workspace", default=4.0, type=float, show_default=True, help="Builder workspace limit in GB.")
@cli_errors
def trt_cmd(onnx_path: str, out: str | None, precision: str | None, batch: str | None, timing_cache: str | None,
            workspace: float) -> None:
    """Build a TensorRT engine (header with metadata + plan) from a cxr-export ONNX."""
    from .trt_build import build_engine
    bounds = parse_batch(batch) if batch is not None else None
    if out is not None:                  # a folder fails only at the final rename, after the build
        check_output_file(out, example="unet.engine")
    path = build_engine(onnx_path, out, precision=precision, batch=bounds, timing_cache=timing_cache,
                        workspace_gb=workspace)
    click.echo(f"wrote {path} ({Path(path).stat().st_size / 1e6:.1f} MB)")


@main.command("inception")
@click.option("--weights", default=None, type=click.Path(path_type=Path),
              help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (default: pytorch-fid downloads it).")
@click.option("--out", default="inception.onnx", show_default=True, type=click.Path(path_type=Path))
@cli_errors
def inception_cmd(weights: Path | None, out: Path) -> None:
    """Export pytorch-fid's Inception-v3 (2048-d pool features) as ONNX for `cxr-runtime eval`."""
    from cxr_ddpm.runtime.evaluation.evaluate import PUBLISHED_WEIGHTS

    from .inception import export_inception
    check_output_file(out, example="inception.onnx")
    meta = export_inception(weights, out)
    published = str(meta["weights_sha256"] or "").startswith(PUBLISHED_WEIGHTS)
    click.echo(f"wrote {out} (features vs pytorch-fid: {meta['verified_relative_error']:.1e} of the largest; "
               f"weights {meta['weights_file']}" + ("" if published else ", NOT pytorch-fid's published ones") + ")")


@main.command("verify")
@click.argument("artifact")
@click.option("--ckpt", required=True, help="The checkpoint the artifact was exported from.")
@click.option("--config", "config_path", default=None, help="Config file for a lucidrains model-N.pt.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="onnxruntime provider for ONNX artifacts.")
@click.option("--batch", default=None,
              help=f"MIN:OPT:MAX (or N for N:N:N): check its distinct sizes [default: the range the artifact "
                   f"records, else {batch_text(VERIFY_DEFAULT)}].")
@click.option("--atol", default=None, type=float, help="Tolerance on max error / output std.")
@click.option("--onnx", "onnx_path", default=None, help="For engines: refuse unless built from this ONNX.")
@cli_errors
def verify_cmd(artifact: str, ckpt: str, config_path: str | None, provider: str, batch: str | None,
               atol: float | None, onnx_path: str | None) -> None:
    """Re-run the parity check of an ONNX file or TensorRT engine against its checkpoint."""
    from cxr_ddpm.runtime.fsutil import file_sha256
    from .verify import verify_artifact
    bounds = parse_batch(batch) if batch is not None else None
    onnx_sha = file_sha256(onnx_path) if onnx_path else None
    report = verify_artifact(artifact, ckpt, **_config(config_path), provider=provider,
                             batch=bounds, tol=atol, onnx_sha256=onnx_sha)
    click.echo(report.table())
    if not report.ok:
        raise CxrError(f"{artifact}: verification failed: {report.summary()}")
    click.echo(f"ok: {report.summary()}")


if __name__ == "__main__":
    main()
