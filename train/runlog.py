"""The run folder's own files, written by rank 0: config.yaml (resolved), log.csv (one row per
logged step), summary.json, and TensorBoard scalars and grids with train.tensorboard."""
from __future__ import annotations

import contextlib
import csv
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .config import Config
from cxr_ddpm.runtime.errors import CxrError
from cxr_ddpm.runtime.fsutil import atomic_write

from .dist import World
from .state_io import write_error

LOG_FIELDS = ["step", "loss", "lr", "grad_norm", "images_per_s", "elapsed_s", "data_wait_pct"]


class RunLog:
    """config.yaml (resolved), log.csv (one row per logged step) and summary.json of a run;
    with train.tensorboard also TensorBoard scalars and sample grids under RUN/tb.
    On resume, elapsed_s continues from the last kept row (training time of the whole run)."""

    def __init__(self, run: Path, cfg: Config, step: int):
        import yaml
        self.run = run
        self._tb = None
        if cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter   # checked in plan_run
            self._tb = SummaryWriter(str(run / "tb"), purge_step=step + 1 if step else None)
        with _writing(run / "config.yaml"), atomic_write(run / "config.yaml", "w") as f:
            f.write("# resolved config of this run (defaults + file + --set overrides)\n")
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
        path = run / "log.csv"
        rows = []
        if step and path.is_file():     # on resume, rows after the checkpoint's step are redone: drop them
            with open(path, newline="") as f:
                rows = [r for r in csv.reader(f)][1:]
            rows = [r for r in rows if r and int(r[0]) <= step]
        self._elapsed0 = 0.0
        with contextlib.suppress(IndexError, ValueError):
            self._elapsed0 = float(rows[-1][LOG_FIELDS.index("elapsed_s")])
        with _writing(path), atomic_write(path, "w") as f:
            w = csv.writer(f)
            w.writerow(LOG_FIELDS)
            w.writerows(rows)
        self._path = path
        self._file = open(path, "a", newline="")
        self._csv = csv.writer(self._file)

    def row(self, step: int, loss: float, lr: float, grad_norm: Any, images_per_s: float,
            elapsed_s: float, data_wait_pct: float) -> None:
        with _writing(self._path):
            self._csv.writerow([step, f"{loss:.9g}", f"{lr:.6g}",
                                "" if grad_norm is None else f"{float(grad_norm):.6g}", f"{images_per_s:.2f}",
                                f"{self._elapsed0 + elapsed_s:.2f}", f"{data_wait_pct:.1f}"])
            self._file.flush()
        if self._tb is not None:
            for name, value in (("loss", loss), ("lr", lr), ("grad_norm", grad_norm),
                                ("images_per_s", images_per_s), ("data_wait_pct", data_wait_pct)):
                if value is not None:
                    self._tb.add_scalar(f"train/{name}", float(value), step)

    def image(self, step: int, png: Path) -> None:
        """A sample grid PNG as a TensorBoard image (nothing without train.tensorboard)."""
        if self._tb is not None:
            from PIL import Image
            self._tb.add_image("samples/ema", np.asarray(Image.open(png)), step, dataformats="HW")

    def close(self, summary: dict[str, Any]) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        with _writing(self.run / "summary.json"), atomic_write(self.run / "summary.json", "w") as f:
            json.dump(summary, f)


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """A failed write of a run file (full disk) -> one CxrError line naming it and the reason."""
    try:
        yield
    except OSError as e:
        raise CxrError(f"{path}: cannot write: {write_error(path.parent, e)}") from None


def progress_bar(world: World, step: int, total: int) -> Any:
    from tqdm import tqdm
    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=step, desc="train", unit="step", disable=not world.is_main,
                mininterval=0.5 if tty else 30.0, dynamic_ncols=True)


def peak_mem_mib(cuda: bool) -> float:
    """This rank's peak memory so far: allocated GPU memory on CUDA, else the process's peak RSS."""
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    from cxr_ddpm.runtime.system import peak_rss_mib     # VmHWM: not inherited from the launcher
    return peak_rss_mib()
