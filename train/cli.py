"""`cxr-train`: thin click commands over train/ library functions."""
from __future__ import annotations

import logging
import os
import sys

import click

from cxr_ddpm.runtime.errors import TRAIN_MODULES, CxrError, OneLineGroup, cli_errors, require_extra


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@cli_errors
def main() -> None:
    """Train a DDPM on chest radiographs (DeepSpeed; see slurm/train.sh for clusters)."""
    require_extra("train", TRAIN_MODULES, "cxr-train")


# shared by check-data and prepare; ranges checked by click (-3 workers was a ValueError traceback)
_workers = click.option("--workers", type=click.IntRange(min=1), default=None,
                        help="Decode threads (default: the job's CPU allowance).")
_max_list = click.option("--max-list", type=click.IntRange(min=0), default=20, show_default=True,
                         help="Unreadable files to list.")


@main.command("check-data")
@click.argument("data_dir", type=click.Path(path_type=str))
@_workers
@_max_list
@cli_errors
def check_data(data_dir: str, workers: int | None, max_list: int) -> None:
    """Scan DATA_DIR (class folders of JPEG/PNG/DICOM) and report whether it is usable."""
    from .data import nested_datasets, scan_dataset

    report = scan_dataset(data_dir, workers=workers, progress=sys.stderr.isatty())
    images = report.images
    total = sum(report.counts)
    usable = report.usable_counts()
    n_classes = len(images.class_names)
    click.echo(f"{data_dir}: {total} files in {n_classes} class{'es' if n_classes != 1 else ''} "
               f"(fingerprint {images.fingerprint()}); usable images per class:")
    width = max(len(n) for n in images.class_names)
    for name, count, files in zip(images.class_names, usable, report.counts):
        share = 100.0 * count / max(report.usable, 1)
        click.echo(f"  {name:<{width}}  {count:6d}  ({share:5.1f}%)" + (f"  of {files} files" if files != count else ""))
    for name in nested_datasets(images):
        click.echo(f"warning: class '{name}' holds class folders itself: is {data_dir} the parent of the "
                   f"dataset? Point at {images.root / name} instead", err=True)
    click.echo("sizes (rounded to 64 px):")
    for size, n in report.sizes.most_common(8):
        click.echo(f"  {size:>11}  {n:6d}")
    if len(report.sizes) > 8:
        click.echo(f"  ... and {len(report.sizes) - 8} more size buckets")
    click.echo("formats:")
    for fmt, n in report.formats.most_common():
        click.echo(f"  {fmt:<24}  {n:6d}")
    _list_unreadable("unreadable:", report.unreadable, max_list)
    if report.usable == 0:
        raise CxrError(f"{data_dir}: all {total} images are unreadable")
    click.echo(f"usable: {report.usable} of {total} images")
    empty = [name for name, count in zip(images.class_names, usable) if count == 0]
    if empty:
        raise CxrError(f"{data_dir}: class {', '.join(repr(n) for n in empty)} has no readable image "
                       "(training would never draw it)")


def _list_unreadable(title: str, files: list, max_list: int) -> None:
    """`title N`, then up to max_list `path: reason` lines."""
    if files:
        click.echo(f"{title} {len(files)}")
        for path, reason in files[:max_list]:
            click.echo(f"  {path}: {reason}")
        if len(files) > max_list:
            click.echo(f"  ... and {len(files) - max_list} more")


@main.command("prepare")
@click.argument("data_dir", type=click.Path(path_type=str))
@click.option("--size", type=int, required=True, help="Image size in px (must equal model.image_size).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=str), help="New folder to create.")
@_workers
@_max_list
@cli_errors
def prepare_cmd(data_dir: str, size: int, out_dir: str, workers: int | None, max_list: int) -> None:
    """Decode and resize DATA_DIR once into a memory-mapped array for `fit --data OUT`."""
    from .prepared import prepare

    r = prepare(data_dir, size, out_dir, workers=workers, progress=sys.stderr.isatty())
    _list_unreadable("skipped, unreadable:", r.skipped, max_list)
    click.echo(f"{r.out}: {r.count} images, {size} px, {r.dtype}, in {r.seconds:.1f} s")


@main.command("fit")
@click.option("--config", "config_path", required=True, type=click.Path(path_type=str),
              help="Run config (YAML/TOML), e.g. configs/tiny.yaml.")
@click.option("--data", "data_dir", default=None, help="Class-folder dataset or a `cxr-train prepare` folder (default: data.root of the config).")
@click.option("--out", "out_dir", default=None, help="Run folder (default: runs/<config name>).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Config override, repeatable: --set train.steps=100.")
@click.option("--resume", default=None, metavar="auto|PATH",
              help="'auto': newest complete checkpoint of the run folder (fresh start if none); "
                   "or a checkpoint dir / run folder.")
@cli_errors
def fit_cmd(config_path: str, data_dir: str | None, out_dir: str | None,
            overrides: tuple[str, ...], resume: str | None) -> None:
    """Train with DeepSpeed (torchrun, deepspeed, srun or plain; see train/loop.py).

    Exits 75 after saving when stopped by SIGUSR1/SIGTERM, so a job script can requeue;
    3 when training diverged (a non-finite loss or gradient norm; nothing saved after it).
    """
    from pathlib import Path

    from .config import load_config

    _relay_deepspeed_log()                 # before anything imports deepspeed
    from .diverge import EXIT_DIVERGED
    from .loop import fit
    from .preempt import EXIT_REQUEUE, ignore_stop_signals

    if data_dir is not None and not data_dir.strip():   # "" fell back to data.root without a word
        raise CxrError("--data is empty: give the image folder (or leave --data out for data.root)")
    cfg = load_config(config_path, overrides)
    result = fit(cfg, data_dir=data_dir, out_dir=out_dir, resume=resume, run_name=Path(config_path).stem)
    code = EXIT_DIVERGED if result.diverged else EXIT_REQUEUE if result.preempted else 0
    if result.preempted:
        # Saved. srun (--kill-on-bad-exit: 75 counts as bad) and torchrun's agent now SIGTERM
        # the other ranks; ignored, so none dies mid-exit and turns the step's 75 into 143.
        ignore_stop_signals()
    if result.world_size > 1:
        # Everything is saved, closed and the process group destroyed. Interpreter teardown
        # of the collective backend's threads can still abort a rank ("terminate called
        # without an active exception", seen once on CPU under ZeRO-3 after a finished run),
        # which the launcher reports as a failed job: leave without that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


class _StderrRelay(logging.Filter):
    """On DeepSpeed's logger: its records from `level` up go to stderr as one line each, none to
    the stdout handler DeepSpeed installs (the filter outlives that handler's setup)."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.level:
            print(f"deepspeed: {record.levelname.lower()}: {record.getMessage()}", file=sys.stderr, flush=True)
        return False


def _relay_deepspeed_log() -> None:
    """Every fit printed DeepSpeed [WARNING] lines on stdout that need no action here (the CPU
    accelerator guess, the warmup scheduler read before its first step, OVERFLOW skips that
    the divergence check reports itself). Kept: ERROR and up, on stderr;
    CXR_DEEPSPEED_LOG=warning or info shows more."""
    choice = os.environ.get("CXR_DEEPSPEED_LOG", "error").strip().upper()
    if choice not in ("ERROR", "WARNING", "INFO", "DEBUG"):
        raise CxrError(f"environment variable CXR_DEEPSPEED_LOG={choice.lower()!r}: use error, warning, info or debug")
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _StderrRelay) for f in logger.filters):
        logger.addFilter(_StderrRelay(getattr(logging, choice)))


@main.command("utility")
@click.option("--train", "train_dir", required=True, type=click.Path(path_type=str), metavar="REAL_TRAIN",
              help="Real training images, one folder per class.")
@click.option("--test", "test_dir", required=True, type=click.Path(path_type=str), metavar="REAL_TEST",
              help="Real test images (other patients), one folder per class.")
@click.option("--synth", "synth_dir", required=True, type=click.Path(path_type=str), metavar="SYNTH_DIR",
              help="Synthetic images: `cxr-runtime sample --per-class` output, or class folders.")
@click.option("--out", default=None, type=click.Path(path_type=str), help="Report folder [default: SYNTH_DIR/utility].")
@click.option("--size", type=int, default=None, help="Image size [default: the generator's].")
@click.option("--steps", type=click.IntRange(min=1), default=500, show_default=True,
              help="Training steps of each classifier (every regime the same).")
@click.option("--batch", type=click.IntRange(min=2), default=32, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train every regime K times (seeds SEED..SEED+K-1): mean ± std.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--bootstrap", type=click.IntRange(min=100), default=1000, show_default=True,
              help="Resamples of REAL_TEST for the 95% intervals.")
@click.option("--balance", is_flag=True, help="Also: real plus synthetic images of the smaller classes until even.")
@cli_errors
def utility_cmd(train_dir: str, test_dir: str, synth_dir: str, out: str | None, size: int | None, steps: int,
                batch: int, lr: float, seeds: int, seed: int, bootstrap: int, balance: bool) -> None:
    """Train on synthetic, test on real: a ResNet-18 trained on real, synthetic and both, scored on REAL_TEST."""
    from .utility import first_line, run_utility
    report = run_utility(train_dir, test_dir, synth_dir, out=out, size=size, steps=steps, batch=batch, lr=lr,
                         seeds=seeds, seed=seed, bootstrap=bootstrap, balance=balance)
    click.echo(first_line(report))


if __name__ == "__main__":
    main()
